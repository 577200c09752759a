"""RMSNorm and the gated grouped RMSNorm of the Mamba-2 mixer (both computed in fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.layers.common import param


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis; plain scale, no +1 offset."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), (axis_name,), decay=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def gated_group_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, *, groups: int, eps: float) -> jax.Array:
    """norm_before_gate=False: gate first (y * silu(z)), then RMSNorm within each of `groups` channel groups."""
    d = y.shape[-1]
    if d % groups:
        raise ValueError(f"gated norm: {d} channels do not split into {groups} groups")
    g32 = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    g32 = g32.reshape(*g32.shape[:-1], groups, d // groups)
    g32 = g32 * jax.lax.rsqrt(jnp.mean(jnp.square(g32), axis=-1, keepdims=True) + eps)
    out = g32.reshape(*y.shape) * weight.astype(jnp.float32)
    return out.astype(y.dtype)


class GatedGroupRMSNorm(nnx.Module):
    def __init__(self, dim: int, *, groups: int, eps: float, param_dtype=jnp.float32):
        self.groups, self.eps = groups, eps
        self.weight = param(jnp.ones((dim,), param_dtype), ("mamba_inner",), decay=False)

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        return gated_group_rms_norm(y, z, self.weight[...], groups=self.groups, eps=self.eps)
