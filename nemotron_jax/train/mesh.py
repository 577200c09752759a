"""Device meshes from config data, and the optimizer state's shardings (params and batches: nemotron_jax.sharding)."""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nemotron_jax.sharding import MESH_AXES


class MeshConfigError(ValueError):
    pass


def validate_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Every axis of MESH_AXES with its size; the product must equal the device count, except that an
    all-ones mesh means a single-device run (on the first device) whatever the count."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshConfigError(f"config.mesh has unknown axes {unknown}; use some of {MESH_AXES}")
    full = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    for a, n in full.items():
        if n < 1:
            raise MeshConfigError(f"config.mesh.{a}={n}: mesh axis sizes must be >= 1")
    if jax.process_count() > 1 and math.prod(full.values()) != num_devices:
        raise MeshConfigError(f"config.mesh {full} uses {math.prod(full.values())} of the {num_devices} devices of "
                              f"{jax.process_count()} processes; a multi-process run must use every device: make "
                              f"the product of the axis sizes {num_devices}")
    if math.prod(full.values()) not in (1, num_devices):
        raise MeshConfigError(f"config.mesh {full} needs {math.prod(full.values())} devices but "
                              f"{num_devices} are available; make the product of the axis sizes equal "
                              f"the device count (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return full


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """A mesh with every axis of MESH_AXES (size 1 where not given); Auto axes let XLA propagate shardings."""
    devices = jax.devices() if devices is None else devices
    full = validate_mesh_shape(shape, len(devices))
    devices = devices[: math.prod(full.values())]
    arr = np.asarray(devices).reshape(tuple(full[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """The rows (indices along axis 0) of a global array of `global_shape` that this process's devices hold, in
    the order `jax.make_array_from_process_local_data(sharding, local, global_shape)` expects `local`'s rows.

    With the devices of each process contiguous in the batch axes (as `make_mesh` lays them out) these are
    rows [p * B / P, (p + 1) * B / P) of process p; where the batch is replicated over processes (e.g. a mesh
    that only shards `tensor`), every process holds every row."""
    n = global_shape[0]
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows.update(range(*index[0].indices(n)) if index else range(n))
    return np.asarray(sorted(rows), dtype=np.int64)


def opt_state_shardings(optimizer, opt_state, params_shardings, mesh: Mesh):
    """Optimizer-state leaves that mirror a param (Adam's mu, nu) take its sharding; the rest replicate."""
    import optax  # noqa: PLC0415

    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, params_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
