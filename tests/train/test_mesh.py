"""Meshes from config data and the optimizer state's placement."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nemotron_jax import ModelConfig, NemotronModel
from nemotron_jax.sharding import shardings
from nemotron_jax.train.mesh import MeshConfigError, make_mesh, opt_state_shardings, validate_mesh_shape


def test_mesh_shapes_are_validated():
    assert validate_mesh_shape({"data": 2, "expert": 4}, 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert validate_mesh_shape({}, 8)["data"] == 1  # all ones: a single-device run on a multi-device host
    with pytest.raises(MeshConfigError, match="needs 3 devices but 8"):
        validate_mesh_shape({"data": 3}, 8)
    with pytest.raises(MeshConfigError, match="unknown axes"):
        validate_mesh_shape({"pipeline": 2}, 8)
    with pytest.raises(MeshConfigError, match=">= 1"):
        validate_mesh_shape({"data": 0}, 8)


def test_make_mesh_names_every_axis():
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert make_mesh({}).devices.size == 1


def test_adam_moments_follow_their_params():
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    params = nnx.state(NemotronModel(ModelConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param)
    opt = optax.adamw(1e-3)
    p_sh = shardings(params, mesh)
    o_sh = opt_state_shardings(opt, opt.init(params), p_sh, mesh)
    mu = o_sh[0].mu["layers"][0]["mixer"]["in_proj"]["kernel"].get_value()
    assert mu.spec == P("fsdp", None)
    assert o_sh[0].count.spec == P()  # not a param-shaped leaf: replicated
    placed = jax.device_put(opt.init(params), o_sh)
    assert jnp.all(placed[0].mu["embeddings"][...] == 0)
