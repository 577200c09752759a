"""The trainable NVFP4 / MXFP8 GEMMs: each GEMM uses exactly the quantized operands of the recipe table,
stays close to the plain dot, and every recipe switch changes what its docstring says."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.quant import mxfp8, nvfp4
from nemotron_jax.quant.recipe import NVFP4Recipe, mxfp8_matmul, nvfp4_matmul, nvfp4_ragged_dot

F = np.float32
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((2, 20, 64)).astype(F))  # 40 tokens: not a multiple of 16 (padding path)
W = jnp.asarray(RNG.standard_normal((64, 32)).astype(F) * 0.1)
DY = jnp.asarray(RNG.standard_normal((2, 20, 32)).astype(F))
NO_SR = NVFP4Recipe(stochastic_rounding=False, impl="reference")


def _vjp(f, x, w, dy):
    y, pull = jax.vjp(f, x, w)
    return (y, *pull(dy))


@functools.lru_cache
def _dense(recipe):
    """(x, w, dy, key) -> (y, dx, dw) of nvfp4_matmul, jitted once per recipe (keys are traced)."""
    return jax.jit(lambda x, w, dy, k: _vjp(lambda a, b: nvfp4_matmul(a, b, k, recipe), x, w, dy))


@functools.lru_cache
def _ragged(recipe):
    return jax.jit(lambda x, w, dy, k: _vjp(lambda a, b: nvfp4_ragged_dot(a, b, GS, k, recipe), x, w, dy))


def _close(a, b, rtol=2e-6):
    """The recipe multiplies fp32-accumulated bf16 GEMMs by S_dec,A*S_dec,B; the explicit formula multiplies
    dequantized fp32 values: equal up to fp32 rounding of the sums. Measured max |diff| 3.6e-7 of the largest
    entry (NVFP4 GEMMs, seeds 0-6): rtol 2e-6 (element-wise and of the largest entry) is >= 8x that."""
    a, b = np.asarray(a, F), np.asarray(b, F)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _pad16(a):
    return jnp.pad(a, ((0, (-a.shape[0]) % 16), (0, 0)))


@pytest.mark.parametrize("recipe", [NO_SR, NVFP4Recipe(stochastic_rounding=False, rht=False, impl="reference"),
                                    NVFP4Recipe(stochastic_rounding=False, weight_2d=False, impl="reference")],
                         ids=["default", "rht_off", "weight_2d_off"])
def test_each_gemm_uses_the_recipe_operands(recipe):
    """Fprop X(1x16 K) . W(16x16 | 1x16 K); Dgrad dY(1x16 N) . W(same 16x16 | 1x16 N)^T;
    Wgrad X^T(1x16 tokens, RHT?) . dY^T(1x16 tokens, RHT?)^T, each quantized from the high-precision tensor."""
    y, dx, dw = _dense(recipe)(X, W, DY, None)
    x2, dy2 = X.reshape(-1, 64), DY.reshape(-1, 32)
    if recipe.weight_2d:
        wf = wd = nvfp4.qdq(W, block=(16, 16))
    else:
        wf, wd = nvfp4.qdq(W.T).T, nvfp4.qdq(W)
        assert not np.array_equal(np.asarray(wf), np.asarray(wd))  # W and W^T quantized differently
    _close(y.reshape(-1, 32), nvfp4.qdq(x2) @ wf)
    _close(dx.reshape(-1, 64), nvfp4.qdq(dy2) @ wd.T)
    h = recipe.rht
    _close(dw, nvfp4.qdq(_pad16(x2).T, hadamard=h) @ nvfp4.qdq(_pad16(dy2).T, hadamard=h).T)


def test_rht_off_changes_only_wgrad():
    on = _dense(NO_SR)(X, W, DY, None)
    off = _dense(NVFP4Recipe(False, False, True, "reference"))(X, W, DY, None)
    np.testing.assert_array_equal(np.asarray(on[0]), np.asarray(off[0]))
    np.testing.assert_array_equal(np.asarray(on[1]), np.asarray(off[1]))
    assert not np.array_equal(np.asarray(on[2]), np.asarray(off[2]))


def test_stochastic_rounding_switch():
    """SR on: backward differs between keys, forward does not. SR off: everything identical across keys."""
    sr = NVFP4Recipe(impl="reference")
    f = lambda k, r: _dense(r)(X, W, DY, k)  # noqa: E731
    a, b = f(jax.random.key(0), sr), f(jax.random.key(1), sr)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.array_equal(np.asarray(a[2]), np.asarray(b[2]))
    c, d = f(jax.random.key(0), NO_SR), f(jax.random.key(1), NO_SR)
    for u, v in zip(c, d):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    with pytest.raises(ValueError, match="PRNG key"):
        jax.grad(lambda w: nvfp4_matmul(X, w, None, sr).sum())(W)
    # raw uint32 keys work too
    jax.grad(lambda w: nvfp4_matmul(X, w, jax.random.PRNGKey(0), sr).sum())(W)


def test_close_to_plain_dot():
    """Gaussian (smooth, outlier-free) operands: NVFP4 QDQ has ~0.09-0.10 relative RMS error per operand
    (asserted below), so a product of two independently quantized operands is off by ~sqrt(2)*0.1 = 0.14;
    SR adds variance to the dY copies (~0.18 measured). Bounds 0.2 (fwd) and 0.3 (grads) catch any wrong
    block axis, missing scale or un-cancelled RHT, which give errors of order 1."""
    assert 0.07 < _rel(nvfp4.qdq(X), X) < 0.11
    plain = _vjp(lambda x, w: jnp.einsum("btk,kn->btn", x, w), X, W, DY)
    quant = _dense(NVFP4Recipe(impl="reference"))(X, W, DY, jax.random.key(3))
    assert _rel(quant[0], plain[0]) < 0.2
    assert _rel(quant[1], plain[1]) < 0.3
    assert _rel(quant[2], plain[2]) < 0.3
    assert quant[0].dtype == X.dtype and quant[2].dtype == W.dtype


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_matmul(jnp.ones((4, 24)), jnp.ones((24, 32)))
    with pytest.raises(ValueError, match="do not match"):
        nvfp4_matmul(jnp.ones((4, 32)), jnp.ones((16, 32)))


# ----------------------------------------------------------------------------------- ragged (MoE)
XM = jnp.asarray(RNG.standard_normal((40, 32)).astype(F))
WG = jnp.asarray(RNG.standard_normal((3, 32, 16)).astype(F) * 0.1)
GS = jnp.array([10, 0, 27], jnp.int32)  # an empty group, groups not multiples of 16, 3 rows past the groups
DYM = jnp.asarray(RNG.standard_normal((40, 16)).astype(F)).at[37:].set(0.0)


def test_ragged_matches_per_group_loop():
    """SR off (deterministic): forward, dgrad, wgrad equal a loop over experts built from the reference QDQ
    (token-side tensors share one tensor scale, each expert's weight has its own; wgrad per group zero-padded
    to 16 tokens and rotated)."""
    y, dx, dw = _ragged(NO_SR)(XM, WG, DYM, None)
    xq, dyq = nvfp4.qdq(XM), nvfp4.qdq(DYM)
    starts = np.concatenate([[0], np.cumsum(np.asarray(GS))])
    xs = [_pad16(XM[starts[g]:starts[g + 1]]).T for g in range(3)]
    dys = [_pad16(DYM[starts[g]:starts[g + 1]]).T for g in range(3)]
    amax_x = max(float(jnp.max(jnp.abs(nvfp4.rht(a)))) if a.shape[1] else 0.0 for a in xs)
    amax_dy = max(float(jnp.max(jnp.abs(nvfp4.rht(a)))) if a.shape[1] else 0.0 for a in dys)
    for g in range(3):
        r = slice(starts[g], starts[g + 1])
        if starts[g + 1] == starts[g]:  # empty group: no rows, zero weight gradient
            np.testing.assert_array_equal(np.asarray(dw[g]), 0.0)
            continue
        wq = nvfp4.qdq(WG[g], block=(16, 16))
        _close(y[r], xq[r] @ wq)
        _close(dx[r], dyq[r] @ wq.T)
        want = nvfp4.qdq(xs[g], hadamard=True, amax=amax_x) @ nvfp4.qdq(dys[g], hadamard=True, amax=amax_dy).T
        _close(dw[g], want)
    np.testing.assert_array_equal(np.asarray(y[37:]), 0.0)  # rows past the groups


def test_ragged_close_to_plain_and_sr_varies():
    plain = _vjp(lambda x, w: jax.lax.ragged_dot(x, w, GS), XM, WG, DYM)
    f = lambda k: _ragged(NVFP4Recipe(impl="reference"))(XM, WG, DYM, k)  # noqa: E731
    a, b = f(jax.random.key(0)), f(jax.random.key(1))
    for q, p in zip(a, plain):  # same bounds and reasoning as test_close_to_plain_dot
        assert _rel(q, p) < 0.3
    assert _rel(a[0], plain[0]) < 0.2
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[2]), np.asarray(b[2]))


# ------------------------------------------------------------------------------------------ MXFP8
def test_mxfp8_matmul_operands_and_accuracy():
    x, w, dy = X[..., :64], jnp.asarray(RNG.standard_normal((64, 64)).astype(F) * 0.1), \
        jnp.asarray(RNG.standard_normal((2, 20, 64)).astype(F))
    y, dx, dw = jax.jit(lambda *a: _vjp(mxfp8_matmul, *a))(x, w, dy)
    x2, dy2 = x.reshape(-1, 64), dy.reshape(-1, 64)
    pad = lambda a: jnp.pad(a, ((0, (-a.shape[0]) % 32), (0, 0)))  # noqa: E731
    # power-of-two scales, 4-bit significands: the sums are nearly exact (measured max |diff| 7.5e-8 of the
    # largest entry, seeds 0-6), so these take a bound 10x tighter than the NVFP4 ones (4.5x margin)
    _close(y.reshape(-1, 64), mxfp8.qdq(x2) @ mxfp8.qdq(w.T).T, rtol=2e-7)
    _close(dx.reshape(-1, 64), mxfp8.qdq(dy2) @ mxfp8.qdq(w).T, rtol=2e-7)
    _close(dw, mxfp8.qdq(pad(x2).T) @ mxfp8.qdq(pad(dy2).T).T, rtol=2e-7)
    # E4M3 has 3 mantissa bits (2**-4 relative half-ulp) but OCP's floor-based scale clips block maxima in
    # (448, 512) * scale: ~0.03-0.05 per operand on Gaussian data, so 0.1 bounds every GEMM.
    plain = _vjp(lambda a, b: a @ b, x, w, dy)
    for q, p in zip((y, dx, dw), plain):
        assert _rel(q, p) < 0.1


# --------------------------------------------------------------- the kernel reachable from a model config
def test_nvfp4_impl_config_field_reaches_the_recipe():
    from nemotron_jax.config import ConfigError, ModelConfig
    from nemotron_jax.quant import dispatch, policy

    assert ModelConfig.tiny().nvfp4_impl == "reference"  # until the GPU script has validated the kernel
    for impl in dispatch.CONFIG_IMPLS:
        cfg = ModelConfig.tiny(precision="nvfp4", nvfp4_impl=impl)
        assert NVFP4Recipe.from_config(cfg).impl == impl
        assert NVFP4Recipe.from_config(cfg, impl="reference").impl == "reference"  # explicit override
        gemms = [policy.gemm_for(cfg, i, role, f"layers.{i}.{role}") for i in range(cfg.num_hidden_layers)
                 for role in ("mamba.in_proj", "mlp.up", "moe.shared")]
        nv = [g for g in gemms if g is not None and g.fmt == "nvfp4"]
        assert nv and all(g.recipe.impl == impl for g in nv)
        for i in range(cfg.num_hidden_layers):
            r = policy.ragged_dot_for(cfg, i, f"layers.{i}.mixer.experts")
            assert r is None or r.recipe.impl == impl
    with pytest.raises(ConfigError, match=r"nvfp4_impl='triton'.*use one of \('auto', 'reference', 'pallas'\)"):
        ModelConfig.tiny(nvfp4_impl="triton")
    with pytest.raises(ValueError, match="NVFP4Recipe.impl='cuda'"):
        NVFP4Recipe(impl="cuda")


def test_pallas_impl_runs_interpreted_on_cpu_and_fails_closed():
    """impl="pallas" (as ssd_impl="pallas") runs the kernel under the interpreter off GPU: the dense and grouped
    recipes give the reference's bits, forward and backward. A call the kernel does not support raises a
    ValueError naming the shape (no silent fallback); only "auto" falls back, to the reference off GPU."""
    from nemotron_jax.quant import dispatch

    k = jax.random.key(11)
    ref, pal = NVFP4Recipe(impl="reference"), NVFP4Recipe(impl="pallas")
    for a, b in zip(_dense(ref)(X, W, DY, k), _dense(pal)(X, W, DY, k)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, dy = X.reshape(-1, 64)[:40], DY.reshape(-1, 32)[:40]
    w = W[None].repeat(3, 0) * jnp.arange(1, 4, dtype=F)[:, None, None]
    gs = jnp.array([10, 0, 30], jnp.int32)
    f = lambda r: jax.jit(lambda: _vjp(lambda a, b: nvfp4_ragged_dot(a, b, gs, k, r), x, w, dy))()  # noqa: E731
    for a, b in zip(f(ref), f(pal)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert dispatch.resolve("pallas", (40, 64), jnp.float32) == "pallas"
    assert dispatch.resolve("auto", (40, 64), jnp.float32) == "reference"  # CPU
    with pytest.raises(ValueError, match=r"does not support shape \(40, 64\), dtype int32.*nvfp4_impl"):
        dispatch.resolve("pallas", (40, 64), jnp.int32)
    with pytest.raises(ValueError, match="does not support shape"):
        dispatch.qdq(jnp.ones((8, 24)), impl="pallas")
