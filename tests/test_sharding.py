"""Logical axes -> mesh axes: the one sharding builder, batch placement, activation constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nemotron_jax import ModelConfig, NemotronModel
from nemotron_jax.sharding import (DEFAULT_RULES, batch_sharding, constrain, logical_to_spec, rules_of,
                                   shardings)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_logical_to_spec_drops_repeated_and_absent_axes():
    assert logical_to_spec(("batch", "seq", "embed"), DEFAULT_RULES) == P(("data", "fsdp", "expert"), None, None)
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, ("fsdp", "tensor")) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, ("data",)) == P(None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))


def test_shardings_follow_metadata_rules_and_divisibility(mesh):
    cfg = ModelConfig.tiny(vocab_size=255)  # 255 rows do not split over 2: that dim stays whole
    state = nnx.state(nnx.eval_shape(lambda: NemotronModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    sh = shardings(state, mesh)
    assert sh["layers"][0]["mixer"]["in_proj"]["kernel"].get_value().spec == P("fsdp", None)
    assert sh["layers"][2]["mixer"]["experts"]["up_proj"].get_value().spec == P("expert", None, "tensor")
    assert sh["embeddings"].get_value().spec == P(None, "fsdp")  # vocab -> tensor dropped: 255 % 2
    custom = dict(DEFAULT_RULES, embed=None, expert_mlp=None)
    sh = shardings(state, mesh, tuple(custom.items()))
    assert sh["layers"][0]["mixer"]["in_proj"]["kernel"].get_value().spec == P(None, None)
    assert sh["layers"][2]["mixer"]["experts"]["up_proj"].get_value().spec == P("expert", None, None)


def test_rules_come_from_the_model_config():
    assert rules_of(ModelConfig.tiny()) == DEFAULT_RULES
    rules = [["batch", ["fsdp", "expert"]], ["embed", None]]  # lists (e.g. from JSON) become hashable tuples
    cfg = ModelConfig.tiny(sharding_rules=rules)
    assert rules_of(cfg) == (("batch", ("fsdp", "expert")), ("embed", None)) and hash(cfg)
    with pytest.raises(ValueError, match="sharding_rules"):
        ModelConfig.tiny(sharding_rules=(("batch",),))


def test_batch_sharding_and_constraints(mesh):
    assert batch_sharding(mesh).spec == P(("fsdp", "expert"), None)
    x = jnp.ones((8, 4, 6))
    assert constrain(x, ("batch", "seq", "embed")) is x  # no mesh set: nothing to do
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "seq", "embed")))(x)
    assert y.sharding.spec[0] == ("fsdp", "expert") and all(s is None for s in y.sharding.spec[1:])
    np.testing.assert_array_equal(np.asarray(y), 2.0)
