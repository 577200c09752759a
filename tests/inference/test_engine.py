"""Cached inference against the full forward (the oracle): prefill slices, decode steps, generation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax import ModelConfig, NemotronModel
from nemotron_jax.inference import engine as E
from nemotron_jax.inference.naive import sample as naive_sample
from nemotron_jax.inference.sampling import Sampling, filtered_logits, probs

# fp32 throughout: cached and full paths run the same math in another order (chunked SSD from a state vs one
# pass; blocked online softmax vs tokamax). Measured differences are ~2e-7 on logits of magnitude ~1; 1e-5
# leaves a 50x margin and still fails on any state or position bug (those move logits by 1e-2 or more).
TOL = 1e-5


@pytest.fixture(scope="module")
def net():
    # every layer kind: Mamba, attention, MoE with LatentMoE, MLP; and an MTP block
    cfg = ModelConfig.tiny(hybrid_override_pattern="M*EM-E", moe_latent_size=32, num_nextn_predict_layers=1,
                           chunk_size=8)
    return NemotronModel(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def seqs():
    return np.random.default_rng(0).integers(0, 256, (3, 24)).astype(np.int32)


def test_sliced_prefill_then_decode_steps_equal_full_forward(net, seqs):
    lengths = np.array([13, 5, 20], np.int32)
    full = np.asarray(net(jnp.asarray(seqs)))  # [3, 24, v]
    gd, st = nnx.split(net)
    # every prompt position, through model.extend over slices of 8 (rows end in different slices)
    cache = net.init_cache(3, 256)
    got = []
    for s in range(0, 24, 8):
        valid = jnp.asarray(np.clip(lengths - s, 0, 8), jnp.int32)
        h, cache = net.extend(jnp.asarray(seqs[:, s:s + 8]), cache, valid=valid, start=s)
        got.append(np.asarray(net.logits(h)))
    got = np.concatenate(got, axis=1)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i, :n], full[i, :n], atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    # engine.prefill (slices of 8) then one-token steps through the rest of each row
    logits, cache = E.prefill((gd, st), seqs, lengths, max_len=256, chunk=8)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i], full[i, n - 1], atol=TOL, rtol=0)
    for k in range(24 - int(lengths.min())):
        pos = np.minimum(lengths + k, 23)
        logits, cache = E.decode_step(gd, st, jnp.asarray(seqs[np.arange(3), pos]), cache)
        for i in range(3):
            if lengths[i] + k < 23:  # logits at position lengths+k predict the token after it
                np.testing.assert_allclose(logits[i], full[i, lengths[i] + k], atol=TOL, rtol=0)


def test_cached_greedy_equals_uncached_greedy(net, seqs):
    gd, st = nnx.split(net)
    prompts = [seqs[0, :7].tolist(), seqs[1, :3].tolist()]
    out = E.generate(net, prompts, max_new_tokens=12)
    for p, got in zip(prompts, out.tokens):
        want = naive_sample(gd, st, np.asarray(p), max_new_tokens=12, temperature=0.0)
        assert got == want.tolist()
    assert out.stop_reasons == ["max_new_tokens"] * 2
    # log-probs are the model's: recompute the first one from the full forward
    first = jax.nn.log_softmax(net(jnp.asarray([prompts[0]]))[0, -1])[out.tokens[0][0]]
    np.testing.assert_allclose(out.logprobs[0][0], first, atol=TOL)


def test_stop_tokens_end_rows_with_their_reason(net, seqs):
    prompts = [seqs[0, :7].tolist(), seqs[2, :4].tolist()]
    free = E.generate(net, prompts, max_new_tokens=10)
    stop = free.tokens[0][3]  # row 0 emits it at step 3 (perhaps earlier: stop at its first occurrence)
    first = free.tokens[0].index(stop)
    others = [t for t in range(256) if t not in free.tokens[1]][:1]
    out = E.generate(net, prompts, max_new_tokens=10, stop_tokens=[stop] + others)
    assert out.tokens[0] == free.tokens[0][: first + 1] and out.stop_reasons[0] == "stop_token"
    if stop not in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1] and out.stop_reasons[1] == "max_new_tokens"
    assert len(out.logprobs[0]) == first + 1


def test_reasoning_budget_closes_thinking_after_exactly_n_tokens(net, seqs):
    prompts = [seqs[0, :7].tolist(), seqs[1, :5].tolist()]
    free = E.generate(net, prompts, max_new_tokens=12)
    marker = [0, 1]  # ids neither row emits on its own
    assert not any(t in marker for row in free.tokens for t in row)
    out = E.generate(net, prompts, max_new_tokens=12, reasoning_budget=4, think_end=marker)
    for row, ref in zip(out.tokens, free.tokens):
        assert row[:4] == ref[:4] and row[4:6] == marker
    # a row that closes the span itself (its own token 2 taken as a one-token marker) is never forced
    own = free.tokens[0][2]
    out = E.generate(net, prompts[:1], max_new_tokens=12, reasoning_budget=5, think_end=[own])
    assert out.tokens[0] == free.tokens[0]


def test_sampling_is_seeded_and_filters_as_specified(net, seqs):
    prompts = [seqs[0, :7].tolist()] * 2
    a = E.generate(net, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    b = E.generate(net, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    c = E.generate(net, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.tokens[0] != a.tokens[1]  # rows draw independently
    # filters against numpy: logits [4, 1, 3, 2, 0] / T=2 -> top_k=3 keeps {4, 3, 2}; top_p=0.6 keeps the
    # tokens whose more-likely mass is < 0.6
    x = jnp.asarray([[4.0, 1.0, 3.0, 2.0, 0.0]])
    got = np.asarray(filtered_logits(x, Sampling(2.0, top_k=3)))
    np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, True, True, False])
    p = np.exp(np.array([4.0, 1.0, 3.0, 2.0, 0.0]) / 2.0)
    p /= p.sum()  # sorted: 0.506 (id 0), 0.307 (id 2), ... -> cumulative-before 0, 0.506, 0.813
    got = np.asarray(probs(x, Sampling(2.0, top_p=0.6)))[0]
    np.testing.assert_allclose(got, np.array([p[0], 0, p[2], 0, 0]) / (p[0] + p[2]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(probs(x, Sampling()))[0], [1, 0, 0, 0, 0])


def test_one_compile_per_batch_and_bucket(net, seqs):
    E.generate(net, [seqs[0, :9].tolist(), seqs[1, :4].tolist()], max_new_tokens=6)
    sizes = (E._decode._cache_size(), E._prefill_slice._cache_size())
    E.generate(net, [seqs[0, :5].tolist(), seqs[2, :11].tolist()], max_new_tokens=9)  # same bucket, other lengths
    assert (E._decode._cache_size(), E._prefill_slice._cache_size()) == sizes


def test_ssm_cache_dtype_and_bf16_compute():
    cfg = ModelConfig.tiny(dtype="bfloat16", mamba_ssm_cache_dtype="bfloat16")
    net = NemotronModel(cfg, rngs=nnx.Rngs(1))
    cache = net.init_cache(2, 256)
    assert cache.layers[0].ssm.dtype == jnp.bfloat16 and cache.layers[1].k.dtype == jnp.bfloat16
    toks = np.random.default_rng(1).integers(0, 256, (1, 12)).astype(np.int32)
    gd, st = nnx.split(net)
    logits, _ = E.prefill((gd, st), toks, np.array([12]), max_len=256)
    # bf16 compute: the cached and full paths round at different points; a few bf16 ulps of the logits
    np.testing.assert_allclose(logits[0], net(jnp.asarray(toks))[0, -1], atol=0.05)
    assert NemotronModel(ModelConfig.tiny(), rngs=nnx.Rngs(1)).init_cache(1, 256).layers[0].ssm.dtype == jnp.float32


@pytest.mark.parametrize("prompts,kw,match", [
    ([[1, 300]], {}, r"token id 300 at position 1 is outside the vocabulary \[0, 256\)"),
    ([[5, -1]], {}, r"token id -1"),
    ([[]], {}, r"prompt 0 is empty"),
    ([], {}, r"batch is empty"),
    ([[1.5, 2.0]], {}, r"must be integers"),
    ([list(range(200))], {"max_len": 256}, r"max_len=256 is too short"),
    ([[1, 2]], {"max_new_tokens": 0}, r"max_new_tokens must be a positive int"),
    ([[1, 2]], {"temperature": -1.0}, r"temperature must be >= 0"),
    ([[1, 2]], {"top_p": 0.0}, r"top_p must lie in"),
    ([[1, 2]], {"stop_tokens": [999]}, r"stop_tokens"),
    ([[1, 2]], {"reasoning_budget": 3}, r"needs think_end"),
    ([[1, 2]], {"speculative": "mtp", "draft_len": 0}, r"draft_len must be an int >= 1"),
    ([[1, 2]], {"speculative": "medusa"}, r"speculative must be None or 'mtp'"),
])
def test_bad_input_is_refused_with_a_clear_error(net, prompts, kw, match):
    kw = {"max_new_tokens": 100, **kw}
    with pytest.raises(ValueError, match=match):
        E.generate(net, prompts, **kw)


def test_context_beyond_max_position_embeddings_is_refused():
    net = NemotronModel(ModelConfig.tiny(max_position_embeddings=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the model's context, max_position_embeddings=64"):
        E.generate(net, [list(range(60))], max_new_tokens=10)


def test_speculative_needs_an_mtp_block():
    net = NemotronModel(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a model with an MTP block"):
        E.generate(net, [[1, 2]], max_new_tokens=4, speculative="mtp")
