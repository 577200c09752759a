"""NVFP4 quantization: jnp reference (spec section 4, "Format", "Two-level scale", "Rounding", "RHT definition").

Shapes: blocks run along the last axis (``block=(1, 16)``: 16 consecutive elements of the last axis) or over
16x16 tiles of the last two axes (``block=(16, 16)``); leading axes are batch. A last axis (or last two axes
for 16x16) that is not a multiple of 16 raises ``ValueError``; callers that need it pad with zeros (zeros
change neither the tensor amax nor any block amax, so padding never changes the other values' quantization).

Numerics (every step in fp32, in this order, so the Pallas kernel can match bit for bit):

    amax   = max|x|                          (after the RHT when hadamard=True), or the ``amax`` argument
    S_enc  = min(6*448 / amax, FLT_MAX);  1 if amax == 0 or S_enc == 0 (amax = inf)
    S_dec  = 1 / S_enc
    s_b    = e4m3_RNE(min(amax_b / 6 * S_enc, 448))      (clipped first: float8_e4m3fn casts do not saturate)
    e_b    = min(1 / (fp32(s_b) * S_dec), FLT_MAX)       (an all-zero block has s_b = 0, e_b = FLT_MAX)
    codes  = round_E2M1(clamp(x * e_b, -6, 6))             (nearest-even, or stochastic)
    x_hat  = (codes * s_b) * S_dec                         (codes*s_b is exact; one rounding, then to dtype)

Non-finite inputs (documented, tested):
  * NaN anywhere makes amax NaN, so ``tensor_scale`` is NaN and the whole dequantized tensor is NaN: a
    diverged step stays loud instead of being silently zeroed.
  * +-inf (no NaN) makes S_enc = 6*448/inf = 0, which the rule above replaces by 1; the inf saturates to
    +-6 * 448 = +-2688 and finite values are quantized with S_enc = 1 (coarse, but finite).
fp32 subnormals are flushed to zero by XLA on CPU and GPU, so inputs below ~1.2e-38 act as zeros.

Stochastic rounding: for |y| = |x * e_b| in [0, 6] let ``step`` be the E2M1 spacing at |y| (0.5 below 2,
1 below 4, 2 above), ``lo = floor(|y| / step) * step``; round up to ``lo + step`` iff
``u * step < |y| - lo`` with ``u = (bits >> 8) * 2**-24``, one uint32 of random bits per element. Every
quantity in that comparison is exact in fp32, so P(up) = (|y| - lo) / step up to the 2**-24 grid of u: the
result is one of the two neighbouring grid values and unbiased. The sign is copied back afterwards.

RHT: ``M = diag(s) @ H16 / 4`` (Sylvester Hadamard, fixed sign vector s of the spec), applied to every
contiguous 16-chunk of the last axis as ``x_blk @ M``; M is orthogonal, so ``rht_inverse`` (``@ M.T``)
undoes it and the transform cancels in a product of two operands rotated along the reduction axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

E2M1_MAX = 6.0
E4M3_MAX = 448.0
FLT_MAX = float(np.finfo(np.float32).max)
BLOCK = 16
BLOCKS = ((1, 16), (16, 16))
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Fixed RHT sign vector (spec section 4, "RHT definition").
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard16() -> np.ndarray:
    """Sylvester Hadamard matrix H16 (entries +-1), numpy float32."""
    h = np.ones((1, 1), np.float32)
    for _ in range(4):
        h = np.block([[h, h], [h, -h]])
    return h


def rht_matrix() -> np.ndarray:
    """M = diag(s) @ H16 / 4 (orthogonal: M @ M.T = I), numpy float32; entries are exactly +-1/4."""
    return (np.diag(np.asarray(RHT_SIGNS, np.float32)) @ hadamard16() / 4.0).astype(np.float32)


def rht(x: jax.Array) -> jax.Array:
    """x_blk @ M for every 16-chunk of the last axis, in fp32 (exact fp32 dot, independent of the global
    matmul-precision flag)."""
    _check_last(x.shape, 1, "rht")
    xb = x.astype(jnp.float32).reshape(-1, BLOCK)
    y = jnp.dot(xb, jnp.asarray(rht_matrix()), precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)
    return y.reshape(x.shape)


def rht_inverse(x: jax.Array) -> jax.Array:
    """Inverse of ``rht`` (x_blk @ M.T)."""
    _check_last(x.shape, 1, "rht_inverse")
    xb = x.astype(jnp.float32).reshape(-1, BLOCK)
    y = jnp.dot(xb, jnp.asarray(rht_matrix().T), precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)
    return y.reshape(x.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4-quantized array.

    codes:        float4_e2m1fn, the shape of the input.
    block_scales: float8_e4m3fn; (1,16): [..., K/16]; (16,16): [..., M/16, K/16].
    tensor_scale: fp32 scalar, the decode scale S_dec.
    block, hadamard: static; ``hadamard=True`` means codes hold the RHT-rotated tensor (dequantize
    returns the rotated values; apply ``rht_inverse`` to get back to the original basis).
    """

    codes: jax.Array
    block_scales: jax.Array
    tensor_scale: jax.Array
    block: tuple[int, int] = dataclasses.field(default=(1, 16), metadata=dict(static=True))
    hadamard: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape


def _check_last(shape, nlast: int, what: str) -> None:
    if len(shape) < nlast:
        raise ValueError(f"{what}: needs at least {nlast} axes, got shape {shape}")
    for ax in range(len(shape) - nlast, len(shape)):
        if shape[ax] % BLOCK:
            raise ValueError(
                f"{what}: axis {ax} of shape {tuple(shape)} has size {shape[ax]}, not a multiple of {BLOCK}; "
                f"NVFP4 blocks are 16 wide: zero-pad that axis to a multiple of 16 first (zeros do not change "
                f"the quantization of the other values)")


def _check_block(block) -> tuple[int, int]:
    block = tuple(block)
    if block not in BLOCKS:
        raise ValueError(f"block={block}: NVFP4 supports (1, 16) (along the last axis) or (16, 16) tiles")
    return block


def tensor_scales(amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(S_enc, S_dec) from the tensor amax, fp32 scalars (TE rule: inf/zero degenerate cases give 1)."""
    amax = jnp.asarray(amax, jnp.float32)
    s_enc = jnp.minimum(jnp.float32(E2M1_MAX * E4M3_MAX) / amax, jnp.float32(FLT_MAX))
    s_enc = jnp.where((amax == 0) | (s_enc == 0), jnp.float32(1.0), s_enc)
    return s_enc, jnp.float32(1.0) / s_enc


def round_nearest_even_fp(v: jax.Array, mbits: int, emin: int) -> jax.Array:
    """Round fp32 v (finite, within the target's range) to the nearest value of a float format with
    ``mbits`` mantissa bits and minimum normal exponent ``emin`` (subnormals included), ties to even;
    returns fp32 holding an exactly representable value.

    Why not just ``astype``: XLA's CPU f32 -> float4_e2m1fn convert, inside some fusions, rounds twice
    (through f16), e.g. -0.74988323 becomes -1 instead of -0.5. Here the spacing ``step`` of the target
    grid at |v| is a power of two built from the exponent bits, so ``round(v / step) * step`` is exact.
    """
    a = jnp.abs(v)
    e = ((jax.lax.bitcast_convert_type(a, jnp.uint32) >> jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    e = jnp.maximum(e - 127, emin)  # floor(log2 |v|), held at emin in the subnormal range
    step = jax.lax.bitcast_convert_type(((e - mbits + 127).astype(jnp.uint32) << jnp.uint32(23)), jnp.float32)
    return jnp.round(v / step) * step  # jnp.round: half to even; v/step and *step are exact


def e4m3_rne(v: jax.Array) -> jax.Array:
    """fp32 in [-448, 448] -> float8_e4m3fn, round-to-nearest-even (exact; see round_nearest_even_fp)."""
    return round_nearest_even_fp(v, 3, -6).astype(jnp.float8_e4m3fn)


def block_scale_from_amax(amax_b: jax.Array, s_enc: jax.Array) -> jax.Array:
    """s_b = e4m3_RNE(min(amax_b / 6 * S_enc, 448)), returned as float8_e4m3fn."""
    s = jnp.minimum(amax_b / jnp.float32(E2M1_MAX) * s_enc, jnp.float32(E4M3_MAX))
    return e4m3_rne(s)


def encode_scale(s_b: jax.Array, s_dec: jax.Array) -> jax.Array:
    """e_b = min(1 / (fp32(s_b) * S_dec), FLT_MAX)."""
    return jnp.minimum(jnp.float32(1.0) / (s_b.astype(jnp.float32) * s_dec), jnp.float32(FLT_MAX))


def round_e2m1_nearest(y: jax.Array) -> jax.Array:
    """Round fp32 values in [-6, 6] to E2M1, nearest-even (what a correct float4_e2m1fn cast does)."""
    return round_nearest_even_fp(y, 1, 0).astype(jnp.float4_e2m1fn)


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 -> fp32 uniform in [0, 1) on a 2**-24 grid (exact)."""
    return (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def round_e2m1_stochastic(y: jax.Array, bits: jax.Array) -> jax.Array:
    """Stochastically round fp32 values in [-6, 6] to one of their two neighbouring E2M1 values."""
    a = jnp.abs(y)
    step = jnp.where(a < 2.0, jnp.float32(0.5), jnp.where(a < 4.0, jnp.float32(1.0), jnp.float32(2.0)))
    lo = jnp.floor(a / step) * step  # exact: step is a power of two
    up = uniform_from_bits(bits) * step < (a - lo)
    mag = jnp.minimum(jnp.where(up, lo + step, lo), jnp.float32(E2M1_MAX))
    return jnp.where(jnp.signbit(y), -mag, mag).astype(jnp.float4_e2m1fn)


def blocked(x: jax.Array, block) -> jax.Array:
    """View x as [..., nb(, 16), 16]-blocks: (1,16) -> [..., K/16, 16]; (16,16) -> [..., M/16, 16, K/16, 16]."""
    if block == (1, 16):
        return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    *lead, m, k = x.shape
    return x.reshape(*lead, m // BLOCK, BLOCK, k // BLOCK, BLOCK)


def _block_amax(xb: jax.Array, block) -> jax.Array:
    """Block amax, keepdims (broadcastable against ``blocked`` view)."""
    axes = (-1,) if block == (1, 16) else (-3, -1)
    return jnp.max(jnp.abs(xb), axis=axes, keepdims=True)


def _squeeze_scales(s: jax.Array, block) -> jax.Array:
    return s[..., 0] if block == (1, 16) else s[..., 0, :, 0]


def _expand_scales(s: jax.Array, block) -> jax.Array:
    return s[..., None] if block == (1, 16) else s[..., :, None, :, None]


def random_bits(key: jax.Array, shape) -> jax.Array:
    """The uint32 random bits stochastic rounding draws from ``key`` (shared with the Pallas dispatch)."""
    return jax.random.bits(key, tuple(shape), jnp.uint32)


@functools.partial(jax.jit, static_argnames=("block", "rounding", "hadamard"))
def quantize(x: jax.Array, *, block=(1, 16), rounding: str = "nearest", key: jax.Array | None = None,
             bits: jax.Array | None = None, hadamard: bool = False, amax: jax.Array | None = None) -> NVFP4Tensor:
    """Quantize x to NVFP4 (see the module docstring for the exact numerics).

    rounding: "nearest" (round-to-nearest-even) or "stochastic" (needs ``key`` or ``bits``: uint32 of x's shape).
    hadamard: apply the 16x16 RHT to each 16-chunk of the last axis first (the codes hold rotated values).
    amax: optional tensor amax to use instead of max|x| (e.g. one scale shared by several pieces of a tensor).
    """
    block = _check_block(block)
    _check_last(x.shape, 1 if block == (1, 16) else 2, "nvfp4.quantize")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'stochastic'")
    x32 = rht(x) if hadamard else x.astype(jnp.float32)
    if rounding == "stochastic":
        if bits is None:
            if key is None:
                raise ValueError("rounding='stochastic' needs key= (a PRNG key) or bits= (uint32, x's shape)")
            bits = random_bits(key, x.shape)
        if bits.shape != x.shape or bits.dtype != jnp.uint32:
            raise ValueError(f"bits must be uint32 of shape {x.shape}, got {bits.dtype}{bits.shape}")
    amax = jnp.max(jnp.abs(x32)) if amax is None else jnp.asarray(amax, jnp.float32)
    s_enc, s_dec = tensor_scales(amax)
    xb = blocked(x32, block)
    s_b = block_scale_from_amax(_block_amax(xb, block), s_enc)
    y = jnp.clip(xb * encode_scale(s_b, s_dec), -E2M1_MAX, E2M1_MAX)
    if rounding == "nearest":
        q = round_e2m1_nearest(y)
    else:
        q = round_e2m1_stochastic(y, blocked(bits, block))
    return NVFP4Tensor(codes=q.reshape(x.shape), block_scales=_squeeze_scales(s_b, block),
                       tensor_scale=s_dec, block=block, hadamard=hadamard)


def dequantize(q: NVFP4Tensor, dtype: Any = jnp.float32, *, apply_tensor_scale: bool = True) -> jax.Array:
    """x_hat = (codes * s_b) * S_dec, cast to dtype. ``apply_tensor_scale=False`` returns codes * s_b, which is
    exact in bf16 (2 + 4 significant bits): a GEMM on it with fp32 accumulation, times S_dec,A * S_dec,B, is
    how the tensor core applies the scales."""
    cb = blocked(q.codes.astype(jnp.float32), q.block)
    v = cb * _expand_scales(q.block_scales.astype(jnp.float32), q.block)
    if apply_tensor_scale:
        v = v * q.tensor_scale
    return v.reshape(q.codes.shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block", "rounding", "hadamard"))
def qdq(x: jax.Array, *, block=(1, 16), rounding: str = "nearest", key: jax.Array | None = None,
        bits: jax.Array | None = None, hadamard: bool = False, amax: jax.Array | None = None) -> jax.Array:
    """quantize then dequantize; same shape and dtype as x (rotated basis when hadamard=True)."""
    q = quantize(x, block=block, rounding=rounding, key=key, bits=bits, hadamard=hadamard, amax=amax)
    return dequantize(q, x.dtype)


def flush_to_zero_fraction(x: jax.Array, xq: jax.Array) -> jax.Array:
    """Fraction of the non-zero entries of x whose quantized value is zero."""
    nz = x != 0
    return jnp.sum(nz & (xq == 0)) / jnp.maximum(jnp.sum(nz), 1)
