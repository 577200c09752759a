"""Pallas kernel: y = x @ W.T with W an NVFP4 matrix kept packed (ModelOpt's layout), dequantized tile by tile
in registers inside the kernel. Arrays in, arrays out; the jnp reference and the dispatch (which asks
`supports` once per call and says whether to interpret) are in nemotron_jax/quant/packed.py.

Inputs: x [M, K] (fp32 / bf16 / fp16, the compute dtype); codes uint8 [N, K/2] (element 2j in the low nibble,
2j+1 in the high nibble); scales uint8 [N, K/16] (the bytes of the float8_e4m3fn block scales); scale_2 fp32
[1]. Value of W[n, k] = E2M1(code) * (f32(scale[n, k // 16]) * scale_2), computed in fp32 in that order (the
reference's and ModelOpt's), then cast to x's dtype, so each dequantized weight equals the reference's bit for
bit. Both formats are decoded with integer and select arithmetic (no table gather, no float8 type), which
every Pallas backend lowers: E2M1 magnitude index m = 2e + b -> b / 2 for e = 0, else (2 + b) * 2^(e - 2);
code 8 (-0) gives +0. E4M3 byte (s, e, m) -> (e ? 8 + m : m) * 2^(max(e, 1) - 10), the power of two built
from its exponent bits (the NaN byte 0x7F/0xFF is not decoded as NaN: ModelOpt never writes it and the loader
refuses it).

Grid (M / bm, N / bn); each program loops over K in steps of bk: loads x [bm, bk], codes [bn, bk/2], scales
[bn, bk/16], unpacks (join of low and high nibbles: the interleave), scales, and accumulates
dot(x, w.T) in fp32 (precision HIGHEST for fp32 inputs, so no TF32), then rounds once to x's dtype. All tile
sizes are powers of two (Triton's requirement); M is padded to a multiple of bm by the wrapper (decode's
M = 1 runs as one 16-row tile).

Numerics against the reference (jnp.dot of x and the dequantized W in x's dtype): the products are the same,
only the order of the fp32 accumulation differs (K tiles of bk here, the backend's blocking there), so the
two agree within the usual summation bound |dy| <= 2 * K * 2^-24 * (|x| @ |W|.T) before the final rounding,
plus one unit of the output dtype's last place where that rounding lands on different sides; they agree bit
for bit when every partial sum is exact (tests/pallas_kernels/test_nvfp4_matmul.py checks both).
Until run on a GPU the kernel is checked in interpret mode on CPU and by cross-lowering to Triton IR.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.nvfp4 import pow2_divisor

_GROUP = 16
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def block_sizes(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(bm, bn, bk): bn and bk the largest power-of-two divisors of N (<= 128) and K (<= 256); bm a power of
    two in [16, 64] covering small M (the wrapper pads M to a multiple of bm)."""
    return min(64, max(16, _next_pow2(m))), pow2_divisor(n, 128), pow2_divisor(k, 256)


def supports(x_shape, n: int, dtype) -> bool:
    """x [M, K] against a packed [N, K]: fp32/bf16/fp16 x, K a multiple of 16 (one block scale per 16 inputs,
    and the dot's minimum depth), N a multiple of 16 (the dot's minimum width), indices within int32."""
    x_shape = tuple(x_shape)
    if len(x_shape) != 2 or jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        return False
    m, k = x_shape
    if m < 1 or k < _GROUP or n < 16 or k % _GROUP or n % 16:
        return False
    bm = block_sizes(m, n, k)[0]
    return max(-(-m // bm) * bm * k, n * k) < 2 ** 31


def _e2m1(code):
    """E2M1 code (int32, 0..15) -> fp32 value; code 8 (-0) -> +0."""
    mi = code & 7
    e, b = mi >> 1, (mi & 1).astype(jnp.float32)
    p2 = jnp.where(e == 1, jnp.float32(0.5), jnp.where(e == 2, jnp.float32(1.0), jnp.float32(2.0)))
    mag = jnp.where(e == 0, b * jnp.float32(0.5), (jnp.float32(2.0) + b) * p2)
    return jnp.where(code > 8, -mag, mag)


def _e4m3(byte):
    """float8_e4m3fn byte (int32, 0..255) -> fp32 value (exact; NaN bytes not special-cased)."""
    e = (byte >> 3) & 0xF
    m = (byte & 7).astype(jnp.float32)
    p2 = jax.lax.bitcast_convert_type(((jnp.maximum(e, 1) - 10 + 127) << 23).astype(jnp.int32), jnp.float32)
    mag = jnp.where(e == 0, m, jnp.float32(8.0) + m) * p2
    return jnp.where((byte & 0x80) != 0, -mag, mag)


def _kernel(s2_ref, x_ref, c_ref, s_ref, o_ref, *, bk: int, nk: int, precision):
    bm, bn = o_ref.shape
    s2 = s2_ref[0]

    def step(kk, acc):
        x = x_ref[:, pl.ds(kk * bk, bk)]                                    # [bm, bk]
        c = c_ref[:, pl.ds(kk * (bk // 2), bk // 2)].astype(jnp.int32)     # [bn, bk/2]
        s = s_ref[:, pl.ds(kk * (bk // _GROUP), bk // _GROUP)].astype(jnp.int32)  # [bn, bk/16]
        v = jnp.stack([_e2m1(c & 0xF), _e2m1(c >> 4)], axis=-1).reshape(bn, bk)  # 2j low, 2j+1 high
        blk = _e4m3(s) * s2                                                   # f32(scale) * scale_2
        blk = jnp.broadcast_to(blk[:, :, None], (bn, bk // _GROUP, _GROUP)).reshape(bn, bk)
        w = (v * blk).astype(x.dtype)
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, nk, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def nvfp4_matmul(x: jax.Array, codes: jax.Array, scales_u8: jax.Array, scale_2: jax.Array, *, out_dtype=None,
                 interpret: bool = False, blocks: tuple[int, int, int] | None = None) -> jax.Array:
    """y [M, N] = x [M, K] @ W.T, W [N, K] given packed (codes uint8 [N, K/2], scales uint8 [N, K/16] holding
    E4M3 bytes, scale_2 fp32 [1]); for shapes `supports` accepts (not checked again: the dispatch in
    nemotron_jax.quant.packed asks once per call). ``interpret``: the caller decides. ``blocks``: (bm, bn, bk)
    override (powers of two dividing the padded M, N and K; bk a multiple of 16)."""
    m, k = x.shape
    n = codes.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    bm, bn, bk = blocks if blocks is not None else block_sizes(m, n, k)
    mp = -(-m // bm) * bm
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(x.dtype) == jnp.float32 else None
    y = pl.pallas_call(
        functools.partial(_kernel, bk=bk, nk=k // bk, precision=precision),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(mp // bm, n // bn),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)),
                  pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, k // 2), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, k // _GROUP), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
    )(scale_2.astype(jnp.float32).reshape(1), x, codes, scales_u8)
    return y[:m] if mp != m else y
