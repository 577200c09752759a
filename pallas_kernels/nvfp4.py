"""Pallas kernels: fused NVFP4 quantize-dequantize (QDQ), 1x16 and 16x16 blocks, nearest or stochastic
rounding, optional fused 16x16 RHT. Arrays in, arrays out; the jnp reference is nemotron_jax/quant/nvfp4.py
and the dispatch (which asks `supports` once per call and says whether to interpret) is
nemotron_jax.quant.qdq(impl=...).

Layout: x [..., K] is viewed (free reshape) as [R, K/16, 16] with R = prod(leading axes); a grid step owns a
(br, bc, 16) tile: br rows by bc 16-blocks. For 16x16 tiles br = 16 (K and the second-to-last axis must be
multiples of 16, so a tile never crosses a batch boundary) and the block amax reduces over axes (0, 2).
The tensor amax (after the RHT, if any) is a separate jnp pass; the kernel receives (S_enc, S_dec).

Random bits for stochastic rounding: either a uint32 array of x's shape (``bits=``, shared with the
reference so both give identical output) or a ``seed`` from which the kernel derives bits with a
counter-based hash of (seed, flat element index); ``hash_bits(seed, shape)`` is the same hash in jnp.

Numerics replicate the reference (and so TransformerEngine's reference quantizer; see
docs/nvfp4_numerics.md) step by step in fp32, written out again here, not imported, so the bit-for-bit tests
compare two independent implementations:
  * the block-scale multiplier S_enc * fp32(1/6) is computed once, outside the kernel, behind an
    optimization barrier, and passed in; the kernel does the single product amax_b * mult (TE's order);
  * the RHT is a running fp32 sum over the 16 exact products x_k * (+-1/4) in index order (not a dot, whose
    reduction order is the backend's), rounded to the input dtype for bf16/fp16 inputs (TE rotates in the
    input dtype);
  * a zero of either sign gets code 0x0 (+0), as TE.
  * the one real fp32 division (e_b = 1 / (s_b * S_dec)) is IEEE: compiled for a GPU it is PTX div.rn.f32,
    inlined, because Pallas' Triton lowering emits the approximate div.full.f32; the divisions by powers of
    two are multiplications by exact reciprocals; round-half-even is floor plus a parity test (Triton has
    no round primitive). Fused multiply-adds (Triton contracts by default) only touch exact products.
benchmarks/gpu_nvfp4.sh checks the compiled kernel against TE's goldens and the reference on a GPU;
tests/pallas_kernels/test_nvfp4.py cross-lowers it to Triton IR for an abstract H200 without one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_B = 16
_FLT_MAX = float(np.finfo(np.float32).max)
_INV6 = float(np.float32(1.0) / np.float32(6.0))  # fp32(1/6), TE's torch.reciprocal(6.0)
_SIGNS = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], np.float32)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _rht_np() -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    for _ in range(4):
        h = np.block([[h, h], [h, -h]])
    return (np.diag(_SIGNS) @ h / 4.0).astype(np.float32)


def supports(shape, dtype, block=(1, 16)) -> bool:
    """True when the kernel handles this input: fp32/bf16/fp16, last axis (and the second-to-last for
    16x16) a multiple of 16, fewer than 2**32 elements (the in-kernel counter is 32-bit)."""
    shape = tuple(shape)
    block = tuple(block)
    if block not in ((1, 16), (16, 16)) or jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        return False
    nlast = 1 if block == (1, 16) else 2
    if len(shape) < nlast or any(s % _B for s in shape[-nlast:]) or 0 in shape:
        return False
    return math.prod(shape) < 2 ** 32


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap (a block size that tiles n exactly)."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


# ---------------------------------------------------------------- counter-based random bits
def _mix32(h):
    """lowbias32 finaliser: a bijection on uint32 with good avalanche."""
    h = h ^ (h >> jnp.uint32(16))
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> jnp.uint32(15))
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> jnp.uint32(16))


def _hash(seed_u32, idx_u32):
    return _mix32(_mix32(idx_u32) + _mix32(seed_u32 ^ jnp.uint32(0x9E3779B9)))


def hash_bits(seed, shape) -> jax.Array:
    """uint32 bits the kernel generates from ``seed`` for an input of ``shape`` (row-major element index as
    the counter). Not cryptographic; good enough to decorrelate rounding decisions."""
    n = math.prod(shape)
    idx = jnp.arange(n, dtype=jnp.uint32)
    return _hash(jnp.asarray(seed, jnp.uint32), idx).reshape(shape)


def _rne(v, mbits: int, emin: int):
    """Exact round-to-nearest-even of fp32 v onto a float grid (mbits mantissa bits, min exponent emin),
    from the exponent bits: XLA's CPU f32 -> f4/f8 converts can round twice inside fusions. |v| / step is
    exact and below 2**(mbits + 1), so the tie-to-even is decided with floor and the parity of the integer
    part (Pallas' Triton lowering has no round primitive). The sign, signed zeros included, is v's."""
    a = jnp.abs(v)
    e = ((jax.lax.bitcast_convert_type(a, jnp.uint32) >> jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    e = jnp.maximum(e - 127, emin)
    step = jax.lax.bitcast_convert_type(((e - mbits + 127).astype(jnp.uint32) << jnp.uint32(23)), jnp.float32)
    inv = jax.lax.bitcast_convert_type(((mbits - e + 127).astype(jnp.uint32) << jnp.uint32(23)), jnp.float32)
    t = a * inv  # = a / step, exact (a power of two; no division, which Triton compiles approximately)
    fl = jnp.floor(t)
    frac = t - fl  # exact
    odd = (fl.astype(jnp.int32) & 1) == 1
    mag = jnp.where((frac > 0.5) | ((frac == 0.5) & odd), fl + 1.0, fl) * step
    return jnp.where(jnp.signbit(v), -mag, mag)


def _div_rn(num, den, interpret: bool):
    """IEEE fp32 division (round to nearest even). Compiled for a GPU, Pallas' Triton lowering emits an
    approximate fp32 divide (PTX div.full.f32, up to 2 ulp), so there the exact PTX instruction is inlined;
    the interpreter (and XLA) divide exactly already."""
    num, den = jnp.broadcast_arrays(num, den)
    if interpret:
        return num / den
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 - only for a compiled GPU kernel
    [out] = pltriton.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[num, den], constraints="=f,f,f",
                                            pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(num.shape, num.dtype)])
    return out


def _round_to(v, dtype):
    """fp32 v rounded nearest-even to bf16 / fp16 values, kept in fp32 (fp32: unchanged). Not a convert pair:
    XLA (xla_allow_excess_precision, on by default) may delete f32 -> bf16 -> f32 and skip the rounding."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        b = jax.lax.bitcast_convert_type(v, jnp.uint32)
        b = (b + jnp.uint32(0x7FFF) + ((b >> jnp.uint32(16)) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
        return jnp.where(v != v, v, jax.lax.bitcast_convert_type(b, jnp.float32))
    if jnp.dtype(dtype) == jnp.dtype(jnp.float16):
        r = _rne(v, 10, -14)
        return jnp.where(jnp.abs(r) > jnp.float32(65504.0), v * jnp.float32(np.inf), r)
    return v


# ---------------------------------------------------------------- the kernel
def _kernel(*refs, two_d: bool, rounding: str, bit_src: str, hadamard: bool, nb: int, apply_tensor_scale: bool,
            interpret: bool):
    it = iter(refs)
    x_ref = next(it)
    sc_ref = next(it)
    m_ref = next(it) if hadamard else None
    bits_ref = next(it) if bit_src == "array" else None
    seed_ref = next(it) if bit_src == "seed" else None
    y_ref, s_ref = next(it), next(it)

    x = x_ref[...].astype(jnp.float32)  # (br, bc, 16)
    br, bc, _ = x.shape
    if hadamard:
        # out_j = sum_k x_k * M[k, j], running fp32 sum in k order; column k of x is picked with a one-hot
        # sum (exact: one value plus zeros), which every Pallas backend lowers (no lane slicing needed)
        lane = jax.lax.broadcasted_iota(jnp.int32, (br, bc, _B), 2)
        acc = None
        for k in range(_B):
            xk = jnp.sum(jnp.where(lane == k, x, jnp.float32(0.0)), axis=2, keepdims=True)
            term = xk * m_ref[k, :]
            acc = term if acc is None else acc + term
        x = _round_to(acc, x_ref.dtype)  # TE rotates in the input dtype
    s_dec = sc_ref[1]
    mult = sc_ref[2]  # S_enc * fp32(1/6), computed outside the kernel
    amax_b = jnp.max(jnp.abs(x), axis=2, keepdims=True)
    if two_d:  # one axis at a time (max is exact in any order; Triton's lowering reduces one axis per op)
        amax_b = jnp.max(amax_b, axis=0, keepdims=True)
    s_b = jnp.minimum(amax_b * mult, jnp.float32(448.0))
    s_b = _rne(s_b, 3, -6)  # e4m3 value, held in fp32
    e_b = jnp.minimum(_div_rn(jnp.float32(1.0), s_b * s_dec, interpret), jnp.float32(_FLT_MAX))
    y = jnp.abs(jnp.clip(x * e_b, -6.0, 6.0))
    y = jnp.where(x < 0, -y, y)  # TE's zero sign: negative iff x < 0 (an input -0.0 gives +0, code 0x0)
    if rounding == "nearest":
        q = _rne(y, 1, 0)  # E2M1 value, held in fp32
    else:
        if bit_src == "array":
            bits = bits_ref[...]
        else:
            i, j = pl.program_id(0), pl.program_id(1)
            r = jax.lax.broadcasted_iota(jnp.uint32, (br, bc, _B), 0) + (i * br).astype(jnp.uint32)
            b = jax.lax.broadcasted_iota(jnp.uint32, (br, bc, _B), 1) + (j * bc).astype(jnp.uint32)
            e = jax.lax.broadcasted_iota(jnp.uint32, (br, bc, _B), 2)
            bits = _hash(seed_ref[0], (r * jnp.uint32(nb) + b) * jnp.uint32(_B) + e)
        a = jnp.abs(y)
        step = jnp.where(a < 2.0, jnp.float32(0.5), jnp.where(a < 4.0, jnp.float32(1.0), jnp.float32(2.0)))
        inv = jnp.where(a < 2.0, jnp.float32(2.0), jnp.where(a < 4.0, jnp.float32(1.0), jnp.float32(0.5)))
        lo = jnp.floor(a * inv) * step  # exact: step and inv are powers of two
        u = (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0 ** -24)
        mag = jnp.minimum(jnp.where(u * step < a - lo, lo + step, lo), jnp.float32(6.0))
        q = jnp.where(jnp.signbit(y), -mag, mag)
    v = q * s_b  # exact
    y_ref[...] = ((v * s_dec) if apply_tensor_scale else v).astype(y_ref.dtype)
    s_ref[...] = s_b


@functools.partial(jax.jit, static_argnames=("block", "rounding", "hadamard", "out_dtype", "interpret",
                                             "block_cols", "apply_tensor_scale"))
def qdq_kernel(x: jax.Array, scales: jax.Array, *, block=(1, 16), rounding: str = "nearest",
               bits: jax.Array | None = None, seed: jax.Array | None = None, hadamard: bool = False,
               out_dtype=None, interpret: bool = False, block_cols: int = 64, apply_tensor_scale: bool = True):
    """Fused NVFP4 QDQ, for inputs `supports` accepts (not checked again here: the dispatch in
    nemotron_jax.quant.dispatch asks once per call). ``interpret``: the caller decides (the kernel never
    asks which platform it is on).

    x: [..., K] (K % 16 == 0; for 16x16 also x.shape[-2] % 16 == 0).
    scales: fp32 [2] = (S_enc, S_dec) from the tensor amax (of the RHT-rotated x when hadamard=True).
    bits: uint32 of x's shape, or seed: uint32 scalar; one of them when rounding == "stochastic".
    Returns (y: x's shape in out_dtype (default x.dtype), block scale values fp32: (1,16) -> [..., K/16],
    (16,16) -> [..., M/16, K/16]). apply_tensor_scale=False returns codes * s_b (exact in bf16), leaving
    the S_dec multiply to the caller (as the tensor core applies it to the GEMM output).
    """
    block = tuple(block)
    two_d = block == (16, 16)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    k = x.shape[-1]
    nb = k // _B
    rows = math.prod(x.shape[:-1])
    x3 = x.reshape(rows, nb, _B)
    br = _B if two_d else pow2_divisor(rows, _B)
    bc = pow2_divisor(nb, block_cols)
    grid = (rows // br, nb // bc)
    tile = pl.BlockSpec((br, bc, _B), lambda i, j: (i, j, 0))
    in_specs = [tile, pl.BlockSpec((4,), lambda i, j: (0,))]
    s_enc_dec = scales.astype(jnp.float32)
    # (S_enc, S_dec, S_enc * fp32(1/6), pad): the multiplier is one fp32 product, pinned so that no compiler
    # folds the constant into the in-kernel multiply by amax_b (TE's order, docs/nvfp4_numerics.md)
    mult = jax.lax.optimization_barrier(s_enc_dec[0] * jnp.float32(_INV6))
    args = [x3, jnp.stack([s_enc_dec[0], s_enc_dec[1], mult, jnp.float32(0.0)])]
    if hadamard:
        in_specs.append(pl.BlockSpec((_B, _B), lambda i, j: (0, 0)))
        args.append(jnp.asarray(_rht_np()))
    bit_src = "none"
    if rounding == "stochastic":
        if bits is not None:
            bit_src = "array"
            in_specs.append(tile)
            args.append(bits.reshape(rows, nb, _B).astype(jnp.uint32))
        elif seed is not None:
            bit_src = "seed"
            in_specs.append(pl.BlockSpec((1,), lambda i, j: (0,)))
            args.append(jnp.asarray(seed, jnp.uint32).reshape(1))
        else:
            raise ValueError("rounding='stochastic' needs bits= or seed=")
    elif rounding != "nearest":
        raise ValueError(f"rounding={rounding!r}")
    srows = rows // _B if two_d else rows
    s_spec = pl.BlockSpec((1 if two_d else br, bc, 1), lambda i, j: (i, j, 0))
    y, s = pl.pallas_call(
        functools.partial(_kernel, two_d=two_d, rounding=rounding, bit_src=bit_src, hadamard=hadamard, nb=nb,
                          apply_tensor_scale=apply_tensor_scale, interpret=interpret),
        out_shape=(jax.ShapeDtypeStruct(x3.shape, out_dtype), jax.ShapeDtypeStruct((srows, nb, 1), jnp.float32)),
        grid=grid, in_specs=in_specs, out_specs=(tile, s_spec), interpret=interpret,
    )(*args)
    y = y.reshape(x.shape)
    if two_d:
        s = s.reshape(*x.shape[:-2], x.shape[-2] // _B, nb)
    else:
        s = s.reshape(*x.shape[:-1], nb)
    return y, s
