"""Trainable NVFP4 / MXFP8 GEMMs (spec section 4, "Block shape and RHT per GEMM"), as jax.custom_vjp.

Convention: x [..., K] (tokens T = prod(leading axes)), w [K, N] (our Linear stores [in, out]), y = x @ w.

| GEMM              | operand A                                     | operand B                                   |
|-------------------|-----------------------------------------------|---------------------------------------------|
| Fprop  y = x.w    | X 1x16 along K, nearest                       | W 16x16 tiles, nearest (1x16 along K if     |
|                   |                                               | weight_2d=False)                            |
| Dgrad  dX = dY.W^T| dY 1x16 along N, stochastic (nearest if SR    | the same 16x16 W values (weight_2d=False:   |
|                   | off)                                          | W re-quantized 1x16 along N)                |
| Wgrad  dW = X^T.dY| X^T 1x16 along tokens, nearest, RHT if rht    | dY^T 1x16 along tokens, stochastic, RHT     |

Every copy is quantized from the high-precision tensor with its own tensor amax (the RHT copies: amax after
the rotation). A 16x16 tile is the same set of values in W and W^T, so one quantization serves fprop and
dgrad. The token axis is zero-padded to a multiple of 16 for Wgrad (zeros change neither amax nor the sum;
the RHT mixes them in, but M is orthogonal, so the product still equals X^T dY up to quantization).
GEMM operands are ``codes * s_b`` in bf16 (exact), accumulated in fp32, and the output is multiplied by
S_dec,A * S_dec,B, which is how the tensor core applies the two scale levels.

Randomness: ``key`` is a PRNG key used only by the backward pass (split into one key for the dgrad dY copy and
one for the wgrad dY copy); the forward pass is deterministic. Pass a fresh key per step and per linear
(``quantizer_key``). ``key`` may be None when stochastic_rounding=False.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp

from nemotron_jax import platform
from nemotron_jax.ops import grouped_gemm, matmul
from nemotron_jax.quant import dispatch, mxfp8

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class NVFP4Recipe:
    """Switches for each recipe element (ablations turn them off one by one).

    rht: random Hadamard transform on both Wgrad operands along tokens (off: Wgrad operands unrotated).
    stochastic_rounding: SR on the dY copies (off: nearest-even, so the backward pass ignores the key).
    weight_2d: 16x16 weight tiles shared by fprop and dgrad (off: W 1x16 along K for fprop, and a separate
        1x16-along-N quantization for dgrad, so W and W^T see different values).
    impl: QDQ implementation, see nemotron_jax.quant.dispatch (all give the same bits). Default "reference"
        (jnp, runs everywhere): the compiled Pallas kernel has only been checked in interpret mode so far;
        switch to "auto" (kernel on GPU) once benchmarks/gpu_nvfp4.sh has shown it bit-identical on the GPU.
        From a model config: ``ModelConfig.nvfp4_impl`` (``from_config``).
    """

    rht: bool = True
    stochastic_rounding: bool = True
    weight_2d: bool = True
    impl: str = "reference"

    def __post_init__(self):
        if self.impl not in dispatch.IMPLS:
            raise ValueError(f"NVFP4Recipe.impl={self.impl!r}: use one of {dispatch.IMPLS}")

    @classmethod
    def from_config(cls, cfg, impl: str | None = None) -> "NVFP4Recipe":
        """The recipe a model config asks for; ``impl`` (if given) overrides ``cfg.nvfp4_impl``."""
        return cls(rht=cfg.nvfp4_rht, stochastic_rounding=cfg.nvfp4_stochastic_rounding,
                   weight_2d=cfg.nvfp4_weight_2d, impl=cfg.nvfp4_impl if impl is None else impl)


def quantizer_key(key: jax.Array, name: str) -> jax.Array:
    """A per-linear key: ``key`` folded with a stable hash of the linear's name (like TE's "sr_rng" stream)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------ helpers
def _q(x, recipe, *, block=(1, 16), sr=False, key=None, hadamard=False, amax=None, axis=-1):
    """(codes * s_b as bf16, S_dec) of x along its last axis (axis=0: along rows of a 2-D x, as x.T)."""
    rounding = "stochastic" if (sr and recipe.stochastic_rounding) else "nearest"
    return dispatch.qdq_unscaled(x, block=block, rounding=rounding, key=key if rounding == "stochastic" else None,
                                 hadamard=hadamard, amax=amax, impl=recipe.impl, axis=axis)


def _check_mult(name, n, m=16):
    if n % m:
        raise ValueError(f"{name}={n} is not a multiple of {m}: NVFP4/MXFP8 blocks need it; pad the weight "
                         f"(or run this linear in bf16 through the precision policy)")


def _pad_rows(a, mult):
    pad = (-a.shape[0]) % mult
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _mm(a, b, contract):
    """fp32-accumulated GEMM; contract = ((a_dims), (b_dims)). bf16 operands widened where that is faster
    (`ops.matmul`: the same products, summed in fp32 either way)."""
    return jax.lax.dot_general(*matmul.operands(a, b, contract), (contract, ((), ())), preferred_element_type=_F32)


def _weight_fprop(w, recipe):
    """W [K, N] for fprop: 16x16 tiles, or 1x16 along K."""
    if recipe.weight_2d:
        return _q(w, recipe, block=(16, 16))
    v, s = _q(w.T, recipe)
    return v.T, s


def _weight_residual(w, wq, recipe):
    """What the backward pass keeps of W: the fprop 16x16 copy (the same values in W and W^T, so dgrad reuses
    it and W is quantized once per step; as many bytes as a bf16 W), or W itself for the 1x16-along-N dgrad
    copy. The empty array carries W's dtype for dW."""
    return (wq if recipe.weight_2d else w), jnp.zeros((0,), w.dtype)


def _keys(key, recipe):
    if not recipe.stochastic_rounding:
        return None, None
    if key is None:
        raise ValueError("NVFP4Recipe(stochastic_rounding=True) needs a PRNG key for the backward pass")
    k = jax.random.split(key)
    return k[0], k[1]


# ------------------------------------------------------------------------------------- dense linear
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nvfp4_matmul(x, w, key, recipe):
    return _nvfp4_fwd(x, w, key, recipe)[0]


def _nvfp4_fwd(x, w, key, recipe):
    k, n = w.shape
    xv, sx = _q(x.reshape(-1, k), recipe)
    wq = _weight_fprop(w, recipe)
    y = _mm(xv, wq[0], ((1,), (0,))) * (sx * wq[1])
    # the 16x16 weight copy is kept for dgrad instead of w (same bytes in bf16); 1x16 needs w again
    return y.reshape(*x.shape[:-1], n).astype(x.dtype), (x, _weight_residual(w, wq, recipe), key)


def _nvfp4_bwd(recipe, res, dy):
    x, (wres, wdt), key = res
    k, n = x.shape[-1], dy.shape[-1]
    kd, kw = _keys(key, recipe)
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    # Dgrad: dX [T, K] = dY [T, N] . W^T, reduction over N
    dyv, sdy = _q(dy2, recipe, sr=True, key=kd)
    wv, sw = wres if recipe.weight_2d else _q(wres, recipe)  # W [K, N]: 16x16 copy, or 1x16 along N
    dx = _mm(dyv, wv, ((1,), (1,))) * (sdy * sw)
    # Wgrad: dW [K, N] = X^T . dY, reduction over tokens (padded to 16): both quantized along rows in place
    # (axis=0), the same values as quantizing the transposes, without writing them
    xtv, sxt = _q(_pad_rows(x2, 16), recipe, hadamard=recipe.rht, axis=0)
    dytv, sdyt = _q(_pad_rows(dy2, 16), recipe, sr=True, key=kw, hadamard=recipe.rht, axis=0)
    dw = _mm(xtv, dytv, ((0,), (0,))) * (sxt * sdyt)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(wdt.dtype), None


_nvfp4_matmul.defvjp(_nvfp4_fwd, _nvfp4_bwd)


def nvfp4_matmul(x: jax.Array, w: jax.Array, key: jax.Array | None = None,
                 recipe: NVFP4Recipe = NVFP4Recipe()) -> jax.Array:
    """y = x @ w with the NVFP4 training recipe; x [..., K], w [K, N] (K, N multiples of 16) -> [..., N]
    in x.dtype. Differentiable in x and w; ``key`` drives stochastic rounding in the backward pass."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"nvfp4_matmul: x {x.shape} and w {w.shape} do not match as [..., K] @ [K, N]")
    _check_mult("K (w.shape[0])", w.shape[0])
    _check_mult("N (w.shape[1])", w.shape[1])
    return _nvfp4_matmul(x, w, key, recipe)


# ------------------------------------------------------------------------------- grouped (MoE) GEMM
def _group_ids(group_sizes, m):
    g = group_sizes.shape[0]
    return jnp.repeat(jnp.arange(g), group_sizes, total_repeat_length=m)


def _padded_layout(group_sizes, m):
    """For a layout where every group starts at a multiple of 16 (its length a static upper bound): the source
    row of each of its rows (-1 for padding) and the padded group sizes. A gather from the rows, not a scatter
    into the layout: XLA's CPU scatter is a serial loop."""
    g = group_sizes.shape[0]
    mp = -(-(m + 15 * g) // 16) * 16
    gs = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(gs) - gs
    psizes = (gs + 15) // 16 * 16
    pends = jnp.cumsum(psizes)
    p = jnp.arange(mp)
    j = jnp.minimum(jnp.searchsorted(pends, p, side="right"), g - 1)  # the padded group of row p
    off = p - (pends[j] - psizes[j])
    src = jnp.where((off < gs[j]) & (p < pends[-1]), starts[j] + off, -1)
    return src, psizes.astype(group_sizes.dtype)


def _pad_groups(a, src):
    """a's rows in the padded layout of `_padded_layout` (zeros where src is -1)."""
    return jnp.where((src >= 0)[:, None], jnp.take(a, jnp.maximum(src, 0), axis=0), jnp.zeros((), a.dtype))


def _per_expert(fn, w):
    """vmap a (w_g -> (values, S_dec)) quantization over experts: every expert gets its own tensor amax."""
    return jax.vmap(fn)(w)


def _grouped_dot(x_mk, w_gkn, group_sizes):
    """fp32-accumulated grouped GEMM: the CPU path of the MoE dispatch (`grouped_gemm.cpu_ragged_dot`;
    lax.ragged_dot lowers on CPU to work proportional to rows x groups), lax.ragged_dot elsewhere. All sum
    the same products in fp32 (the order may differ by an ulp)."""
    if platform.on_cpu() and (y := grouped_gemm.cpu_ragged_dot(x_mk, w_gkn, group_sizes,
                                                               preferred_element_type=_F32)) is not None:
        return y
    return jax.lax.ragged_dot(x_mk, w_gkn, group_sizes, preferred_element_type=_F32)


def _grouped_wgrad(x_mk, dy_mn, group_sizes):
    """dW [G, K, N] = per group, X_g^T dY_g in fp32 (`grouped_gemm.cpu_group_outer` on CPU, ragged_dot_general
    elsewhere)."""
    g = group_sizes.shape[0]
    if platform.on_cpu() and (dw := grouped_gemm.cpu_group_outer(x_mk, dy_mn, group_sizes, g,
                                                                 preferred_element_type=_F32)) is not None:
        return dw
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x_mk, dy_mn, group_sizes, dn, preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nvfp4_ragged(x, w, group_sizes, key, recipe):
    return _ragged_fwd(x, w, group_sizes, key, recipe)[0]


def _ragged_fwd(x, w, group_sizes, key, recipe):
    m = x.shape[0]
    xv, sx = _q(x, recipe)
    wq = _per_expert(lambda wg: _weight_fprop(wg, recipe), w)  # [G, K, N], [G]
    y = _grouped_dot(xv, wq[0], group_sizes)
    y = y * (sx * wq[1][_group_ids(group_sizes, m)])[:, None]
    return y.astype(x.dtype), (x, _weight_residual(w, wq, recipe), group_sizes, key)


def _ragged_bwd(recipe, res, dy):
    x, (wres, wdt), group_sizes, key = res
    m = x.shape[0]
    kd, kw = _keys(key, recipe)
    gid = _group_ids(group_sizes, m)
    # Dgrad: dX [M, K] = dY [M, N] . W_g^T per group
    dyv, sdy = _q(dy, recipe, sr=True, key=kd)
    wv, sw = wres if recipe.weight_2d else _per_expert(lambda wg: _q(wg, recipe), wres)
    dx = _grouped_dot(dyv, jnp.swapaxes(wv, 1, 2), group_sizes)
    dx = dx * (sdy * sw[gid])[:, None]
    # Wgrad: dW_g = X_g^T . dY_g, each group zero-padded to a multiple of 16 tokens so no 16-block (or RHT
    # chunk) straddles two experts; one tensor scale per token-side tensor (amax over all its rows).
    src, psizes = _padded_layout(group_sizes, m)
    xp, dyp = _pad_groups(x, src), _pad_groups(dy, src)
    xtv, sxt = _q(xp, recipe, hadamard=recipe.rht, axis=0)
    dytv, sdyt = _q(dyp, recipe, sr=True, key=kw, hadamard=recipe.rht, axis=0)
    dw = _grouped_wgrad(xtv, dytv, psizes) * (sxt * sdyt)
    return dx.astype(x.dtype), dw.astype(wdt.dtype), None, None


_nvfp4_ragged.defvjp(_ragged_fwd, _ragged_bwd)


def nvfp4_ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, key: jax.Array | None = None,
                     recipe: NVFP4Recipe = NVFP4Recipe()) -> jax.Array:
    """Grouped GEMM y[r] = x[r] @ w[g(r)] with the NVFP4 recipe; x [M, K] rows sorted by group, w [G, K, N],
    group_sizes [G] int32 (sum <= M; rows past the sum give zeros). Each expert's weight is quantized in
    16x16 tiles with its own tensor scale; the token side in 1x16 blocks; Wgrad with RHT and SR along tokens
    per group. Differentiable in x and w."""
    if w.ndim != 3 or x.ndim != 2 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"nvfp4_ragged_dot: x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape} do not "
                         f"match [M, K], [G, K, N], [G]")
    _check_mult("K (w.shape[1])", w.shape[1])
    _check_mult("N (w.shape[2])", w.shape[2])
    return _nvfp4_ragged(x, w, group_sizes, key, recipe)


# ------------------------------------------------------------------------------------- MXFP8 linear
def _mx(a):
    """MXFP8 QDQ along the last axis, in bf16 (codes * 2**e is exact there)."""
    return mxfp8.qdq_values(a, jnp.bfloat16)


@jax.custom_vjp
def _mxfp8_matmul(x, w):
    return _mx_fwd(x, w)[0]


def _mx_fwd(x, w):
    k, n = w.shape
    y = _mm(_mx(x.reshape(-1, k)), _mx(w.T), ((1,), (1,)))
    return y.reshape(*x.shape[:-1], n).astype(x.dtype), (x, w)


def _mx_bwd(res, dy):
    x, w = res
    k, n = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dx = _mm(_mx(dy2), _mx(w), ((1,), (1,)))  # reduction over N: both along N
    dw = _mm(_mx(_pad_rows(x2, 32).T), _mx(_pad_rows(dy2, 32).T), ((1,), (1,)))  # along tokens
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_mxfp8_matmul.defvjp(_mx_fwd, _mx_bwd)


def mxfp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """y = x @ w with MXFP8 (E4M3, 32-blocks, E8M0 scales) QDQ on both operands of all three GEMMs, along each
    GEMM's reduction axis, nearest-even. x [..., K], w [K, N] with K, N multiples of 32."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"mxfp8_matmul: x {x.shape} and w {w.shape} do not match as [..., K] @ [K, N]")
    _check_mult("K (w.shape[0])", w.shape[0], 32)
    _check_mult("N (w.shape[1])", w.shape[1], 32)
    return _mxfp8_matmul(x, w)
