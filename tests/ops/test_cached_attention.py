"""Blocked cached attention (online softmax over key blocks) against a float64 softmax written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.ops.cached_attention import cached_attention, write_kv


def _reference(q, k, v, q_pos):
    """q [b, t, nh, hd], k/v [b, s, kvh, hd]: query i of row b sees keys 0..q_pos[b, i] (GQA by head groups)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, nh, hd = q.shape
    rep = nh // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            n = int(q_pos[bi, i]) + 1
            for h in range(nh):
                s = k[bi, :n, h // rep] @ q[bi, i, h] / np.sqrt(hd)
                p = np.exp(s - s.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, :n, h // rep]
    return out


@pytest.mark.parametrize("block", [4, 16])
def test_matches_softmax_over_the_visible_keys(block):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 3, 4, 8))
    k = jax.random.normal(ks[1], (2, 16, 2, 8))
    v = jax.random.normal(ks[2], (2, 16, 2, 8))
    q_pos = jnp.array([[5, 6, 7], [0, 1, 13]])  # rows at different positions; one query sees only key 0
    got = cached_attention(q, k, v, q_pos, block=block)
    # fp32 scores and an online softmax vs float64: ~1e-7 measured; 1e-5 leaves margin, and a wrong mask or
    # a lost block moves outputs by O(1)
    np.testing.assert_allclose(got, _reference(q, k, v, np.asarray(q_pos)), atol=1e-5, rtol=0)


def test_keys_past_the_query_are_never_read():
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, 1, 2, 4))
    k = jax.random.normal(ks[1], (1, 8, 1, 4))
    v = jax.random.normal(ks[2], (1, 8, 1, 4))
    a = cached_attention(q, k, v, jnp.array([[3]]), block=4)
    b = cached_attention(q, k.at[:, 4:].set(1e9), v.at[:, 4:].set(jnp.nan), jnp.array([[3]]), block=4)
    np.testing.assert_array_equal(a, b)


def test_write_kv_puts_each_row_at_its_own_start():
    cache = jnp.zeros((2, 6, 1, 1))
    new = jnp.arange(1, 5, dtype=jnp.float32).reshape(2, 2, 1, 1)
    out = np.asarray(write_kv(cache, new, jnp.array([0, 3])))[..., 0, 0]
    np.testing.assert_array_equal(out, [[1, 2, 0, 0, 0, 0], [0, 0, 0, 3, 4, 0]])
    with pytest.raises(ValueError, match="multiple of the key block"):
        cached_attention(jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 6, 1, 2)), jnp.zeros((1, 6, 1, 2)),
                         jnp.zeros((1, 1), jnp.int32), block=4)
