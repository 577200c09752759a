"""MTP speculative decoding: greedy equals plain greedy, the committed cache equals plain decoding's, speculative
sampling keeps the main model's distribution, bad input.

A tiny fp32 model with every layer kind (Mamba, attention, MoE with LatentMoE, MLP) and an MTP block is trained
for a few dozen steps on sequences with a deterministic rule t_{i+1} = (5 t_i + 3) mod V, except that a token
t = 1 (mod 6) is followed by a random one. Main and MTP heads learn the rule quickly, so drafts inside a
deterministic run get accepted and a draft after a random position is usually rejected: verifies with all K
drafts accepted and verifies with a rejection both occur.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemotron_jax import ModelConfig, NemotronModel
from nemotron_jax import model as M
from nemotron_jax.inference import engine as E
from nemotron_jax.inference import speculative as S
from nemotron_jax.inference.sampling import Sampling, probs
from nemotron_jax.layers.cache import AttnCache, MambaCache
from nemotron_jax.losses import cross_entropy, shifted_targets

V = 32
MAX_NEW = 20
D = 2  # mtp_depths
TOL = 1e-5  # fp32: cached paths differ from each other by ~1e-7; any state or position bug moves values by >1e-2


def _cfg(**kw):
    return ModelConfig.tiny(**{**dict(hybrid_override_pattern="M*E-", num_nextn_predict_layers=1, mtp_depths=D,
                                      moe_latent_size=32, vocab_size=V), **kw})


def _sequences(rng, b, t):
    x = np.zeros((b, t), np.int64)
    x[:, 0] = rng.integers(0, V, b)
    for i in range(1, t):
        rule = (5 * x[:, i - 1] + 3) % V
        x[:, i] = np.where(x[:, i - 1] % 6 != 1, rule, rng.integers(0, V, b))
    return x.astype(np.int32)


@pytest.fixture(scope="module")
def trained():
    net = NemotronModel(_cfg(), rngs=nnx.Rngs(0))
    gd, params, rest = nnx.split(net, nnx.Param, ...)
    opt = optax.adam(3e-3)

    def loss_fn(p, toks):
        # main + depth-1 MTP cross-entropy (total_loss over both depths compiles twice as long; drafting applies
        # the same block recursively, and depth 1 alone already gives full acceptances at draft_len D + 2)
        m = nnx.merge(gd, p, rest)
        out = m.forward(toks, mtp=False)
        h1, _, _ = m.mtp(out.hidden, m.embed(M.shift_tokens(toks, 1)))
        return (cross_entropy(out.logits, *shifted_targets(toks, 1))
                + cross_entropy(m.logits(h1), *shifted_targets(toks, 2)))

    @jax.jit
    def step(params, opt_state, toks):
        grads = jax.grad(loss_fn)(params, toks)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state, rng = opt.init(params), np.random.default_rng(0)
    for _ in range(60):
        params, opt_state = step(params, opt_state, jnp.asarray(_sequences(rng, 16, 24)))
    return nnx.merge(gd, params, rest)


@pytest.fixture(scope="module")
def prompts():
    """Pattern prompts, random prompts, a pattern with a random tail and a one-token prompt (no MTP entry before
    the first round); different lengths."""
    rng = np.random.default_rng(1)
    return ([_sequences(rng, 1, n)[0].tolist() for n in (5, 9)] + [rng.integers(0, V, n).tolist() for n in (3, 7)]
            + [_sequences(rng, 1, 6)[0].tolist() + rng.integers(0, V, 2).tolist(), [7]])


@pytest.fixture(scope="module")
def greedy_ref(trained, prompts):
    """Plain greedy output, and a stop token that ends some rows early and never shows up in others."""
    ref = E.generate(trained, prompts, max_new_tokens=MAX_NEW, temperature=0.0)
    for s in range(V):
        pos = [t.index(s) if s in t else None for t in ref.tokens]
        if any(p is None for p in pos) and any(p is not None and p < MAX_NEW - 2 for p in pos):
            return ref, s
    raise AssertionError("no token ends some rows and not others; change the prompts")


def _truncate(ref, stop):
    toks, lps, reasons = [], [], []
    for t, lp in zip(ref.tokens, ref.logprobs):
        n = t.index(stop) + 1 if stop in t else len(t)
        toks.append(t[:n])
        lps.append(lp[:n])
        reasons.append("stop_token" if stop in t else "max_new_tokens")
    return toks, lps, reasons


@pytest.mark.parametrize("k", [1, D, D + 2])
def test_greedy_speculative_equals_plain_greedy(trained, prompts, greedy_ref, k):
    ref, stop = greedy_ref
    want_toks, want_lps, want_reasons = _truncate(ref, stop)  # greedy with a stop token = truncated greedy
    chunks = []
    out = E.generate(trained, prompts, max_new_tokens=MAX_NEW, temperature=0.0, speculative="mtp", draft_len=k,
                     stop_tokens=[stop], decode_chunk=4, on_tokens=lambda t, live: chunks.append((t, live)))
    assert out.tokens == want_toks
    assert out.stop_reasons == want_reasons
    assert "stop_token" in out.stop_reasons and "max_new_tokens" in out.stop_reasons
    for got, want in zip(out.logprobs, want_lps):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # streaming: every token exactly once, in order, in several chunks
    assert len(chunks) > 1
    streamed = np.concatenate([t for t, _ in chunks], axis=1)
    live = np.concatenate([m for _, m in chunks], axis=1)
    assert [streamed[i][live[i]].tolist() for i in range(len(prompts))] == out.tokens
    # drafts were both all accepted and rejected
    acc = out.accepted[out.accepted >= 0]
    assert (acc == k).any() and (acc < k).any(), out.accepted
    assert 1.0 < out.acceptance_length < k + 1
    assert out.acceptance_length == pytest.approx((acc + 1).mean())
    print(f"draft_len={k}: acceptance length {out.acceptance_length:.3f} over {acc.size} row-verifies")


def _plain_caches(gd, st, toks, lens, fed, max_len):
    """engine.prefill of the prompts, then engine.decode_step over each row's tokens `fed[i]`: row i's cache
    (numpy) once it has taken all of them (rows take different numbers of tokens)."""
    _, cache = E.prefill((gd, st), toks, lens, max_len=max_len)
    out = {}
    for j in range(max(len(f) for f in fed) + 1):
        for i, f in enumerate(fed):
            if len(f) == j:
                out[i] = jax.tree.map(lambda a: np.asarray(a)[i], cache)
        step = [f[j] if j < len(f) else 0 for f in fed]
        _, cache = E.decode_step(gd, st, jnp.asarray(step, jnp.int32), cache)
    return out


def test_committed_cache_equals_plain_decoding(trained, prompts, greedy_ref):
    """After rounds with rejections: the main cache == plain prefill + decode steps over the same tokens (Mamba
    conv and SSM states, lengths, K/V over the valid positions); the MTP cache and h1 == what a prefill of the
    whole sequence so far gives (MTP K/V over the valid positions; h1 = mtp(h_{L-1}, x))."""
    _, stop = greedy_ref
    k = D + 2
    gd, st = nnx.split(trained)
    toks, lens = E.check_prompts(prompts, V)
    max_len = E.bucket(int(lens.max()) + MAX_NEW + k + 1)  # generate's: the compiled functions are reused
    greedy = Sampling()
    logits, hidden, cache = S.prefill_mtp((gd, st), toks, lens, max_len=max_len)
    c = S.start((gd, st), logits, hidden, cache, max_new_tokens=MAX_NEW, sampling=greedy, stop_tokens=[stop])
    rejected = 0
    for r in (1, 2):
        c = S.run_rounds((gd, st), c, max_new_tokens=MAX_NEW, sampling=greedy, draft_len=k, stop_tokens=[stop],
                         max_rounds=r)
        assert int(c.round) == r
        n, count, done = np.asarray(c.accepted[r - 1]), np.asarray(c.count), np.asarray(c.done)
        lengths, emitted = np.asarray(c.cache.lengths), np.asarray(c.tokens)
        rows = [i for i in range(len(prompts)) if not done[i]]  # a finished row's emitted tokens are cut
        assert rows
        rejected += sum(0 <= n[i] < k for i in rows)
        fed = [emitted[i, :count[i] - 1].tolist() for i in range(len(prompts))]  # all but the pending token
        plain = _plain_caches(gd, st, toks, lens, fed, max_len)
        seqs = [list(prompts[i]) + fed[i] for i in range(len(prompts))]
        seq_lens = np.asarray([len(q) for q in seqs], np.int32)
        seq_arr = np.zeros((len(seqs), seq_lens.max()), np.int32)
        for i, q in enumerate(seqs):
            seq_arr[i, :len(q)] = q
        lg, hd, ch = S.prefill_mtp((gd, st), seq_arr, seq_lens, max_len=max_len)
        ref = S.start((gd, st), lg, hd, ch, max_new_tokens=MAX_NEW, sampling=greedy, stop_tokens=[stop])
        for i in rows:
            L = int(seq_lens[i])
            assert lengths[i] == L and plain[i].lengths == L
            for got, want in zip(c.cache.layers, plain[i].layers):
                if isinstance(got, MambaCache):
                    np.testing.assert_allclose(got.conv[i], want.conv, atol=TOL, rtol=0)
                    np.testing.assert_allclose(got.ssm[i], want.ssm, atol=TOL, rtol=0)
                elif isinstance(got, AttnCache):
                    np.testing.assert_allclose(got.k[i, :L], want.k[:L], atol=TOL, rtol=0)
                    np.testing.assert_allclose(got.v[i, :L], want.v[:L], atol=TOL, rtol=0)
            assert int(ref.x[i]) == emitted[i, count[i] - 1] == int(c.x[i])
            np.testing.assert_allclose(c.h1[i], ref.h1[i], atol=TOL, rtol=0)
            for got, want in zip(c.cache.mtp, ref.cache.mtp):
                if isinstance(got, AttnCache):
                    np.testing.assert_allclose(got.k[i, :L], want.k[i, :L], atol=TOL, rtol=0)
                    np.testing.assert_allclose(got.v[i, :L], want.v[i, :L], atol=TOL, rtol=0)
    assert rejected > 0  # a compared row really had a rejection


# ----------------------------------------------------------------------------- speculative sampling
def _chi2_quantile(df: int, z: float) -> float:
    """Upper chi-square quantile for a standard-normal z (Wilson-Hilferty; good to ~1% for df >= 10)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


PROMPT8 = [3, 1, 4, 1]


@pytest.fixture(scope="module")
def untrained8():
    """Vocabulary of 8; a larger init makes logits O(1), so the untrained MTP block's q is far from the main p.
    Also: the main logits after PROMPT8 + (t1, t2) for all 64 pairs, from the full (uncached) forward."""
    net = NemotronModel(_cfg(vocab_size=8, initializer_range=0.25), rngs=nnx.Rngs(3))
    pairs = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(-1, 2)
    seqs = np.concatenate([np.tile(PROMPT8, (64, 1)), pairs], axis=1).astype(np.int32)
    gd, st = nnx.split(net)
    logits = jax.jit(lambda st, x: M.apply(gd, st, x, mtp=False).logits)(st, jnp.asarray(seqs))  # [64, P+2, 8]
    return net, logits


def _pooled_chi2(counts, expected):
    """Pearson chi-square, the least likely cells pooled into one bin until every bin expects >= 5."""
    order = np.argsort(expected)
    e, o = expected[order], counts[order]
    small = np.nonzero(e < 5)[0]
    j = max(int(np.searchsorted(np.cumsum(e), 5.0)), int(small[-1]) if small.size else -1)
    if j >= 0:
        e = np.append(e[j + 1:], e[:j + 1].sum())
        o = np.append(o[j + 1:], o[:j + 1].sum())
    return float(((o - e) ** 2 / e).sum()), len(e) - 1


@pytest.mark.parametrize("sampling,k", [(Sampling(1.0), D), (Sampling(0.9, top_k=6, top_p=0.9), 1)],
                         ids=["temperature1_k2", "topk_topp_k1"])
def test_speculative_sampling_keeps_the_main_distribution(untrained8, sampling, k):
    """Joint law of the first 3 emitted tokens over many independent rows == the exact law computed from the main
    model with sampling.probs (all 8^3 sequences), by a chi-square test at z = 4.75 (false alarm ~1e-6).

    Token 1 comes from the prefill logits; tokens 2 and 3 pass through accepted drafts, residual draws after a
    rejection and (draft_len 1) bonus draws after a full acceptance.
    """
    (net, logits), v, n_rows, p = untrained8, 8, 4096, len(PROMPT8)
    out = E.generate(net, [PROMPT8] * n_rows, max_new_tokens=3, temperature=sampling.temperature,
                     top_k=sampling.top_k, top_p=sampling.top_p, seed=0, speculative="mtp", draft_len=k,
                     max_len=16, prefill_chunk=8)
    first = out.accepted[0]  # drafts accepted in the first verify, per row
    assert (first == 0).mean() > 0.1 and (first > 0).mean() > 0.1, "want drafts both accepted and rejected often"
    got = np.asarray(out.tokens)
    assert got.shape == (n_rows, 3)
    counts = np.bincount(got[:, 0] * v * v + got[:, 1] * v + got[:, 2], minlength=v ** 3)

    # exact: p(t1) p(t2 | t1) p(t3 | t1 t2)
    p1 = np.asarray(probs(logits[:1, p - 1], sampling))[0]  # [v]
    p2 = np.asarray(probs(logits[:, p], sampling)).reshape(v, v, v)[:, 0]  # [t1, t2] (row t1*v + any t2)
    p3 = np.asarray(probs(logits[:, p + 1], sampling)).reshape(v, v, v)  # [t1, t2, t3]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)
    assert abs(exact.sum() - 1) < 1e-5
    assert counts[exact == 0].sum() == 0, "a token outside top-k / top-p was emitted"
    chi2, df = _pooled_chi2(counts, n_rows * exact)
    limit = _chi2_quantile(df, 4.75)
    tv = 0.5 * np.abs(counts / n_rows - exact).sum()
    print(f"{sampling}, draft_len={k}: chi2={chi2:.1f} (df={df}, limit {limit:.1f}), TV={tv:.4f}, first verify: "
          f"{(first == 0).mean():.2f} of rows rejected d1, acceptance length {out.acceptance_length:.2f}")
    assert chi2 < limit


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("draft_len", [0, -1, 2.5])
def test_bad_draft_len(untrained8, draft_len):
    with pytest.raises(ValueError, match=r"draft_len must be an int >= 1"):
        E.generate(untrained8[0], [[1, 2]], max_new_tokens=4, speculative="mtp", draft_len=draft_len)
    with pytest.raises(ValueError, match=r"draft_len must be an int >= 1"):
        S.decode_mtp(untrained8[0], None, None, None, max_new_tokens=4, sampling=Sampling(), draft_len=draft_len)


def test_speculative_needs_an_mtp_model():
    net = NemotronModel(ModelConfig.tiny(vocab_size=8), rngs=nnx.Rngs(0))  # num_nextn_predict_layers=0
    with pytest.raises(ValueError, match=r"needs a model with an MTP block"):
        E.generate(net, [[1, 2]], max_new_tokens=4, speculative="mtp")
    with pytest.raises(ValueError, match=r"needs a model with an MTP block"):
        S.prefill_mtp(net, [[1, 2]], [2], max_len=256)
    with pytest.raises(ValueError, match=r"speculative must be None or 'mtp'"):
        E.generate(net, [[1, 2]], max_new_tokens=4, speculative="medusa")
