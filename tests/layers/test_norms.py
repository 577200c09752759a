"""RMSNorm and the gated grouped RMSNorm against float64 formulas written here."""

import jax
import numpy as np
import pytest

from nemotron_jax.layers.norms import gated_group_rms_norm, rms_norm


def test_rms_norm_is_plain_scale_no_offset():
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 8)), np.float64)
    w = np.linspace(0.5, 1.5, 8)
    want = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(x.astype(np.float32), w.astype(np.float32), 1e-5), want, rtol=1e-6)


def test_gated_group_norm_gates_first_then_normalises_each_group():
    k1, k2 = jax.random.split(jax.random.key(1))
    y = np.asarray(jax.random.normal(k1, (2, 12)), np.float64)
    z = np.asarray(jax.random.normal(k2, (2, 12)), np.float64)
    w = np.linspace(0.5, 1.5, 12)
    g = (y * z / (1 + np.exp(-z))).reshape(2, 3, 4)  # y * silu(z), 3 groups of 4
    want = (g / np.sqrt(np.mean(g * g, -1, keepdims=True) + 1e-5)).reshape(2, 12) * w
    got = gated_group_rms_norm(y.astype(np.float32), z.astype(np.float32), w.astype(np.float32), groups=3, eps=1e-5)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not split into 5 groups"):
        gated_group_rms_norm(y, z, w, groups=5, eps=1e-5)
