"""MTP speculative decoding (spec section 3): the shared MTP block drafts, the main model verifies in one forward.

    out = generate(model, prompts, max_new_tokens=64, speculative="mtp", draft_len=3)   # engine.generate
    out.acceptance_length, out.accepted

State of a row at the start of a round (L = tokens in the main cache):
- the main cache holds t_0..t_{L-1}; the pending token x = t_L was chosen from the main logits at L-1 and emitted;
- the MTP cache holds correct depth-1 entries for positions 0..L-1 (entry j computed from (h_j, t_{j+1}), h the
  main hidden state after norm_f), and h1 = the MTP output at L-1, i.e. mtp(h_{L-1}, x): the first draft step.

A round (all rows together, inside one jitted `lax.while_loop`):
1. Draft: d_1 = choose(logits(h1)); for s = 2..K, h^s = mtp(h^{s-1}, d_{s-1}) at position L+s-2 (provisional MTP
   cache entries) and d_s = choose(logits(h^s)). The same block at every step, so K may exceed mtp_depths.
2. Verify [x, d_1..d_K] in ONE main `extend(..., keep_steps=True)` from L: main logits at positions L..L+K.
3. Accept (speculative sampling): d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), p and q the
   distributions `sampling.probs` gives for the main and the draft logits; at the first rejection (index n) the
   next token is drawn from normalize(max(0, p_{n+1} - q_{n+1})), and when all K are accepted the bonus token is
   drawn from p_{K+1}. Every emitted token is then distributed exactly as the main model's (filtered) sampling
   distribution. Greedy is the special case: p and q are one-hot, so a draft is accepted iff it is the main
   argmax, and the residual is the one-hot of the main argmax.
4. Commit n accepted drafts and the new token y: main length L+n+1; each Mamba layer keeps the verify's state
   after token n; attention needs nothing (K/V past the length are never read: queries see only keys at positions
   <= their own, and later calls overwrite them). One width-(K+1) MTP call from L over (main hidden of the verify,
   [d_1..d_n, y]) with valid n+1 rewrites the provisional MTP entries with correct depth-1 ones; its output at
   index n is the next round's h1 (draft step 1 of the next round merged into the commit). Pending x = y.

Nothing of a rejected position survives: Mamba state is picked per row, attention and MTP entries past the length
are overwritten before any query can see them. Rows stop at their first stop token (kept) or after
max_new_tokens; a finished row's cache is frozen while the others go on.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.inference.engine import (STOP_REASONS, GenerationResult, buffer_width, merge, prefill_slices,
                                           split_model)
from nemotron_jax.inference.sampling import Sampling, choose, probs, token_logprob
from nemotron_jax.layers.cache import CacheIndex, MambaCache
from nemotron_jax.layers.common import dtype_of
from nemotron_jax.model import DecodeCache

_STOP = STOP_REASONS.index("stop_token")
_MAX_NEW = STOP_REASONS.index("max_new_tokens")


@dataclasses.dataclass
class SpeculativeResult(GenerationResult):
    """GenerationResult plus per-verify statistics."""

    accepted: np.ndarray | None = None  # [verify forwards, b] drafts accepted (0..K) per round; -1: row finished
    draft_len: int = 0


# ----------------------------------------------------------------------------- prefill (main and MTP caches)
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3, 4))
def _prefill_slice(graphdef, state, cache: DecodeCache, last_logits_bv, last_hidden_bd, tokens_bt, next_bt, start,
                   valid_b, mtp_valid_b):
    model = merge(graphdef, state)
    hidden, cache = model.extend(tokens_bt, cache, valid=valid_b, start=start)
    # MTP depth-1 entries for this slice's positions j <= L-2: from (h_j, t_{j+1}); the whole prompt is known, so
    # t_{j+1} of the slice's last position comes from `next_bt` (the slice shifted by one)
    _, mtp = model.mtp_extend(hidden, next_bt, cache.mtp,
                              CacheIndex(jnp.broadcast_to(start, valid_b.shape), mtp_valid_b))
    last = jnp.take_along_axis(hidden, jnp.maximum(valid_b - 1, 0)[:, None, None], axis=1)[:, 0]
    here = (valid_b > 0)[:, None]
    return (jnp.where(here, model.logits(last), last_logits_bv),
            jnp.where(here, last.astype(last_hidden_bd.dtype), last_hidden_bd), cache._replace(mtp=mtp))


def prefill_mtp(model, tokens_bt, lengths_b, *, max_len: int, chunk: int = 4096
                ) -> tuple[jax.Array, jax.Array, DecodeCache]:
    """(logits [b, v] and main hidden [b, d] at each row's last prompt token, cache with the MTP cache filled).

    Like engine.prefill (same slicing), and in the same pass the MTP cache gets its depth-1 entries for prompt
    positions 0..L-2, from the slice's main hidden states and the prompt shifted by one: no second forward.
    """
    graphdef, state = split_model(model)
    tokens_bt, lengths_b = np.asarray(tokens_bt, np.int32), np.asarray(lengths_b, np.int32)
    b = tokens_bt.shape[0]
    net = merge(graphdef, state)
    if net.mtp is None:
        raise ValueError("speculative decoding needs a model with an MTP block (num_nextn_predict_layers=1)")
    # engine.prefill's slicing, with one more column: the next token of each slice's last position
    width, padded, slices = prefill_slices(tokens_bt, lengths_b, max_len=max_len, chunk=chunk, extra=1)
    cache = net.init_cache(b, max_len, mtp=True)
    logits = jnp.zeros((b, net.cfg.vocab_size), jnp.float32)
    hidden = jnp.zeros((b, net.cfg.hidden_size), dtype_of(net.cfg.dtype))
    for s, valid in slices:
        mtp_valid = np.clip(lengths_b - 1 - s, 0, width).astype(np.int32)
        logits, hidden, cache = _prefill_slice(
            graphdef, state, cache, logits, hidden, jnp.asarray(padded[:, s:s + width]),
            jnp.asarray(padded[:, s + 1:s + width + 1]), jnp.int32(s), jnp.asarray(valid), jnp.asarray(mtp_valid))
    return logits, hidden, cache


# ----------------------------------------------------------------------------- the round loop
class _Spec(NamedTuple):
    cache: DecodeCache  # main cache (lengths = L per row) and the MTP cache (correct for positions 0..L-1)
    x: jax.Array  # [b] int32 pending token t_L (already emitted)
    h1: jax.Array  # [b, d] MTP output at L-1: mtp(h_{L-1}, x), the first draft step
    tokens: jax.Array  # [b, W] int32 emitted tokens (-1 past each row's end); W >= max_new
    logprobs: jax.Array  # [b, W] fp32
    count: jax.Array  # [b] int32 tokens emitted so far
    done: jax.Array  # [b] bool
    reason: jax.Array  # [b] int32 index into STOP_REASONS
    accepted: jax.Array  # [W, b] int32 drafts accepted per round (-1: row not live in that round)
    key: jax.Array
    round: jax.Array  # int32 verify forwards so far


def _any_stop(tok, stop_ids):
    return jnp.any(tok[..., None] == stop_ids, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 7, 8), donate_argnums=(2,))
def _start(graphdef, state, cache: DecodeCache, logits_bv, hidden_bd, key, stop_ids, sampling: Sampling,
           width: int, max_new) -> _Spec:
    """Choose and emit x from the prefill logits; the first draft step h1 = mtp(h_{L-1}, x) at L-1."""
    model = merge(graphdef, state)
    b = logits_bv.shape[0]
    key, sub = jax.random.split(key)
    x = choose(logits_bv, sub, sampling)
    stop = _any_stop(x, stop_ids)
    h1, mtp = model.mtp_extend(hidden_bd[:, None], x[:, None], cache.mtp,
                               CacheIndex(cache.lengths - 1, jnp.ones((b,), jnp.int32)))
    return _Spec(cache._replace(mtp=mtp), x, h1[:, 0],
                 jnp.full((b, width), -1, jnp.int32).at[:, 0].set(x),
                 jnp.full((b, width), jnp.nan, jnp.float32).at[:, 0].set(token_logprob(logits_bv, x)),
                 jnp.ones((b,), jnp.int32), stop | (max_new <= 1), jnp.where(stop, _STOP, _MAX_NEW).astype(jnp.int32),
                 jnp.full((width, b), -1, jnp.int32), key, jnp.int32(0))


def _pick_steps(new: MambaCache, old: MambaCache, n_b, live_b) -> MambaCache:
    """Each live row's state after token n of the verify (step axis 1); finished rows keep their old state.

    Why the verify keeps the state after every token (extend's keep_steps) rather than committing by re-running
    the accepted prefix: the kept states are exact (the same one-step recurrence plain decoding runs, so greedy
    output and cache match it) and no second main forward is needed. The cost is K+1 conv/SSM states per Mamba
    layer held during a verify (a chunked SSD from the cache would give only the state after the last token).
    """
    rows = jnp.arange(n_b.shape[0])

    def one(a_steps, a_old):
        a = a_steps[rows, n_b]
        return jnp.where(live_b.reshape((-1,) + (1,) * (a.ndim - 1)), a, a_old)
    return jax.tree.map(one, new, old)


def _round(model, c: _Spec, stop_ids, max_new, sampling: Sampling, k: int) -> _Spec:
    cache, b = c.cache, c.x.shape[0]
    lengths, live = cache.lengths, ~c.done
    ones = jnp.ones((b,), jnp.int32)
    key, k_draft, k_acc, k_res = jax.random.split(c.key, 4)
    draft_keys = jax.random.split(k_draft, k)

    # 1. draft: step 1 is h1 (computed by the previous commit); steps 2..K write provisional MTP entries
    q1 = model.logits(c.h1)
    d1 = choose(q1, draft_keys[0], sampling)
    mtp_drafted = cache.mtp
    if k > 1:
        def step(carry, inp):
            h, d, mtp = carry
            off, kk = inp
            h, mtp = model.mtp_extend(h[:, None], d[:, None], mtp, CacheIndex(lengths + off, ones))
            ql = model.logits(h[:, 0])
            d = choose(ql, kk, sampling)
            return (h[:, 0], d, mtp), (d, ql)
        (_, _, mtp_drafted), (ds, qs) = jax.lax.scan(step, (c.h1, d1, cache.mtp),
                                                     (jnp.arange(k - 1, dtype=jnp.int32), draft_keys[1:]))
        drafts = jnp.concatenate([d1[:, None], ds.T], axis=1)  # [b, K]
        q_logits = jnp.concatenate([q1[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)  # [b, K, v]
    else:
        drafts, q_logits = d1[:, None], q1[:, None]

    # 2. verify [x, d_1..d_K] in one forward; Mamba layers keep the state after every token
    hidden, ver = model.extend(jnp.concatenate([c.x[:, None], drafts], axis=1),
                               DecodeCache(cache.layers, lengths, mtp_drafted), keep_steps=True)
    z = model.logits(hidden)  # [b, K+1, v]: position L+i predicts t_{L+i+1}
    v = z.shape[-1]
    p = probs(z.reshape(-1, v), sampling).reshape(b, k + 1, v)
    q = probs(q_logits.reshape(-1, v), sampling).reshape(b, k, v)

    # 3. accept the longest prefix passing u * q(d) < p(d), i.e. u < p(d)/q(d); then the residual / bonus token
    pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    ok = jax.random.uniform(k_acc, (b, k)) * qd < pd
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [b] accepted drafts, 0..K
    rows = jnp.arange(b)
    p_n = p[rows, n]
    q_n = jnp.where((n < k)[:, None], q[rows, jnp.minimum(n, k - 1)], 0.0)
    resid = jnp.maximum(p_n - q_n, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_n)  # mass 0 only from rounding: p == q
    y = jax.random.categorical(k_res, jnp.log(resid), axis=-1).astype(jnp.int32)
    idx = jnp.arange(k + 1)[None, :]
    new_tok = jnp.where(idx < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1), y[:, None])  # [b, K+1]

    # emit new_tok[0..n], cut at the first stop token and at max_new
    e = c.count
    fits = (idx <= n[:, None]) & (e[:, None] + idx < max_new)
    stop_here = _any_stop(new_tok, stop_ids) & fits
    has_stop = jnp.any(stop_here, axis=1)
    last = jnp.where(has_stop, jnp.argmax(stop_here, axis=1), jnp.minimum(n, max_new - 1 - e))
    cnt = jnp.where(live, last + 1, 0)
    width = c.tokens.shape[1]
    cols = jnp.where(idx < cnt[:, None], e[:, None] + idx, width)  # out of range: dropped
    lp = token_logprob(z.reshape(-1, v), new_tok.reshape(-1)).reshape(b, k + 1)
    tokens = c.tokens.at[rows[:, None], cols].set(new_tok, mode="drop")
    logprobs = c.logprobs.at[rows[:, None], cols].set(lp, mode="drop")
    count = e + cnt
    newly = live & (has_stop | (count >= max_new))
    reason = jnp.where(live & has_stop, _STOP, c.reason)

    # 4. commit: main length, per-row Mamba step state; MTP entries L..L+n rewritten (Mamba layers of the MTP
    # block, if any, restart from their pre-draft state) and the next round's h1 at index n
    adv = jnp.where(live, n + 1, 0)
    layers = tuple(_pick_steps(new, old, n, live) if isinstance(new, MambaCache) else new
                   for new, old in zip(ver.layers, cache.layers))
    mtp_base = tuple(old if isinstance(old, MambaCache) else new for new, old in zip(mtp_drafted, cache.mtp))
    h1_all, mtp = model.mtp_extend(hidden, new_tok, mtp_base, CacheIndex(lengths, adv))
    h1 = jnp.where(live[:, None], h1_all[rows, n], c.h1)
    accepted = c.accepted.at[c.round].set(jnp.where(live, n, -1), mode="drop")
    return _Spec(DecodeCache(layers, lengths + adv, mtp), jnp.where(live, y, c.x), h1, tokens, logprobs, count,
                 c.done | newly, reason, accepted, key, c.round + 1)


@functools.partial(jax.jit, static_argnums=(0, 7, 8), donate_argnums=(2,))
def _rounds(graphdef, state, c: _Spec, until, max_rounds, stop_ids, max_new, sampling: Sampling, k: int) -> _Spec:
    """Rounds while some live row has fewer than `until` tokens (and fewer than `max_rounds` rounds ran)."""
    model = merge(graphdef, state)

    def cond(c):
        return (c.round < max_rounds) & jnp.any(~c.done & (c.count < until))

    return jax.lax.while_loop(cond, lambda c: _round(model, c, stop_ids, max_new, sampling, k), c)


def start(model, logits_bv, hidden_bd, cache: DecodeCache, *, max_new_tokens: int, sampling: Sampling, seed: int = 0,
          stop_tokens=()) -> _Spec:
    """The round loop's state after prefill_mtp: x chosen and emitted, h1 computed (exposed for tests)."""
    graphdef, state = split_model(model)
    width = buffer_width(max_new_tokens)
    return _start(graphdef, state, cache, logits_bv, hidden_bd, jax.random.key(seed),
                  jnp.asarray(np.asarray(stop_tokens, np.int32).reshape(-1)), sampling, width,
                  jnp.int32(max_new_tokens))


def run_rounds(model, c: _Spec, *, max_new_tokens: int, sampling: Sampling, draft_len: int, stop_tokens=(),
               until: int | None = None, max_rounds: int | None = None) -> _Spec:
    """Run rounds (jitted, state donated) until every live row has `until` tokens or `max_rounds` rounds ran."""
    graphdef, state = split_model(model)
    big = np.iinfo(np.int32).max
    return _rounds(graphdef, state, c, jnp.int32(max_new_tokens if until is None else until),
                   jnp.int32(big if max_rounds is None else max_rounds),
                   jnp.asarray(np.asarray(stop_tokens, np.int32).reshape(-1)), jnp.int32(max_new_tokens), sampling,
                   draft_len)


def decode_mtp(model, logits_bv, hidden_bd, cache: DecodeCache, *, max_new_tokens: int, sampling: Sampling,
               seed: int = 0, stop_tokens=(), draft_len: int = 3, decode_chunk: int = 64,
               on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> SpeculativeResult:
    """Speculative decoding from `prefill_mtp`'s output. Streaming: on_tokens(tokens [b, n], live [b, n]) gets
    the columns every row has settled (rows move at different speeds), after every `decode_chunk` tokens."""
    graphdef, state = split_model(model)
    if not isinstance(draft_len, int) or isinstance(draft_len, bool) or draft_len < 1:
        raise ValueError(f"draft_len must be an int >= 1; got {draft_len!r}")
    if cache.mtp is None:
        raise ValueError("decode_mtp needs a cache with an MTP part: use prefill_mtp")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    stops = np.asarray(stop_tokens, np.int32).reshape(-1)
    t0 = time.perf_counter()
    c = start((graphdef, state), logits_bv, hidden_bd, cache, max_new_tokens=max_new_tokens, sampling=sampling,
              seed=seed, stop_tokens=stops)
    streamed = 0
    while True:
        c = run_rounds((graphdef, state), c, max_new_tokens=max_new_tokens, sampling=sampling, draft_len=draft_len,
                       stop_tokens=stops, until=min(streamed + decode_chunk, max_new_tokens))
        count, done = np.asarray(c.count), np.asarray(c.done)
        settled = int(np.min(np.where(done, max_new_tokens, count)))
        if on_tokens is not None and settled > streamed:
            toks = np.asarray(c.tokens[:, streamed:settled])
            on_tokens(toks, toks >= 0)
        streamed = settled
        if done.all():
            break
    decode_s = time.perf_counter() - t0
    tokens, lps, reasons = np.asarray(c.tokens), np.asarray(c.logprobs), np.asarray(c.reason)
    accepted = np.asarray(c.accepted)[: int(c.round)]
    live = accepted >= 0
    # tokens a verify produced (accepted drafts + 1), before any cut at a stop token or max_new; None: no verify ran
    acceptance = float((accepted[live] + 1).sum() / live.sum()) if live.any() else None
    out_tokens, out_lps = [], []
    for i in range(tokens.shape[0]):
        n = int(count[i])
        out_tokens.append(tokens[i, :n].tolist())
        out_lps.append(lps[i, :n])
    return SpeculativeResult(out_tokens, out_lps, [STOP_REASONS[r] for r in reasons], decode_s=decode_s,
                             acceptance_length=acceptance, accepted=accepted, draft_len=draft_len)
