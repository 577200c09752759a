"""The CPU blocked causal attention against a float64 numpy oracle (values) and tokamax's XLA attention (values
and gradients), at small blocks so every case has several query blocks, a ragged last block and documents that
cross block edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.layers import attention as A
from nemotron_jax.ops.blocked_attention import blocked_causal_attention, supports
from tests.helpers.attention import softmax_reference

# a row of four documents (one of length 1) and a row that is one document; t = 13 is not a multiple of any block
SEG = np.array([[0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3], [7] * 13])


def _qkv(b, t, n, kv, h, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, t, m, h), jnp.float32).astype(dtype)
               for kk, m in zip(ks[:3], (n, kv, kv)))
    ct = jax.random.normal(ks[3], (b, t, n, h), jnp.float32).astype(dtype)
    return q, k, v, ct


@pytest.mark.parametrize("block", [1, 5, 16])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("use_seg", [True, False])
def test_values_match_the_float64_oracle(block, heads, use_seg):
    n, kv = heads
    q, k, v, _ = _qkv(2, 13, n, kv, 8)
    seg = jnp.asarray(SEG) if use_seg else None
    got = blocked_causal_attention(q, k, v, seg, block=block)
    # fp32 logits and softmax over at most 13 keys against float64: the same bound as the tokamax core's test
    # (tests/layers/test_attention.py: measured 6.1e-7 on outputs up to ~3)
    np.testing.assert_allclose(got, softmax_reference(q, k, v, seg), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_seg", [True, False])
def test_gradients_match_tokamax_xla(use_seg):
    q, k, v, ct = _qkv(2, 40, 4, 2, 16, seed=1)
    seg = jnp.asarray(np.array([[0] * 7 + [1] * 20 + [2] * 13, [3] * 40])) if use_seg else None

    def loss(impl):
        return lambda q, k, v: jnp.sum(impl(q, k, v) * ct)

    ours = jax.grad(loss(lambda q, k, v: blocked_causal_attention(q, k, v, seg, block=16)), argnums=(0, 1, 2))
    xla = jax.grad(loss(lambda q, k, v: A.causal_attention(q, k, v, seg, implementation="xla")), argnums=(0, 1, 2))
    # fp32 both sides, the same softmax and products summed in another order (dk and dv sum over up to 40 query
    # rows x 2 heads): measured max |diff| 1.9e-6 on gradients up to ~5.5 (a few fp32 ulps there); 2.5x margin
    for name, g, r in zip("qkv", ours(q, k, v), xla(q, k, v)):
        np.testing.assert_allclose(g, r, atol=5e-6, rtol=0, err_msg=f"d{name}")


def test_bf16_within_one_rounding_of_tokamax():
    q, k, v, _ = _qkv(2, 40, 4, 2, 16, jnp.bfloat16, seed=2)
    got = blocked_causal_attention(q, k, v, block=16).astype(jnp.float32)
    ref = A.causal_attention(q, k, v, implementation="xla").astype(jnp.float32)
    # both: fp32 logits and softmax, probabilities rounded to bf16 for the second GEMM, the output rounded to bf16;
    # outputs reach ~3.1, where one bf16 ulp is 2^-6: at most one output rounding apart (measured 2^-7)
    np.testing.assert_allclose(got, ref, atol=2.0 ** -6, rtol=0)


def test_the_cpu_dispatch_takes_the_blocked_op_past_one_block(monkeypatch):
    calls = []
    real = A.blocked_attention.blocked_causal_attention
    monkeypatch.setattr(A.blocked_attention, "blocked_causal_attention",
                        lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
    for t in (8, 200):
        q, k, v, _ = _qkv(1, t, 2, 1, 8)
        got = A.causal_attention(q, k, v)
        np.testing.assert_allclose(got, A.causal_attention(q, k, v, implementation="xla"), atol=1e-6, rtol=1e-6)
    assert supports(200) and not supports(8)
    assert calls == [200]  # t = 8 is one block: tokamax


def test_bad_shapes_are_refused():
    q, k, v, _ = _qkv(1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="kv dividing"):
        blocked_causal_attention(q, k, v)
    q, k, v, _ = _qkv(1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match="want k and v"):
        blocked_causal_attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="block must be"):
        blocked_causal_attention(q, k, v, block=0)
