"""The Mamba causal conv (hand-written VJP) against an independent oracle: `lax.conv_general_dilated`, grouped
per channel, differentiated by autodiff (ops/causal_conv.causal_conv1d_reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.ops.causal_conv import causal_conv1d, causal_conv1d_reference

# fp32: both sides sum k = 4 fp32 products (the oracle at HIGHEST precision) in different orders; the gradients
# sum up to b*t = 40 terms: a few fp32 ulps of the largest term.
RTOL, ATOL = 1e-5, 1e-5


def _inputs(dtype, b=2, t=20, c=24, k=4, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (b, t, c), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[1], (k, c), jnp.float32)
    bias = jax.random.normal(ks[2], (c,), jnp.float32)
    hist = jax.random.normal(ks[3], (b, k - 1, c), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[4], (b, t, c), jnp.float32).astype(dtype)
    return x, w, bias, hist, ct


# two rows: documents of lengths 1, 2, 5, ...; the second row reuses id 0 after another document ([0, 1, 0]
# is three documents: the third must not see the first)
SEGMENTS = np.array([[0] * 1 + [1] * 2 + [2] * 5 + [3] * 12,
                     [0] * 3 + [1] * 1 + [0] * 6 + [5] * 10])


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom_vjp", "autodiff"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("use_hist", [True, False])
@pytest.mark.parametrize("use_seg", [True, False])
def test_values_and_vjp_match_the_oracle_fp32(use_bias, use_hist, use_seg, custom_vjp):
    x, w, bias, hist, ct = _inputs(jnp.float32)
    seg = jnp.asarray(SEGMENTS) if use_seg else None
    bias = bias if use_bias else None
    hist = hist if use_hist else None

    def run(fn):
        def f(x, w, bias, hist):
            return fn(x, w, bias, seg, hist)
        return jax.vjp(f, x, w, bias, hist)

    y, vjp = run(lambda *a: causal_conv1d(*a, custom_vjp=custom_vjp))
    y_ref, vjp_ref = run(causal_conv1d_reference)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom_vjp", "autodiff"])
def test_segments_cut_taps_across_documents(custom_vjp):
    """Hand-checkable: weights 1 and an impulse at the last token of a document: the next document's outputs
    must not see it, the same document's later outputs must (none here: it is the last)."""
    x = jnp.zeros((1, 6, 1)).at[0, 2, 0].set(1.0)
    w = jnp.ones((4, 1))
    seg = jnp.array([[0, 0, 0, 1, 1, 0]])
    y = causal_conv1d(x, w, None, seg, custom_vjp=custom_vjp)[0, :, 0]
    np.testing.assert_array_equal(y, [0, 0, 1, 0, 0, 0])
    y_plain = causal_conv1d(x, w, None)[0, :, 0]
    np.testing.assert_array_equal(y_plain, [0, 0, 1, 1, 1, 1])


def test_bf16_inputs_match_the_oracle_to_a_bf16_rounding():
    """bf16 x and history, fp32 weights: both sides accumulate in fp32 and round once to bf16, so outputs agree
    within one bf16 ulp (2^-8 relative); gradients of x are likewise rounded once, those of w and b are fp32."""
    x, w, bias, hist, ct = _inputs(jnp.bfloat16)
    seg = jnp.asarray(SEGMENTS)

    def run(fn):
        return jax.vjp(lambda x, w, bias, hist: fn(x, w, bias, seg, hist), x, w, bias, hist)

    y, vjp = run(causal_conv1d)
    y_ref, vjp_ref = run(causal_conv1d_reference)
    assert y.dtype == jnp.bfloat16
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f(y), f(y_ref), rtol=2 ** -8, atol=1e-6)
    (dx, dw, db, dh), (dx_r, dw_r, db_r, dh_r) = vjp(ct), vjp_ref(ct)
    assert dx.dtype == jnp.bfloat16 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(f(dx), f(dx_r), rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(f(dh), f(dh_r), rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(dw, dw_r, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(db, db_r, rtol=RTOL, atol=1e-4)
