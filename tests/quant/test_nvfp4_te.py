"""NVFP4 bit-exactness against TransformerEngine's reference quantizer (issue 13, part 1).

Golden data: tests/fixtures/nvfp4_te/*.npz, written by tools/make_te_goldens.py, which runs TE's own
``NVFP4QuantizerRef`` (transformer_engine/pytorch/custom_recipes/reference_nvfp4.py, revision in meta.json)
with torch on the CPU. Inputs: normal, student-t, lognormal (heavy tails), zero rows / tiles, outliers,
exact E2M1 ties, -0.0 (whole blocks and mixed with tiny negatives), block amaxes on the E4M3 rounding
boundary of the block scale, and the all-zero tensor; fp32 and bf16; 1x16 and 16x16 blocks; RHT off and on.

Compared bit for bit: the E2M1 codes (TE's packed bytes), the E4M3 block scales, the fp32 tensor amax and
S_dec, and the RHT-rotated tensor, for the jnp reference, the Pallas kernel (interpreted) and the dispatch.
The one documented difference: for the all-zero tensor TE's Python reference has S_enc = FLT_MAX, its CUDA
kernels (and we) S_enc = 1 (codes and scales are zero either way; docs/nvfp4_numerics.md).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemotron_jax.quant import dispatch, nvfp4
from pallas_kernels import nvfp4 as kernel

F = np.float32
FMAX = F(np.finfo(np.float32).max)
DIR = Path(__file__).resolve().parents[1] / "fixtures" / "nvfp4_te"
FILES = sorted(DIR.glob("*.npz"))
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], F)
VARIANTS = [((1, 16), False), ((1, 16), True), ((16, 16), False), ((16, 16), True)]


def _load(path: Path):
    z = np.load(path)
    bf16 = path.stem.endswith("_bf16")
    x = z["x"].view(ml_dtypes.bfloat16) if bf16 else z["x"]
    return z, x, bf16


def _golden(z, block, rht):
    p = f"b{block[0]}_r{int(rht)}_"
    return {k: z[p + k] for k in ("codes", "scales", "amax", "s_enc", "s_dec")}


def _pack(codes) -> np.ndarray:
    """Our float4_e2m1fn codes -> TE's packed bytes (even column in the low nibble)."""
    c = np.asarray(codes).view(np.uint8) & 0x0F
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def _unpack(packed) -> np.ndarray:
    c = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    c[:, 0::2], c[:, 1::2] = packed & 0x0F, packed >> 4
    return c


def _bits(a) -> np.ndarray:
    return np.asarray(a, F).view(np.uint32)


def _expand(s, block, shape):
    """Per-block values -> per-element, for x of ``shape``."""
    if block == (1, 16):
        return np.repeat(s, 16, -1)
    return np.repeat(np.repeat(s, 16, 0), 16, 1)


def _is_all_zero(path):
    return path.stem.startswith("all_zero")


CASES = [pytest.param(f, b, r, id=f"{f.stem}-{b[0]}x16-{'rht' if r else 'plain'}") for f in FILES
         for b, r in VARIANTS]


def test_goldens_present_and_small():
    assert len(FILES) == 18, FILES
    meta = json.loads((DIR / "meta.json").read_text())
    assert meta["te_file"].endswith("custom_recipes/reference_nvfp4.py") and len(meta["te_revision"]) == 40
    assert sum(p.stat().st_size for p in DIR.iterdir()) < 1_000_000


@pytest.mark.parametrize("path,block,rht", CASES)
def test_reference_matches_te(path, block, rht):
    z, x, _ = _load(path)
    g = _golden(z, block, rht)
    q = nvfp4.quantize(jnp.asarray(x), block=block, hadamard=rht)
    np.testing.assert_array_equal(_pack(q.codes), g["codes"])
    np.testing.assert_array_equal(np.asarray(q.block_scales).view(np.uint8), g["scales"])
    amax = jnp.max(jnp.abs(nvfp4.rht(jnp.asarray(x)) if rht else jnp.asarray(x, jnp.float32)))
    assert _bits(amax) == _bits(g["amax"])
    if _is_all_zero(path):
        # TE's Python reference: S_enc = min(2688 / 0, FLT_MAX) = FLT_MAX; TE's CUDA kernel and ours: 1
        assert g["s_enc"] == FMAX and float(q.tensor_scale) == 1.0
    else:
        assert _bits(q.tensor_scale) == _bits(g["s_dec"])
        assert _bits(nvfp4.tensor_scales(amax)[0]) == _bits(g["s_enc"])
    # dequantize: (codes * s_b) * S_dec, from TE's own codes and scales
    s_b = np.asarray(g["scales"]).view(ml_dtypes.float8_e4m3fn).astype(F)
    want = (E2M1_VALUES[_unpack(g["codes"])] * _expand(s_b, block, x.shape)) * np.asarray(q.tensor_scale)
    np.testing.assert_array_equal(_bits(nvfp4.dequantize(q)), _bits(want))


@pytest.mark.parametrize("path,block,rht", CASES)
def test_unscaled_gemm_operand_matches_te(path, block, rht):
    """The recipe's fused path (nvfp4.qdq_unscaled, and for 1x16 its in-place row-blocked form on x.T) gives
    TE's codes times TE's block scales, bit for bit, and TE's S_dec."""
    z, x, _ = _load(path)
    g = _golden(z, block, rht)
    s_b = np.asarray(g["scales"]).view(ml_dtypes.float8_e4m3fn).astype(F)
    want = E2M1_VALUES[_unpack(g["codes"])] * _expand(s_b, block, x.shape)
    v, s_dec = nvfp4.qdq_unscaled(jnp.asarray(x), block=block, hadamard=rht, dtype=jnp.float32)
    np.testing.assert_array_equal(_bits(v), _bits(want))
    if not _is_all_zero(path):
        assert _bits(s_dec) == _bits(g["s_dec"])
    if block == (1, 16):
        vt, _ = nvfp4.qdq_unscaled(jnp.asarray(x).T, hadamard=rht, axis=0, dtype=jnp.float32)
        np.testing.assert_array_equal(_bits(np.asarray(vt).T), _bits(want))


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_rht_matches_te_rotation(path):
    """Our rht equals TE's x @ (H * 1/4) on torch's CPU: an fp32 running sum in index order, rounded to bf16
    for bf16 inputs (zeros compared by value: the sign of an all-zero chunk's sum is not observable)."""
    z, x, bf16 = _load(path)
    want = z["rot"].view(ml_dtypes.bfloat16).astype(F) if bf16 else z["rot"]
    got = np.asarray(nvfp4.rht(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    # a plain fp32 dot does not reproduce it (the reason for the written-out sum)
    if path.stem in ("normal_f32", "lognormal_f32"):
        dot = np.asarray(jnp.dot(jnp.asarray(x).reshape(-1, 16), jnp.asarray(nvfp4.rht_matrix()),
                                 precision=jax.lax.Precision.HIGHEST)).reshape(x.shape)
        assert (dot != want).any()


@pytest.mark.parametrize("path,block,rht", CASES)
def test_pallas_kernel_matches_te(path, block, rht):
    """The interpreted Pallas kernel: block scales and codes * s_b (sign of zero included) equal TE's."""
    z, x, _ = _load(path)
    g = _golden(z, block, rht)
    xj = jnp.asarray(x)
    amax = jnp.max(jnp.abs(nvfp4.rht(xj) if rht else xj.astype(jnp.float32)))
    scales = jnp.stack(nvfp4.tensor_scales(amax))
    v, s = kernel.qdq_kernel(xj, scales, block=block, hadamard=rht, out_dtype=jnp.float32, interpret=True,
                             apply_tensor_scale=False)
    np.testing.assert_array_equal(np.asarray(s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8), g["scales"])
    s_b = np.asarray(g["scales"]).view(ml_dtypes.float8_e4m3fn).astype(F)
    want = E2M1_VALUES[_unpack(g["codes"])] * _expand(s_b, block, x.shape)
    np.testing.assert_array_equal(_bits(v), _bits(want))
    # the dispatch (what the recipe calls) returns the same operand and TE's S_dec
    v2, s_dec = dispatch.qdq_unscaled(xj, block=block, hadamard=rht, impl="pallas_interpret", dtype=jnp.float32)
    np.testing.assert_array_equal(_bits(v2), _bits(want))
    if not _is_all_zero(path):
        assert _bits(s_dec) == _bits(g["s_dec"])


# ----------------------------------------------------------- the block-scale rounding boundary, jit vs eager
def _boundary_input(dtype, rng):
    """Blocks whose amax_b makes TE's amax_b * (S_enc * fp32(1/6)) and the reassociated products
    (amax_b * fp32(1/6)) * S_enc and (amax_b / 6) * S_enc round to different E4M3 block scales."""
    g = F(4.375)  # tensor amax: S_enc = 2688 / 4.375 = 614.4
    s_enc = F(2688) / g
    cand = np.unique(rng.uniform(0.01, 4.3, 200000).astype(F).view(np.uint32) & 0xFFFF0000).view(F)  # bf16-exact
    e4 = lambda v: np.minimum(v, F(448)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)  # noqa: E731
    te = e4(cand * (s_enc * (F(1) / F(6))))
    hard = cand[(te != e4((cand * (F(1) / F(6))) * s_enc)) | (te != e4((cand / F(6)) * s_enc))]
    assert hard.size >= 10 and np.float32(1.640625) in hard  # the example of issue 13 (TE 176, other 160)
    x = np.zeros((32, 256), F)
    amb = rng.choice(hard, (32, 16))
    x.reshape(32, 16, 16)[:, :, 0] = amb * rng.choice([-1, 1], (32, 16))
    x.reshape(32, 16, 16)[:, :, 1:] = (amb[..., None] * rng.uniform(-1, 1, (32, 16, 15))).astype(F)
    x[0, 0] = g
    x = x.astype(dtype)
    return x, hard


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_jit_and_eager_agree_on_block_scale_boundary(dtype):
    x, _ = _boundary_input(dtype, np.random.default_rng(0))
    xj = jnp.asarray(x)
    x32 = np.asarray(x, F)
    amax_b = np.abs(x32).reshape(32, 16, 16).max(-1)
    s_enc = F(2688) / F(4.375)
    want = np.minimum(amax_b * (s_enc * (F(1) / F(6))), F(448)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    jitted = nvfp4.quantize(xj)
    with jax.disable_jit():
        eager = nvfp4.quantize(xj)
    fused = jax.jit(lambda a: nvfp4.dequantize(nvfp4.quantize(a)) * 2.0)(xj)  # inside a larger jitted graph
    for q in (jitted, eager):
        np.testing.assert_array_equal(np.asarray(q.block_scales).view(np.uint8), want)
    np.testing.assert_array_equal(np.asarray(jitted.codes).view(np.uint8), np.asarray(eager.codes).view(np.uint8))
    np.testing.assert_array_equal(_bits(fused), _bits(nvfp4.dequantize(eager) * 2.0))
    # the kernel (interpreted) and the jitted public helper agree too
    _, s = kernel.qdq_kernel(xj, jnp.stack(nvfp4.tensor_scales(jnp.float32(4.375))), interpret=True)
    np.testing.assert_array_equal(np.asarray(s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8), want)
    got = jax.jit(nvfp4.block_scale_from_amax)(jnp.asarray(amax_b), jnp.float32(s_enc))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), want)


def test_negative_zero_and_tiny_negatives():
    """TE: -0.0 -> code 0x0; a negative value that rounds to zero -> 0x8 (-0); the same in the kernel."""
    x = np.zeros((1, 32), F)
    x[0, :4] = [-0.0, -1e-3, 1e-3, 0.0]
    x[0, 4] = 6.0
    x[0, 16:] = -0.0
    q = nvfp4.quantize(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8)[0, :5], [0x0, 0x8, 0x0, 0x0, 0x7])
    assert (np.asarray(q.codes).view(np.uint8)[0, 16:] == 0).all()
    v, _ = kernel.qdq_kernel(jnp.asarray(x), jnp.stack(nvfp4.tensor_scales(jnp.float32(6.0))), interpret=True)
    np.testing.assert_array_equal(np.signbit(np.asarray(v))[0, :4], [False, True, False, False])


# ------------------------------------------------------------------------------ stochastic rounding
@pytest.mark.parametrize("name,block,rht", [("normal_bf16", (1, 16), True), ("student_t_f32", (16, 16), False)])
def test_stochastic_keeps_te_scales_and_is_unbiased(name, block, rht):
    """SR changes only the rounding: block scales and S_dec equal TE's (nearest) ones; each code is one of
    the two E2M1 neighbours of y = clip(r * e_b) (r: TE's rotated input); over n draws the mean code is y
    within 5 standard errors (per-element std <= step / 2)."""
    z, x, bf16 = _load(DIR / f"{name}.npz")
    g = _golden(z, block, rht)
    r = (z["rot"].view(ml_dtypes.bfloat16).astype(F) if bf16 else z["rot"]) if rht else np.asarray(x, F)
    s_b = np.asarray(g["scales"]).view(ml_dtypes.float8_e4m3fn).astype(F)
    e_b = np.minimum(F(1) / (_expand(s_b, block, x.shape) * g["s_dec"]), FMAX)
    y = np.clip(r * e_b, F(-6), F(6)).astype(np.float64)
    n = 512
    xj = jnp.asarray(x)

    def draw(k):
        q = nvfp4.quantize(xj, block=block, hadamard=rht, rounding="stochastic", key=k)
        return q.codes.astype(jnp.float32), q.block_scales, q.tensor_scale

    codes, scales, s_dec = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(3), n))
    assert (np.asarray(scales).view(np.uint8) == g["scales"][None]).all()
    assert (_bits(s_dec) == _bits(g["s_dec"])).all()
    c = np.asarray(codes, np.float64)
    a = np.abs(y)
    step = np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0))
    lo = np.sign(y) * np.floor(a / step) * step
    assert np.all((c == lo) | (c == lo + np.sign(y) * step))
    mean = c.mean(0)
    assert np.all(np.abs(mean - y) <= 5 * step / (2 * np.sqrt(n)) + 1e-6)
    assert abs((mean - y).mean()) < 0.01  # no systematic bias over the whole tensor
    # the kernel with the same bits: identical codes * s_b
    bits = nvfp4.random_bits(jax.random.key(9), x.shape)
    ref = nvfp4.dequantize(nvfp4.quantize(xj, block=block, hadamard=rht, rounding="stochastic", bits=bits),
                           apply_tensor_scale=False)
    amax = jnp.max(jnp.abs(nvfp4.rht(xj) if rht else xj.astype(jnp.float32)))
    v, _ = kernel.qdq_kernel(xj, jnp.stack(nvfp4.tensor_scales(amax)), block=block, rounding="stochastic",
                             bits=bits, hadamard=rht, out_dtype=jnp.float32, interpret=True,
                             apply_tensor_scale=False)
    np.testing.assert_array_equal(_bits(v), _bits(ref))


def test_bf16_rotation_is_rounded_inside_fused_graphs():
    """TE rounds the bf16 rotation to bf16. Written as a convert pair (f32 -> bf16 -> f32), XLA's default
    excess-precision simplification may delete the rounding inside a fusion (it did in the interpreted kernel:
    292 of 16384 values and block scales differed on this input); both implementations round with integer ops."""
    kx, kt = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(kx, (64, 256)) * jnp.exp(jax.random.normal(kt, (64, 256)) * 1.5)).astype(jnp.bfloat16)
    x = x.at[3, :32].set(-0.0).at[17, 100].set(3e4)
    xn = np.asarray(x).astype(F).reshape(-1, 16)
    m = nvfp4.rht_matrix()
    acc = xn[:, :1] * m[0]
    for k in range(1, 16):
        acc = acc + xn[:, k:k + 1] * m[k]  # numpy: fp32 running sum in index order, as torch's CPU matmul
    want = acc.astype(ml_dtypes.bfloat16).astype(F).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: nvfp4.rht(a) * 1.0)(x)), want)
    for block in ((1, 16), (16, 16)):
        ref = nvfp4.quantize(x, block=block, hadamard=True)
        v, s = kernel.qdq_kernel(x, jnp.stack(nvfp4.tensor_scales(jnp.max(jnp.abs(jnp.asarray(want))))), block=block,
                                 hadamard=True, out_dtype=jnp.float32, interpret=True, apply_tensor_scale=False)
        np.testing.assert_array_equal(np.asarray(s), np.asarray(ref.block_scales).astype(F))
        np.testing.assert_array_equal(_bits(v), _bits(nvfp4.dequantize(ref, apply_tensor_scale=False)))
