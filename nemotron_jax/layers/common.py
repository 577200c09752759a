"""Parameters with logical axis names, and the plain linear every layer builds on."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Sharding is decided later from these names (nemotron_jax.sharding); creating a param never shards eagerly.
Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Sequence[str | None], *, decay: bool = True) -> nnx.Param:
    """An nnx.Param whose metadata carries its logical axis names (one per dim) and its role for the optimizer.

    decay=False: no weight decay (Mamba's per-head dynamics, norm scales, biases). The optimizer reads this
    metadata (`train.optim.weight_decay_mask`), never the parameter's name.
    """
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"param of shape {value.shape} needs {value.ndim} axis names, got {axes}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, decay=decay)


def normal_init(std: float) -> Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]:
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)
    return init


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Linear(nnx.Module):
    """y = x @ W (+ b); W is [in, out] fp32 master, cast to the compute dtype at call time.

    `matmul` lets a precision policy swap the GEMM (e.g. NVFP4 emulation) without the layer knowing.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 rngs: nnx.Rngs, std: float = 0.02, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(normal_init(std)(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],), decay=False) if use_bias else None
        self.matmul = None  # set by the precision policy: fn(x, w) -> y

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        y = self.matmul(x, w) if self.matmul is not None else jnp.einsum("...i,io->...o", x, w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
