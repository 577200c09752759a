"""NVFP4 / MXFP8 jnp references against independent numpy + ml_dtypes oracles, hand-computed cases,
stochastic rounding statistics and RHT algebra (spec section 4)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemotron_jax.quant import mxfp8, nvfp4

F = np.float32
FMAX = F(np.finfo(np.float32).max)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], F)


# ------------------------------------------------------------------ the oracle (numpy + ml_dtypes only)
def oracle(x, block):
    """NVFP4 nearest-even quantization of a 2D fp32 array, written from spec section 4 (in TE's order of
    operations) with ml_dtypes casts.
    Returns (codes uint8 bit patterns, block scales float32, S_dec, dequantized float32)."""
    x = np.asarray(x, F)
    m, k = x.shape
    amax = np.abs(x).max()
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        s_enc = np.minimum(F(6 * 448) / amax, FMAX)
        if amax == 0 or s_enc == 0:
            s_enc = F(1)
        s_dec = F(1) / s_enc
        if block == (1, 16):
            xb = x.reshape(m, k // 16, 16)
            amax_b = np.abs(xb).max(axis=-1, keepdims=True)
        else:
            xb = x.reshape(m // 16, 16, k // 16, 16)
            amax_b = np.abs(xb).max(axis=(1, 3), keepdims=True)
        # TE's order: amax_b * (S_enc * fp32(1/6)) (docs/nvfp4_numerics.md)
        s_b = np.minimum(amax_b * (s_enc * (F(1) / F(6))), F(448)).astype(ml_dtypes.float8_e4m3fn).astype(F)
        e_b = np.minimum(F(1) / (s_b * s_dec), FMAX)
        y = np.abs(np.clip(xb * e_b, F(-6), F(6)))
        y = np.where(xb < 0, -y, y)  # TE: negative iff x < 0; an input -0.0 gets code 0x0
    codes = y.astype(ml_dtypes.float4_e2m1fn)
    deq = (codes.astype(F) * s_b) * s_dec
    scales = s_b[..., 0] if block == (1, 16) else s_b[:, 0, :, 0]
    return codes.view(np.uint8).reshape(m, k), scales, s_dec, deq.reshape(m, k)


def _adversarial(rng):
    """(name, array) cases, 32x64 fp32 unless said otherwise."""
    out = []
    # random, block amaxes spread over 6 decades
    x = rng.standard_normal((32, 64)).astype(F) * (10.0 ** rng.uniform(-3, 3, (32, 4, 1))).repeat(16, -1).reshape(32, 64).astype(F)
    out.append(("random_spread", x))
    # all-zero blocks (1x16 and whole 16x16 tiles)
    z = rng.standard_normal((32, 64)).astype(F)
    z[:, 16:32] = 0
    z[16:, 48:] = 0
    out.append(("zero_blocks", z))
    out.append(("all_zero", np.zeros((32, 64), F)))
    # one huge outlier per 16-block
    o = rng.standard_normal((32, 64)).astype(F)
    o.reshape(32, 4, 16)[:, :, 5] = 1e4
    out.append(("outliers", o))
    # blocks whose scale lands in the E4M3 subnormal range (s_b < 2**-6) and below it (s_b -> 0)
    s = rng.standard_normal((32, 64)).astype(F)
    s[0, 0] = 1e6  # sets S_enc = 2688e-6
    sb_target = 2.0 ** rng.uniform(-12, -5, (32, 4, 1))  # 2**-12 .. 2**-5: subnormal and underflowing scales
    blk_amax = (sb_target * 6 / (2688 / 1e6)).astype(F)
    s = (s.reshape(32, 4, 16) / np.abs(s.reshape(32, 4, 16)).max(-1, keepdims=True) * blk_amax).reshape(32, 64)
    s[0, 0] = 1e6
    out.append(("e4m3_subnormal_scales", s.astype(F)))
    # exact E2M1 rounding ties with S_enc = 1 and s_b = 1 (amax 2688 in another block, amax_b = 6)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0], F)
    t = np.tile(ties, (32, 4))
    t[1, 16:32] = 0
    t[1, 16] = 2688.0
    out.append(("ties", t))
    # bf16 extremes: bf16 max next to bf16's smallest normals (cast through bf16)
    b = rng.standard_normal((32, 64)).astype(F)
    # tiny but normal (fp32 subnormals are flushed to zero by XLA: documented, not compared here)
    b[:, :16] = np.sign(b[:, :16]) * (1 + np.abs(b[:, :16])) * F(1e-37)
    b[3, 40] = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    b[4, 41] = -float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    b[5, 0] = float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_normal)
    out.append(("bf16_extremes", b.astype(ml_dtypes.bfloat16)))
    return out


CASES = _adversarial(np.random.default_rng(0))


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
@pytest.mark.parametrize("name,x", CASES, ids=[c[0] for c in CASES])
def test_nearest_matches_oracle(name, x, block):
    """Codes (bit patterns, signed zeros included), block scales, S_dec and dequantized values: identical."""
    q = nvfp4.quantize(jnp.asarray(x), block=block)
    codes, scales, s_dec, deq = oracle(np.asarray(x, F), block)
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(q.block_scales).astype(F), scales)
    assert np.asarray(q.tensor_scale) == s_dec
    np.testing.assert_array_equal(np.asarray(nvfp4.dequantize(q)), deq)
    # qdq keeps shape and dtype
    y = nvfp4.qdq(jnp.asarray(x), block=block)
    assert y.shape == x.shape and y.dtype == jnp.asarray(x).dtype


def test_tie_table_hand_computed():
    """Spec: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (and negatives). With amax = 2688 in the
    tensor S_enc = S_dec = 1, and a block of amax 6 has s_b = 1, so codes equal the rounded values."""
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.1], F)
    want = np.array([0, 1, 1, 2, 2, 4, 4, 6, -0.0, -1, -1, -2, -2, -4, -4, 0], F)
    x = np.zeros((1, 32), F)
    x[0, :16] = ties
    x[0, 16] = 2688.0
    q = nvfp4.quantize(jnp.asarray(x))
    assert float(q.tensor_scale) == 1.0 and float(q.block_scales[0, 0].astype(jnp.float32)) == 1.0
    got = np.asarray(q.codes[0, :16]).astype(F)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[8])  # -0.25 -> -0
    # second block: s_b = min(2688/6, 448) = 448, e_b = 1/448: 2688 -> 6
    assert float(q.block_scales[0, 1].astype(jnp.float32)) == 448.0 and float(q.codes[0, 16].astype(jnp.float32)) == 6.0


def test_two_level_scale_hand_computed():
    """amax = 1: S_enc = 2688, S_dec = 1/2688; block amax 0.5: s_b = e4m3(0.5/6*2688 = 224) = 224;
    block amax 1: s_b = 448; value 0.3 in the 0.5-block: 0.3 * 1/(224/2688) = 3.6 -> 4 -> 4*224/2688 = 1/3."""
    x = np.zeros((1, 32), F)
    x[0, 0], x[0, 1] = 0.5, 0.3
    x[0, 16] = 1.0
    q = nvfp4.quantize(jnp.asarray(x))
    # S_enc = 2688 exactly, S_dec = fp32(1/2688): one rounding, <= 2^-24 = 6e-8 relative (measured 1.9e-8); we
    # allow two (1.2e-7). atol=0: np.isclose's default atol=1e-8 alone would be 2.7e-5 of this value.
    assert np.isclose(float(q.tensor_scale), 1 / 2688, rtol=1.2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(q.block_scales.astype(jnp.float32))[0], [224.0, 448.0])
    assert float(q.codes[0, 1].astype(jnp.float32)) == 4.0
    # 896 * S_dec adds one rounding: <= 1.2e-7 (measured 3.0e-8); we allow three (1.8e-7)
    assert np.isclose(float(nvfp4.dequantize(q)[0, 1]), 1 / 3, rtol=1.8e-7, atol=0)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(jnp.ones((4, 24)))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(jnp.ones((8, 32)), block=(16, 16))
    with pytest.raises(ValueError, match="block="):
        nvfp4.quantize(jnp.ones((16, 32)), block=(4, 4))
    with pytest.raises(ValueError, match="key"):
        nvfp4.quantize(jnp.ones((16, 32)), rounding="stochastic")


def test_nan_and_inf_behaviour():
    """Documented: NaN anywhere -> S_dec NaN -> every dequantized value NaN. inf (no NaN) -> S_enc = 1, inf
    saturates to 6 * 448 = 2688, finite values stay finite."""
    x = np.linspace(-1, 1, 64, dtype=F).reshape(2, 32)
    xn = x.copy()
    xn[1, 3] = np.nan
    assert np.isnan(np.asarray(nvfp4.qdq(jnp.asarray(xn)))).all()
    xi = x.copy()
    xi[0, 5] = np.inf
    xi[1, 7] = -np.inf
    q = nvfp4.quantize(jnp.asarray(xi))
    y = np.asarray(nvfp4.dequantize(q))
    assert float(q.tensor_scale) == 1.0
    assert y[0, 5] == 2688.0 and y[1, 7] == -2688.0
    assert np.isfinite(y).all()


# ------------------------------------------------------------------ stochastic rounding
def _grid_neighbours(y):
    a = np.abs(y)
    idx = np.clip(np.searchsorted(E2M1, a, side="right") - 1, 0, 7)
    lo = E2M1[idx]
    hi = np.where(a == lo, lo, E2M1[np.minimum(idx + 1, 7)])
    return np.sign(y) * lo, np.sign(y) * hi


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_stochastic_picks_only_neighbours(block):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((32, 64)).astype(F))
    qn = nvfp4.quantize(x, block=block)
    # scaled values before rounding, from the oracle's e_b (same block scales for any rounding)
    _, scales, s_dec, _ = oracle(np.asarray(x), block)
    e_b = np.minimum(F(1) / (scales * s_dec), FMAX)
    e_full = np.repeat(e_b, 16, -1) if block == (1, 16) else np.repeat(np.repeat(e_b, 16, 0), 16, 1)
    y = np.clip(np.asarray(x) * e_full, -6, 6)
    lo, hi = _grid_neighbours(y)
    seen_hi = np.zeros(y.shape, bool)
    f = jax.jit(lambda k: nvfp4.quantize(x, block=block, rounding="stochastic", key=k))
    for i in range(8):
        q = f(jax.random.key(i))
        np.testing.assert_array_equal(np.asarray(q.block_scales), np.asarray(qn.block_scales))
        c = np.asarray(q.codes).astype(F)
        assert np.all((c == lo) | (c == hi))
        seen_hi |= (c == hi) & (hi != lo)
    assert seen_hi.mean() > 0.3  # both neighbours do occur


def test_stochastic_is_unbiased():
    """Mean over n = 4096 keys converges to x. Per element, the SR draw has std <= step * s_b * S_dec / 2
    (step = grid spacing at the value), so the mean's standard error is <= step*scale/(2 sqrt n); we allow 5
    standard errors (p(false fail) ~ 512 * 6e-7) plus 1e-6 relative for the fp32 rounding of x * e_b."""
    n = 4096
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 32)).astype(F))
    keys = jax.random.split(jax.random.key(7), n)
    draws = jax.jit(jax.vmap(lambda k: nvfp4.qdq(x, rounding="stochastic", key=k)))(keys)
    mean = np.asarray(draws).mean(0, dtype=np.float64)
    q = nvfp4.quantize(x)
    scale = np.repeat(np.asarray(q.block_scales).astype(F), 16, -1) * float(q.tensor_scale)
    y = np.abs(np.asarray(x)) / scale
    step = np.where(y < 2, 0.5, np.where(y < 4, 1.0, 2.0)) * scale
    bound = 5 * step / (2 * np.sqrt(n)) + 1e-6 * np.abs(np.asarray(x))
    # The target is x clamped to +-6 * scale: a block's amax element exceeds 6 after the e4m3 rounding of s_b
    # and is clipped before rounding (a property of the format, identical for nearest rounding).
    target = np.sign(np.asarray(x)) * np.minimum(y, 6) * scale
    assert np.all(np.abs(mean - target) <= bound)
    # power check: nearest rounding's error on the same data is far larger than the SR mean's
    assert np.abs(mean - target).mean() < 0.1 * np.abs(np.asarray(nvfp4.qdq(x)) - target).mean()


def test_stochastic_bits_and_key_agree():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 32)).astype(F))
    k = jax.random.key(5)
    a = nvfp4.qdq(x, rounding="stochastic", key=k)
    b = nvfp4.qdq(x, rounding="stochastic", bits=nvfp4.random_bits(k, x.shape))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ RHT
def test_rht_matrix_orthogonal_and_signs():
    m = nvfp4.rht_matrix()
    np.testing.assert_array_equal(m @ m.T, np.eye(16, dtype=F))  # +-1/16 sums: exact in fp32
    assert set(np.abs(m).ravel()) == {0.25}
    h = nvfp4.hadamard16()
    np.testing.assert_array_equal(np.sign(m[:, 0]), np.asarray(nvfp4.RHT_SIGNS, F) * np.sign(h[:, 0]))


def test_rht_cancels_in_wgrad_product():
    """Rotating both Wgrad operands along the token (reduction) axis leaves X^T dY unchanged (to fp32)."""
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((48, 32)).astype(F), rng.standard_normal((48, 16)).astype(F)
    xr, dyr = np.asarray(nvfp4.rht(jnp.asarray(x.T))), np.asarray(nvfp4.rht(jnp.asarray(dy.T)))
    np.testing.assert_allclose(xr @ dyr.T, x.T @ dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nvfp4.rht_inverse(jnp.asarray(xr))), x.T, atol=1e-6)
    assert not np.allclose(xr, x.T)


def test_16x16_same_values_for_w_and_wt():
    w = jnp.asarray(np.random.default_rng(5).standard_normal((32, 48)).astype(F))
    a = nvfp4.qdq(w, block=(16, 16))
    b = nvfp4.qdq(w.T, block=(16, 16)).T
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 1x16 blocks do not have this property
    assert not np.array_equal(np.asarray(nvfp4.qdq(w)), np.asarray(nvfp4.qdq(w.T).T))


def test_hadamard_codes_match_oracle_of_rotated():
    """hadamard=True quantizes rht(x): the oracle on the rotated array gives the same codes and scales."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((32, 64)).astype(F))
    q = nvfp4.quantize(x, hadamard=True)
    codes, scales, _, _ = oracle(np.asarray(nvfp4.rht(x)), (1, 16))
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(q.block_scales).astype(F), scales)


# ------------------------------------------------------------------ MXFP8
def mx_oracle(x):
    """OCP MX: E4M3 elements, 32-blocks, scale 2**(floor(log2 amax) - 8), exponent clipped to [-126, 127]."""
    x = np.asarray(x, F)
    xb = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax.astype(np.float64))) - 8, -126)
    e = np.clip(e, -126, 127)
    scale = np.exp2(e).astype(F)
    codes = np.clip(xb / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return codes.reshape(x.shape), (codes.astype(F) * scale).reshape(x.shape)


@pytest.mark.parametrize("case", ["random", "spread", "zeros_and_ties"])
def test_mxfp8_matches_oracle(case):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((8, 96)).astype(F)
    if case == "spread":
        x = x * (10.0 ** rng.uniform(-20, 20, (8, 3, 1))).repeat(32, -1).reshape(8, 96).astype(F)
    if case == "zeros_and_ties":
        x[:, :32] = 0
        x[:, 32:64] = np.array([256 + 16 * i for i in range(32)], F)  # amax 752: scale 2, exact e4m3 ties
    codes, e = mxfp8.quantize(jnp.asarray(x))
    oc, od = mx_oracle(x)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), oc.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(mxfp8.qdq(jnp.asarray(x))), od)
    # the fused GEMM-operand path (no float8 round trip): the same bits in fp32, and in bf16 for bf16 inputs
    np.testing.assert_array_equal(np.asarray(mxfp8.qdq_values(jnp.asarray(x), jnp.float32)).view(np.uint32),
                                  od.view(np.uint32))
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(mxfp8.qdq_values(xb)).view(np.uint16),
                                  np.asarray(mxfp8.qdq(xb)).view(np.uint16))
    assert np.asarray(mxfp8.e8m0_scales(e)).dtype == jnp.float8_e8m0fnu
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp8.quantize(jnp.ones((2, 48)))


# ------------------------------------------------------------------ fused GEMM-operand path (qdq_unscaled)
def test_e2m1_rounding_matches_ml_dtypes_on_a_dense_sweep():
    """The compare-and-multiply E2M1 rounding equals a correct float4_e2m1fn cast (ml_dtypes) on every
    1/4096 step of [-6, 6] (all ties included) and at +-0."""
    y = np.concatenate([np.arange(-6 * 4096, 6 * 4096 + 1, dtype=F) / F(4096), np.array([0.0, -0.0], F)])
    got = np.asarray(nvfp4.round_e2m1_nearest(jnp.asarray(y))).view(np.uint8)
    want = y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
@pytest.mark.parametrize("rounding,hadamard", [("nearest", False), ("nearest", True), ("stochastic", False),
                                               ("stochastic", True)])
def test_qdq_unscaled_is_dequantize_of_quantize(block, rounding, hadamard):
    """The fused path (no float4/float8 round trip, tensor amax from block amaxes) gives the bits of
    dequantize(quantize(x), apply_tensor_scale=False) and the same S_dec, bf16 and fp32 inputs."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((48, 64)).astype(F) * np.exp(rng.standard_normal((48, 1)).astype(F) * 2)
    x[3, :16], x[5, 7], x[9, 2] = 0.0, -0.0, 1e-30
    k = jax.random.key(11) if rounding == "stochastic" else None
    for xj in (jnp.asarray(x), jnp.asarray(x).astype(jnp.bfloat16)):
        q = nvfp4.quantize(xj, block=block, rounding=rounding, key=k, hadamard=hadamard)
        want = nvfp4.dequantize(q, jnp.float32, apply_tensor_scale=False)
        v, s_dec = nvfp4.qdq_unscaled(xj, block=block, rounding=rounding, key=k, hadamard=hadamard, dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(v).view(np.uint32), np.asarray(want).view(np.uint32))
        assert np.asarray(s_dec).view(np.uint32) == np.asarray(q.tensor_scale).view(np.uint32)
        vb, _ = nvfp4.qdq_unscaled(xj, block=block, rounding=rounding, key=k, hadamard=hadamard)
        np.testing.assert_array_equal(np.asarray(vb).astype(F), np.asarray(v))  # exact in bf16
        if block == (1, 16):  # blocks along rows in place == the transpose's blocks, bits included
            vt, st = nvfp4.qdq_unscaled(xj.T, rounding=rounding, key=k, hadamard=hadamard, axis=0, dtype=jnp.float32)
            np.testing.assert_array_equal(np.asarray(vt).T.view(np.uint32), np.asarray(v).view(np.uint32))
            assert float(st) == float(s_dec)


def test_qdq_unscaled_nan_inf_and_bad_args():
    x = np.linspace(-1, 1, 64, dtype=F).reshape(2, 32)
    xn = x.copy()
    xn[1, 3] = np.nan
    v, s = nvfp4.qdq_unscaled(jnp.asarray(xn))
    assert np.isnan(float(s))  # the GEMM output is multiplied by S_dec: all NaN
    xi = x.copy()
    xi[0, 5] = np.inf
    v, s = nvfp4.qdq_unscaled(jnp.asarray(xi), dtype=jnp.float32)
    assert float(s) == 1.0 and float(v[0, 5]) == 2688.0 and np.isfinite(np.asarray(v)).all()
    with pytest.raises(ValueError, match="axis"):
        nvfp4.qdq_unscaled(jnp.ones((16, 32)), block=(16, 16), axis=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.qdq_unscaled(jnp.ones((24, 32)), axis=0)
    with pytest.raises(ValueError, match="key"):
        nvfp4.qdq_unscaled(jnp.ones((16, 32)), rounding="stochastic")
