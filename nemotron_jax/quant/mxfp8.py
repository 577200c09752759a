"""MXFP8 (OCP Microscaling) reference: E4M3 elements, 32-element blocks along the last axis, E8M0 scales.

Used for the Mamba ``out_proj`` under the NVFP4 policy (spec section 4, "What stays in high precision").

    amax_b  = max|x| over the 32-block
    e_b     = clip(floor(log2(amax_b)) - 8, -126, 127)    (8 = emax of E4M3; amax_b = 0 -> -126)
    scale_b = 2**e_b                                        (power of two: exact to apply)
    codes   = e4m3_RNE(clip(x / scale_b, -448, 448))         (clip first: e4m3fn casts do not saturate)
    x_hat   = codes * scale_b

The OCP E8M0 range reaches 2**-127; we clip at 2**-126 because XLA flushes fp32 subnormals to zero on CPU
and GPU (a 2**-127 scale would become 0). NaN in a block makes that block's output NaN; +-inf makes its
block amax inf, the exponent clips at 127 and the inf saturates to +-448 * 2**127 (overflows to inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.quant.nvfp4 import e4m3_rne, round_nearest_even_fp

MX_BLOCK = 32
E4M3_MAX = 448.0
E4M3_EMAX = 8
SCALE_EXP_MIN, SCALE_EXP_MAX = -126, 127


def _check(shape) -> None:
    if not shape or shape[-1] % MX_BLOCK:
        raise ValueError(f"mxfp8: last axis of shape {tuple(shape)} must be a multiple of {MX_BLOCK}; "
                         f"zero-pad it first")


def _pow2(e: jax.Array) -> jax.Array:
    """2**e for integer e in [-126, 127], exactly, from the fp32 exponent bits."""
    return jax.lax.bitcast_convert_type(((e + 127).astype(jnp.uint32) << 23), jnp.float32)


def _scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x / scale_b clipped to +-448, as fp32 blocks [..., K/32, 32]; scale exponents int32 [..., K/32])."""
    _check(x.shape)
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    _, ex = jnp.frexp(amax)  # amax = m * 2**ex, m in [0.5, 1): floor(log2 amax) = ex - 1
    e = jnp.where(amax > 0, ex - 1 - E4M3_EMAX, SCALE_EXP_MIN)
    e = jnp.where(jnp.isinf(amax), SCALE_EXP_MAX, e)
    e = jnp.clip(e, SCALE_EXP_MIN, SCALE_EXP_MAX).astype(jnp.int32)
    y = xb * _pow2(-e)[..., None]  # e >= -126 means -e <= 126: in range
    return jnp.clip(y, -E4M3_MAX, E4M3_MAX), e


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (codes float8_e4m3fn of x's shape, scale exponents int32 [..., K/32])."""
    y, e = _scaled(x)
    return e4m3_rne(y).reshape(x.shape), e


def qdq_values(x: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """dequantize(*quantize(x), dtype) bit for bit, without the float8 round trip (a slow convert on CPU): the
    E4M3 value is held in fp32 (exact) and multiplied by the same power of two. Exact in bf16."""
    y, e = _scaled(x)
    v = round_nearest_even_fp(y, 3, -6) * _pow2(e)[..., None]
    return v.reshape(x.shape).astype(dtype)


def dequantize(codes: jax.Array, exps: jax.Array, dtype=jnp.float32) -> jax.Array:
    cb = codes.astype(jnp.float32).reshape(*codes.shape[:-1], codes.shape[-1] // MX_BLOCK, MX_BLOCK)
    return (cb * _pow2(exps)[..., None]).reshape(codes.shape).astype(dtype)


def e8m0_scales(exps: jax.Array) -> jax.Array:
    """The scale exponents as OCP E8M0 values (float8_e8m0fnu)."""
    return _pow2(exps).astype(jnp.float8_e8m0fnu)


def qdq(x: jax.Array) -> jax.Array:
    """MXFP8 quantize-dequantize along the last axis; same shape and dtype as x."""
    codes, e = quantize(x)
    return dequantize(codes, e, x.dtype)
