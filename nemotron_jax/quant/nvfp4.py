"""NVFP4 quantization: jnp reference (spec section 4, "Format", "Two-level scale", "Rounding", "RHT definition").

Shapes: blocks run along the last axis (``block=(1, 16)``: 16 consecutive elements of the last axis) or over
16x16 tiles of the last two axes (``block=(16, 16)``); leading axes are batch. A last axis (or last two axes
for 16x16) that is not a multiple of 16 raises ``ValueError``; callers that need it pad with zeros (zeros
change neither the tensor amax nor any block amax, so padding never changes the other values' quantization).

Numerics: TransformerEngine's reference quantizer, bit for bit (``NVFP4QuantizerRef`` in TE's
transformer_engine/pytorch/custom_recipes/reference_nvfp4.py; golden data in tests/fixtures/nvfp4_te/, the
order of operations and the TE line each step follows in docs/nvfp4_numerics.md). Every step in fp32, in
this order, so the Pallas kernel can match bit for bit:

    r      = x, or with hadamard=True: per 16-chunk r_j = sum_k x_k * M[k, j] in fp32, k = 0..15 in order,
             then rounded to x's dtype (TE rotates in the input dtype: bf16 in, bf16 rotation out)
    amax   = max|r|                          or the ``amax`` argument
    S_enc  = min(fp32(6*448) / amax, FLT_MAX);  1 if amax == 0 or S_enc == 0 (amax = inf)
    S_dec  = 1 / S_enc
    mult   = S_enc * fp32(1/6)                 (one fp32 product, pinned with an optimization barrier)
    s_b    = e4m3_RNE(min(amax_b * mult, 448))  (clipped first: float8_e4m3fn casts do not saturate)
    e_b    = min(1 / (fp32(s_b) * S_dec), FLT_MAX)       (an all-zero block has s_b = 0, e_b = FLT_MAX)
    codes  = round_E2M1(clamp(r * e_b, -6, 6))  (nearest-even, or stochastic; sign from r: r < 0 gives a
             negative code, -0 = 0x8 if it rounds to zero, and r = +-0 gives 0x0, as TE)
    x_hat  = (codes * s_b) * S_dec               (codes*s_b is exact; one rounding, then to dtype)

Non-finite inputs (documented, tested):
  * NaN anywhere makes amax NaN, so ``tensor_scale`` is NaN and the whole dequantized tensor is NaN: a
    diverged step stays loud instead of being silently zeroed.
  * +-inf (no NaN) makes S_enc = 6*448/inf = 0, which the rule above replaces by 1; the inf saturates to
    +-6 * 448 = +-2688 and finite values are quantized with S_enc = 1 (coarse, but finite).
fp32 subnormals are flushed to zero by XLA on CPU and GPU, so inputs below ~1.2e-38 act as zeros.

Stochastic rounding: for |y| = |x * e_b| in [0, 6] let ``step`` be the E2M1 spacing at |y| (0.5 below 2,
1 below 4, 2 above), ``lo = floor(|y| / step) * step``; round up to ``lo + step`` iff
``u * step < |y| - lo`` with ``u = (bits >> 8) * 2**-24``, one uint32 of random bits per element (from a key:
a counter-based hash of (seed, row-major element index), ``random_bits``; the Pallas kernel hashes the same). Every
quantity in that comparison is exact in fp32, so P(up) = (|y| - lo) / step up to the 2**-24 grid of u: the
result is one of the two neighbouring grid values and unbiased. The sign is copied back afterwards.

RHT: ``M = diag(s) @ H16 / 4`` (Sylvester Hadamard, fixed sign vector s of the spec and of TE's
``get_wgrad_sign_vector``), applied to every contiguous 16-chunk of the last axis as ``x_blk @ M``; M is
orthogonal, so ``rht_inverse`` (``@ M.T``) undoes it and the transform cancels in a product of two operands
rotated along the reduction axis. Each product x_k * (+-1/4) is exact, so only the order of the 16 additions
matters: a running fp32 sum in index order (what torch's CPU matmul in TE's reference does), written out
as 15 elementwise adds (XLA's dot reduces in another order and agrees on only about a third of values).

The all-zero tensor (amax = 0) gets S_enc = 1 as in TE's CUDA kernels (``compute_global_encode_scaling_
factor_FP4``); TE's Python reference gives FLT_MAX there. Codes and block scales are zero either way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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


def _rotate_chunks(x32: jax.Array, m: np.ndarray) -> jax.Array:
    """[..., 16] fp32 -> [..., 16]: out_j = sum_k x_k * m[k, j], a running fp32 sum over k = 0..15 in index
    order (15 elementwise adds, which XLA does not reorder; each product by +-1/4 is exact)."""
    acc = x32[..., 0:1] * jnp.asarray(m[0])
    for k in range(1, BLOCK):
        acc = acc + x32[..., k:k + 1] * jnp.asarray(m[k])
    return acc


def _storage_round(y32: jax.Array, dtype) -> jax.Array:
    """fp32 values rounded (nearest-even) to the values of a narrower input dtype (bf16 or fp16), kept in fp32;
    fp32 unchanged. Written with integer / exact ops, not as ``astype(bf16).astype(f32)``: XLA's default
    ``xla_allow_excess_precision`` lets it delete such a convert pair, which silently skips the rounding."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(jnp.bfloat16):
        b = jax.lax.bitcast_convert_type(y32, jnp.uint32)
        b = (b + jnp.uint32(0x7FFF) + ((b >> jnp.uint32(16)) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
        return jnp.where(jnp.isnan(y32), y32, jax.lax.bitcast_convert_type(b, jnp.float32))
    if dtype == jnp.dtype(jnp.float16):
        r = round_nearest_even_fp(y32, 10, -14)
        return jnp.where(jnp.abs(r) > jnp.float32(65504.0), y32 * jnp.float32(np.inf), r)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        raise ValueError(f"NVFP4 RHT: unsupported input dtype {dtype}; use fp32, bf16 or fp16")
    return y32


def rht(x: jax.Array) -> jax.Array:
    """x_blk @ M for every 16-chunk of the last axis, as TE's reference computes it: an fp32 running sum in
    index order, rounded to x's dtype when x is bf16/fp16 (TE rotates in the input dtype). Returned as fp32."""
    _check_last(x.shape, 1, "rht")
    xb = x.astype(jnp.float32).reshape(-1, BLOCK)
    return _storage_round(_rotate_chunks(xb, rht_matrix()), x.dtype).reshape(x.shape)


def rht_inverse(x: jax.Array) -> jax.Array:
    """Inverse of ``rht`` (x_blk @ M.T), fp32 running sum in index order, returned as fp32."""
    _check_last(x.shape, 1, "rht_inverse")
    xb = x.astype(jnp.float32).reshape(-1, BLOCK)
    return _rotate_chunks(xb, rht_matrix().T.copy()).reshape(x.shape)


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


# fp32(1/6), the reciprocal TE folds into the tensor scale (torch.reciprocal of an fp32 6.0)
INV_E2M1_MAX = float(np.float32(1.0) / np.float32(E2M1_MAX))


def block_scale_multiplier(s_enc: jax.Array) -> jax.Array:
    """S_enc * fp32(1/6) as one fp32 product, behind an optimization barrier so that XLA cannot fold the
    constant into a neighbouring multiply (the block scale is amax_b times this, in this order: TE's)."""
    return jax.lax.optimization_barrier(jnp.asarray(s_enc, jnp.float32) * jnp.float32(INV_E2M1_MAX))


def _block_scale_value(amax_b: jax.Array, s_enc: jax.Array) -> jax.Array:
    """s_b = e4m3_RNE(min(amax_b * (S_enc * fp32(1/6)), 448)) as an fp32 value (TE's order)."""
    s = jnp.minimum(amax_b * block_scale_multiplier(s_enc), jnp.float32(E4M3_MAX))
    return round_nearest_even_fp(s, 3, -6)


def block_scale_from_amax(amax_b: jax.Array, s_enc: jax.Array) -> jax.Array:
    """s_b = e4m3_RNE(min(amax_b * (S_enc * fp32(1/6)), 448)), returned as float8_e4m3fn (TE's order)."""
    return _block_scale_value(amax_b, s_enc).astype(jnp.float8_e4m3fn)


def encode_scale(s_b: jax.Array, s_dec: jax.Array) -> jax.Array:
    """e_b = min(1 / (fp32(s_b) * S_dec), FLT_MAX)."""
    return jnp.minimum(jnp.float32(1.0) / (s_b.astype(jnp.float32) * s_dec), jnp.float32(FLT_MAX))


def _e2m1_step(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(spacing, 1 / spacing) of the E2M1 grid at |y| = a in [0, 6]: powers of two picked by compares (cheaper
    than reading the exponent bits, and a multiply instead of a divide)."""
    small, mid = a < 2.0, a < 4.0
    step = jnp.where(small, jnp.float32(0.5), jnp.where(mid, jnp.float32(1.0), jnp.float32(2.0)))
    inv = jnp.where(small, jnp.float32(2.0), jnp.where(mid, jnp.float32(1.0), jnp.float32(0.5)))
    return step, inv


def _e2m1_nearest_value(y: jax.Array) -> jax.Array:
    """E2M1 value (fp32) nearest-even to y in [-6, 6]; y * inv and * step are exact, round is half-to-even,
    and the sign (signed zeros included) is y's: the same values as round_nearest_even_fp(y, 1, 0)."""
    step, inv = _e2m1_step(jnp.abs(y))
    return jnp.round(y * inv) * step


def _e2m1_stochastic_value(y: jax.Array, bits: jax.Array) -> jax.Array:
    a = jnp.abs(y)
    step, inv = _e2m1_step(a)
    lo = jnp.floor(a * inv) * step  # exact: step and inv are powers of two
    up = uniform_from_bits(bits) * step < (a - lo)
    mag = jnp.minimum(jnp.where(up, lo + step, lo), jnp.float32(E2M1_MAX))
    return jnp.where(jnp.signbit(y), -mag, mag)


def round_e2m1_nearest(y: jax.Array) -> jax.Array:
    """Round fp32 values in [-6, 6] to E2M1, nearest-even (what a correct float4_e2m1fn cast does; signed
    zeros kept: ``quantize`` decides the sign of zeros beforehand with ``te_signed``)."""
    return _e2m1_nearest_value(y).astype(jnp.float4_e2m1fn)


def te_signed(x: jax.Array, y: jax.Array) -> jax.Array:
    """y = x * e_b with TE's sign convention for zeros: negative (so -0 after rounding, code 0x8) iff x < 0;
    an input zero of either sign gives +0 (code 0x0), as TE's ``cast_to_fp4x2`` puts -0.0 in the
    [0, 0.25] bin. The sign comes from x, not from y, so that a product XLA flushes to zero (a subnormal
    x * e_b; torch keeps it) still gives code 0x8, as in TE."""
    a = jnp.abs(y)
    return jnp.where(x < 0, -a, a)


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 -> fp32 uniform in [0, 1) on a 2**-24 grid (exact)."""
    return (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def round_e2m1_stochastic(y: jax.Array, bits: jax.Array) -> jax.Array:
    """Stochastically round fp32 values in [-6, 6] to one of their two neighbouring E2M1 values (the sign,
    signed zeros included, is y's)."""
    return _e2m1_stochastic_value(y, bits).astype(jnp.float4_e2m1fn)


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


def _mix32(h: jax.Array) -> jax.Array:
    """lowbias32 finaliser: a bijection on uint32 with good avalanche."""
    h = h ^ (h >> jnp.uint32(16))
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> jnp.uint32(15))
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> jnp.uint32(16))


def key_seed(key: jax.Array) -> jax.Array:
    """The uint32 seed of the stochastic-rounding bits drawn from ``key`` (typed or raw uint32 key)."""
    return jax.random.bits(key, (), jnp.uint32)


def hash_bits(seed: jax.Array, index: jax.Array) -> jax.Array:
    """uint32 bits for uint32 element indices: mix(mix(index) + mix(seed ^ golden)), the counter-based hash the
    Pallas kernel also computes in-kernel (about 15 integer ops per element where threefry costs ~10x that,
    more than the whole quantization on CPU). Not cryptographic; it decorrelates rounding decisions."""
    return _mix32(_mix32(index) + _mix32(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32(0x9E3779B9)))


def random_bits(key: jax.Array, shape) -> jax.Array:
    """The uint32 random bits stochastic rounding draws from ``key``: ``hash_bits`` of the row-major element
    index (shared with the Pallas dispatch, which hands the kernel ``key_seed(key)``). Arrays must have fewer
    than 2**32 elements (32-bit counter)."""
    shape = tuple(shape)
    return hash_bits(key_seed(key), jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape))


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
    y = te_signed(xb, jnp.clip(xb * encode_scale(s_b, s_dec), -E2M1_MAX, E2M1_MAX))
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


def _rotate_axis(x32: jax.Array, axis: int) -> jax.Array:
    """``_rotate_chunks`` along a 16-long ``axis`` that is not the last (the same products and the same
    running sum in index order, so the same bits), vectorised along the contiguous last axis."""
    m = rht_matrix()
    shape = [1] * x32.ndim
    shape[axis] = BLOCK
    acc = None
    for k in range(BLOCK):
        t = jax.lax.slice_in_dim(x32, k, k + 1, axis=axis) * jnp.asarray(m[k]).reshape(shape)
        acc = t if acc is None else acc + t
    return acc


@functools.partial(jax.jit, static_argnames=("block", "rounding", "hadamard", "axis", "dtype"))
def qdq_unscaled(x: jax.Array, *, block=(1, 16), rounding: str = "nearest", key: jax.Array | None = None,
                 bits: jax.Array | None = None, hadamard: bool = False, amax: jax.Array | None = None,
                 axis: int = -1, dtype: Any = jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """(codes * s_b in ``dtype``, S_dec): bit for bit ``dequantize(quantize(...), apply_tensor_scale=False)``,
    computed without the float4 / float8 round trip (XLA's CPU converts to them are slow) and with the tensor
    amax taken from the block amaxes (max is exact in any order). codes * s_b is exact in bf16 (2 x 4
    significant bits), so ``dtype`` bf16 loses nothing.

    axis=-1: blocks along the last axis (or 16x16 tiles), as ``quantize``. axis=0 (2-D x, 1x16 only): blocks
    of 16 consecutive rows, equal to ``qdq_unscaled(x.T, key=key).T`` (RHT along rows too, and the bits
    ``random_bits(key, x.T.shape).T``) without materialising either transpose; ``bits`` is x-aligned.
    """
    block = _check_block(block)
    if axis not in (-1, 0) or (axis == 0 and (x.ndim != 2 or block != (1, 16))):
        raise ValueError(f"qdq_unscaled: axis={axis} needs axis=-1, or axis=0 with 2-D x and block (1, 16)")
    if axis == 0:
        _check_last(x.shape[::-1], 1, "nvfp4.qdq_unscaled")
    else:
        _check_last(x.shape, 1 if block == (1, 16) else 2, "nvfp4.qdq_unscaled")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'stochastic'")
    if rounding == "stochastic":
        if bits is None:
            if key is None:
                raise ValueError("rounding='stochastic' needs key= (a PRNG key) or bits= (uint32, x's shape)")
            if axis == 0:  # the index x.T would give this element
                r, c = x.shape
                idx = (jax.lax.broadcasted_iota(jnp.uint32, x.shape, 1) * jnp.uint32(r)
                       + jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0))
                bits = hash_bits(key_seed(key), idx)
            else:
                bits = random_bits(key, x.shape)
        if bits.shape != x.shape or bits.dtype != jnp.uint32:
            raise ValueError(f"bits must be uint32 of shape {x.shape}, got {bits.dtype}{bits.shape}")
    x32 = x.astype(jnp.float32)
    if hadamard:
        if axis == 0:
            r = x32.reshape(x.shape[0] // BLOCK, BLOCK, x.shape[1])
            r = _storage_round(_rotate_axis(r, 1), x.dtype).reshape(x.shape)
        else:
            r = rht(x)
        # written once in x's dtype (exact: already rounded to it); unpinned, XLA fuses the 31-op rotation into
        # both the amax and the quantize loop (1.6x slower on CPU)
        keep = x.dtype if jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.float32
        x32 = jax.lax.optimization_barrier(r.astype(keep)).astype(jnp.float32)
    if axis == 0:
        xb, red = x32.reshape(x.shape[0] // BLOCK, BLOCK, x.shape[1]), (1,)
    else:
        xb, red = blocked(x32, block), ((-1,) if block == (1, 16) else (-3, -1))
    amax_b = jnp.max(jnp.abs(xb), axis=red, keepdims=True)
    amax = jnp.max(amax_b) if amax is None else jnp.asarray(amax, jnp.float32)
    s_enc, s_dec = tensor_scales(amax)
    s_b = _block_scale_value(amax_b, s_enc)
    e_b = encode_scale(s_b, s_dec)
    y = te_signed(xb, jnp.clip(xb * e_b, -E2M1_MAX, E2M1_MAX))
    if rounding == "nearest":
        q = _e2m1_nearest_value(y)
    else:
        q = _e2m1_stochastic_value(y, bits.reshape(xb.shape))
    return (q * s_b).astype(dtype).reshape(x.shape), s_dec


def flush_to_zero_fraction(x: jax.Array, xq: jax.Array) -> jax.Array:
    """Fraction of the non-zero entries of x whose quantized value is zero."""
    nz = x != 0
    return jnp.sum(nz & (xq == 0)) / jnp.maximum(jnp.sum(nz), 1)
