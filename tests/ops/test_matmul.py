"""ops.matmul: 16-bit GEMM operands widened to fp32 on CPUs without AMX, for training-size GEMMs only.

The widened GEMM must be the 16-bit GEMM with fp32 accumulation: checked against the float64 product of the
same bf16 values (the result rounds to within one bf16 ulp of it, as the 16-bit GEMM's own), forward and both
gradients; the choice itself (sizes, dtypes, platform, AMX) is read off the traced program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemotron_jax import platform
from nemotron_jax.ops import matmul

bf16 = jnp.bfloat16


@pytest.fixture
def no_amx(monkeypatch):
    monkeypatch.setattr(matmul, "_host_has_amx", lambda: False)


def _widened(fn, *args) -> bool:
    """Whether the traced fn converts a bf16 operand to fp32 before its dot."""
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)  # a fresh function: jax caches traces by function
    return any(e.primitive.name == "convert_element_type" and e.params["new_dtype"] == jnp.float32
               and e.invars[0].aval.dtype == bf16 for e in jaxpr.eqns)


def _bf16_ulp(v):
    """One bf16 ulp at |v| (8 significant bits)."""
    e = np.floor(np.log2(np.maximum(np.abs(v), np.finfo(np.float32).tiny)))
    return 2.0 ** (e - 7)


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), bf16)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, bf16)
    return x, w


@pytest.mark.parametrize("m,k,n,want", [(512, 256, 384, True), (255, 256, 384, False), (512, 128, 384, False),
                                        (512, 256, 8, False), (8, 256, 384, False)])
def test_widens_only_training_size_gemms(no_amx, m, k, n, want):
    x, w = _operands(m, k, n)
    assert _widened(matmul.dense, x, w) is want


def test_never_widens_with_amx_off_cpu_fp32_or_fp8(monkeypatch):
    x, w = _operands(512, 256, 384)
    monkeypatch.setattr(matmul, "_host_has_amx", lambda: True)
    assert not _widened(matmul.dense, x, w)
    monkeypatch.setattr(matmul, "_host_has_amx", lambda: False)
    assert _widened(matmul.dense, x, w)
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    assert not matmul.widens() and not _widened(matmul.dense, x, w)
    monkeypatch.setattr(platform, "backend", lambda: "cpu")
    a, b = matmul.operands(x.astype(jnp.float32), w.astype(jnp.float32), ((1,), (0,)))
    assert a.dtype == b.dtype == jnp.float32  # fp32 stays fp32 (nothing to widen)
    f8 = x.astype(jnp.float8_e4m3fn)
    a, b = matmul.operands(f8, w, ((1,), (0,)))
    assert a.dtype == jnp.float8_e4m3fn and b.dtype == bf16  # an fp8 operand keeps its own GEMM


def test_dense_is_the_bf16_gemm_with_fp32_accumulation(no_amx):
    x, w = _operands(512, 256, 384)
    got = jax.jit(matmul.dense)(x[None], w)  # leading dims flattened and restored
    assert got.dtype == bf16 and got.shape == (1, 512, 384)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # both the widened GEMM and the 16-bit one round an fp32 sum of exact products to bf16: within one ulp
    err = np.abs(np.asarray(got[0], np.float64) - exact)
    assert np.all(err <= _bf16_ulp(exact) + 1e-6 * np.abs(exact).max())
    unwidened = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(bf16)
    assert np.mean(np.asarray(got[0]) != np.asarray(unwidened)) < 0.01  # the sums' order moves a few roundings


def test_dense_gradients_match_the_float64_products(no_amx):
    x, w = _operands(512, 256, 384, seed=1)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal((512, 384)), bf16)
    _, vjp = jax.vjp(matmul.dense, x, w)
    dx, dw = jax.jit(vjp)(dy)
    assert dx.dtype == dw.dtype == bf16
    d64, x64, w64 = (np.asarray(a, np.float64) for a in (dy, x, w))
    for got, exact in ((dx, d64 @ w64.T), (dw, x64.T @ d64)):
        err = np.abs(np.asarray(got, np.float64) - exact)
        assert np.all(err <= _bf16_ulp(exact) + 1e-6 * np.abs(exact).max())


def test_fp32_dense_is_jnp_dot_bit_for_bit(no_amx):
    x, w = (a.astype(jnp.float32) for a in _operands(300, 256, 384))
    got = jax.jit(matmul.dense)(x, w)
    want = jax.jit(jnp.dot)(x, w)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))
    assert ml_dtypes.finfo(ml_dtypes.bfloat16).nmant == 7  # the ulp helper's premise
