"""Cached batched generation: sliced prefill into a decode cache, then a jitted decode loop over it.

    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0,
                   stop_tokens=[2, 11])
    out.tokens[i], out.logprobs[i], out.stop_reasons[i]

Prompts of different lengths share one batch (right-padded; padding leaves no trace in the cache). Long
prompts are prefilled in slices of `prefill_chunk` tokens carrying the cache, so activations never scale with
the prompt. The decode loop runs inside jit (`lax.while_loop`, cache donated) in chunks of `decode_chunk`
steps, between which new tokens are handed to `on_tokens` (streaming). Each jitted function compiles once per
(batch, max_len bucket, sampling settings).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.inference.sampling import Sampling, choose, token_logprob
from nemotron_jax.model import DecodeCache, merge
from nemotron_jax.validate import InputError, check_tokens

KEY_BLOCK = 256  # cache lengths are multiples of the cached-attention key block
STOP_REASONS = ("max_new_tokens", "stop_token")


def split_model(model) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) from a NemotronModel, or the pair itself."""
    if isinstance(model, tuple) and len(model) == 2:
        return model
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    raise TypeError(f"model must be a NemotronModel or (graphdef, state) from nnx.split; got {type(model).__name__}")


def config_of(graphdef, state):
    return merge(graphdef, state).cfg


def bucket(n: int) -> int:
    """The cache length for n tokens: a multiple of KEY_BLOCK (so nearby sizes share a compile)."""
    return max(KEY_BLOCK, -(-n // KEY_BLOCK) * KEY_BLOCK)


def check_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts (a list of int sequences, or a 2-D int array) -> right-padded [b, P] int32 and lengths [b].

    Refuses with an InputError (a ValueError), before anything compiles, what would silently give garbage: an
    empty batch or prompt, non-integer ids (floats, bools, strings), ids outside [0, vocab_size), anything that
    is not a sequence of sequences.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            raise InputError("prompts: got a 1-D array; pass a batch, e.g. [ids] or ids[None, :]")
        if arr.ndim != 2:
            raise InputError(f"prompts must be a batch of token-id sequences; got an array of shape {arr.shape}")
        rows = list(arr)
    elif isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise InputError(f"prompts must be a batch of token-id sequences (e.g. [[1, 2, 3]]); got "
                         f"{type(prompts).__name__}")
    else:
        rows = list(prompts)
    if not rows:
        raise InputError("prompts: the batch is empty; pass at least one prompt")
    lengths = []
    for i, r in enumerate(rows):
        if isinstance(r, (str, bytes)):
            raise InputError(f"prompt {i}: expected a sequence of token ids, got {type(r).__name__}; encode text "
                             f"with the tokenizer first")
        try:
            r = np.asarray(r)
        except ValueError as e:
            raise InputError(f"prompt {i}: expected a flat sequence of token ids ({e})") from None
        if r.ndim != 1:
            raise InputError(f"prompt {i}: expected a sequence of token ids, got shape {r.shape}")
        if r.size == 0:
            raise InputError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS id)")
        if not np.issubdtype(r.dtype, np.integer):  # bool is not np.integer
            raise InputError(f"prompt {i}: token ids must be integers, got dtype {r.dtype}")
        bad = (r < 0) | (r >= vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise InputError(f"prompt {i}: token id {int(r[j])} at position {j} is outside the vocabulary "
                             f"[0, {vocab_size}) (vocab_size={vocab_size})")
        lengths.append(r.size)
    out = np.zeros((len(rows), max(lengths)), np.int32)
    for i, r in enumerate(rows):
        out[i, : lengths[i]] = np.asarray(r)
    return out, np.asarray(lengths, np.int32)


def check_lengths(lengths_b, tokens_shape: tuple[int, int], *, name: str = "lengths_b") -> np.ndarray:
    """Prompt lengths [b] as int32, each in [1, P] for right-padded tokens [b, P]; InputError otherwise."""
    b, p = tokens_shape
    arr = np.asarray(lengths_b)
    if arr.shape != (b,):
        raise InputError(f"{name} must be [batch] = ({b},), one length per row of the tokens; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    bad = (arr < 1) | (arr > p)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{name}[{i}]={int(arr[i])} is outside [1, {p}] (every prompt needs at least one token and "
                         f"fits the {p} token columns)")
    return arr.astype(np.int32)


# ----------------------------------------------------------------------------- prefill and one decode step
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def _prefill_slice(graphdef, state, cache: DecodeCache, last_logits_bv, tokens_bt, start, valid_b):
    model = merge(graphdef, state)
    hidden, cache = model.extend(tokens_bt, cache, valid=valid_b, start=start)
    # the logits of each row's last real token, if it lies in this slice
    last = jnp.take_along_axis(hidden, jnp.maximum(valid_b - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)
    return jnp.where((valid_b > 0)[:, None], logits, last_logits_bv), cache


def buffer_width(max_new_tokens: int) -> int:
    """Columns of the output buffers: a power of two (>= 16), so nearby max_new_tokens share a compile."""
    return max(16, 1 << (max_new_tokens - 1).bit_length())


def prefill_slices(tokens_bt: np.ndarray, lengths_b: np.ndarray, *, max_len: int, chunk: int, extra: int = 0):
    """How a prompt batch is prefilled: (slice width, prompts right-padded to whole slices plus `extra` zero
    columns, [(slice start, valid tokens per row [b])]). Short prompts take one small slice; every slice of one
    batch has the same width, so one compile serves them all."""
    b, p = tokens_bt.shape
    if int(lengths_b.max()) > max_len:
        raise ValueError(f"a prompt of {int(lengths_b.max())} tokens does not fit max_len={max_len}")
    width = min(chunk, bucket(p) if p > 64 else 64)
    n_cols = -(-p // width) * width
    if n_cols > max_len:  # the slice writes must stay inside the cache
        raise ValueError(f"max_len={max_len} is shorter than the padded prompt ({n_cols} tokens); "
                         f"use a larger max_len or a prefill chunk that divides it")
    padded = np.zeros((b, n_cols + extra), np.int32)
    padded[:, :p] = tokens_bt
    return width, padded, [(s, np.clip(lengths_b - s, 0, width).astype(np.int32)) for s in range(0, n_cols, width)]


def prefill(model, tokens_bt, lengths_b, *, max_len: int, chunk: int = 4096) -> tuple[jax.Array, DecodeCache]:
    """(logits [b, v] at each row's last prompt token, cache holding the prompts).

    tokens [b, P] right-padded, lengths [b]; slices of `chunk` tokens (one compile for all full slices).
    Bad tokens (not a non-empty [b, P] integer array, ids outside [0, vocab_size), padding included) or lengths
    (not [b] integers in [1, P]) raise InputError before anything compiles.
    """
    graphdef, state = split_model(model)
    net = merge(graphdef, state)
    tokens_bt = np.asarray(check_tokens(tokens_bt, net.cfg.vocab_size, name="tokens_bt"), np.int32)
    lengths_b = check_lengths(lengths_b, tokens_bt.shape)
    width, padded, slices = prefill_slices(tokens_bt, lengths_b, max_len=max_len, chunk=chunk)
    cache = net.init_cache(tokens_bt.shape[0], max_len)
    logits = jnp.zeros((tokens_bt.shape[0], net.cfg.vocab_size), jnp.float32)
    for s, valid in slices:
        logits, cache = _prefill_slice(graphdef, state, cache, logits, jnp.asarray(padded[:, s:s + width]),
                                       jnp.int32(s), jnp.asarray(valid))
    return logits, cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def decode_step(graphdef, state, token_b, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """One token per row -> (logits [b, v] for the next one, cache). The one-step recurrence in Mamba layers."""
    model = merge(graphdef, state)
    hidden, cache = model.extend(token_b[:, None], cache)
    return model.logits(hidden[:, 0]), cache


# ----------------------------------------------------------------------------- the decode loop
class Budget(NamedTuple):
    """Reasoning budget: after `tokens` generated tokens with the thinking span still open, emit `end_ids`."""

    tokens: int
    end_ids: tuple[int, ...]


class _Loop(NamedTuple):
    cache: DecodeCache
    logits: jax.Array  # [b, v] for the next token
    tokens: jax.Array  # [b, max_new] int32 (-1 past the end)
    logprobs: jax.Array  # [b, max_new] fp32
    done: jax.Array  # [b] bool
    reason: jax.Array  # [b] int32 index into STOP_REASONS
    recent: jax.Array  # [b, m] the last m emitted tokens (m = len of the end-of-thinking marker, or 1)
    closed: jax.Array  # [b] bool: the thinking span has been closed
    forced: jax.Array  # [b] bool: this row's span is being closed by the budget
    key: jax.Array
    step: jax.Array  # int32: tokens generated so far (the same for every row)


def _emit(c: _Loop, tok, stop_ids, budget: Budget | None):
    """Apply the reasoning budget to the chosen tokens; update stop flags and the marker window."""
    closed, forced = c.closed, c.forced
    if budget is not None:
        m = len(budget.end_ids)
        marker = jnp.asarray(budget.end_ids, jnp.int32)
        forced = jnp.where(c.step == budget.tokens, ~closed, forced)
        j = c.step - budget.tokens
        in_force = forced & (j >= 0) & (j < m)
        tok = jnp.where(in_force, marker[jnp.clip(j, 0, m - 1)], tok)
    recent = jnp.concatenate([c.recent[:, 1:], tok[:, None]], axis=1)
    if budget is not None:
        closed = closed | jnp.all(recent == jnp.asarray(budget.end_ids, jnp.int32)[None], axis=1)
    stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=1) if stop_ids.size else jnp.zeros_like(c.done)
    return tok, recent, closed, forced, stop


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(2,))
def _decode(graphdef, state, c: _Loop, until, stop_ids, sampling: Sampling, budget: Budget | None) -> _Loop:
    model = merge(graphdef, state)

    def cond(c):
        return (c.step < until) & ~jnp.all(c.done)

    def body(c):
        key, sub = jax.random.split(c.key)
        tok = choose(c.logits, sub, sampling)
        tok, recent, closed, forced, stop = _emit(c, tok, stop_ids, budget)
        live = ~c.done
        tokens = c.tokens.at[:, c.step].set(jnp.where(live, tok, -1))
        logprobs = c.logprobs.at[:, c.step].set(jnp.where(live, token_logprob(c.logits, tok), jnp.nan))
        newly = live & stop
        reason = jnp.where(newly, STOP_REASONS.index("stop_token"), c.reason)
        hidden, cache = model.extend(tok[:, None], c.cache)
        return _Loop(cache, model.logits(hidden[:, 0]), tokens, logprobs, c.done | newly, reason, recent, closed,
                     forced, key, c.step + 1)

    return jax.lax.while_loop(cond, body, c)


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: the generated ids (the stop token included, when one ended the row)
    logprobs: list[np.ndarray]  # per row: log p(token) under the model (unscaled logits), fp32
    stop_reasons: list[str]  # per row: "stop_token" or "max_new_tokens"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    acceptance_length: float | None = None  # speculative decoding: mean tokens emitted per main-model forward

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else float("nan")


def _sync(tree):
    jax.block_until_ready(tree)
    return tree


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (), max_len: int | None = None,
             prefill_chunk: int = 4096, decode_chunk: int = 64, reasoning_budget: int | None = None,
             think_end: Sequence[int] = (), speculative: str | None = None, draft_len: int = 3,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens; see the module docstring.

    model: a NemotronModel or (graphdef, state). prompts: int sequences (different lengths are fine).
    temperature 0 is greedy. stop_tokens: ids that end a row (the id is kept in its output). max_len: cache
    capacity (default: longest prompt + max_new_tokens, rounded up to a multiple of 256).
    reasoning_budget: after that many generated tokens with the thinking span open (generation starts inside
    it), `think_end` (the end-of-thinking marker's ids) is emitted and the model goes on to answer.
    speculative="mtp": MTP speculative decoding with `draft_len` drafted tokens per step (greedy output equals
    plain greedy output). on_tokens(tokens [b, n], live [b, n]) receives each chunk of new tokens.
    """
    graphdef, state = split_model(model)
    cfg = config_of(graphdef, state)
    tokens_np, lengths = check_prompts(prompts, cfg.vocab_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    sampling = Sampling(float(temperature), top_k, float(top_p))
    stops = np.asarray(list(stop_tokens), np.int32).reshape(-1)
    if stops.size and ((stops < 0) | (stops >= cfg.vocab_size)).any():
        raise ValueError(f"stop_tokens {stops.tolist()} must lie in [0, {cfg.vocab_size})")
    budget = None
    if reasoning_budget is not None:
        if not think_end:
            raise ValueError("reasoning_budget needs think_end: the token ids of the end-of-thinking marker")
        if reasoning_budget < 0:
            raise ValueError(f"reasoning_budget must be >= 0; got {reasoning_budget}")
        budget = Budget(int(reasoning_budget), tuple(int(t) for t in think_end))
    extra = 0
    if speculative is not None:
        if speculative != "mtp":
            raise ValueError(f"speculative must be None or 'mtp'; got {speculative!r}")
        if not cfg.mtp_enabled:
            raise ValueError("speculative='mtp' needs a model with an MTP block (num_nextn_predict_layers=1); "
                             "this one has none")
        if not isinstance(draft_len, int) or draft_len < 1:
            raise ValueError(f"draft_len must be an int >= 1; got {draft_len!r}")
        if budget is not None:
            raise ValueError("reasoning_budget is not supported with speculative decoding yet")
        extra = draft_len + 1
    need = int(lengths.max()) + max_new_tokens + extra
    if need > cfg.max_position_embeddings:
        raise ValueError(f"the longest prompt ({int(lengths.max())} tokens) plus max_new_tokens={max_new_tokens} "
                         f"exceeds the model's context, max_position_embeddings={cfg.max_position_embeddings}")
    if max_len is None:
        max_len = bucket(need)
    elif need > max_len:
        raise ValueError(f"max_len={max_len} is too short: the longest prompt ({int(lengths.max())} tokens) plus "
                         f"max_new_tokens={max_new_tokens}{f' plus draft_len+1={extra}' if extra else ''} "
                         f"needs {need}")
    elif max_len % KEY_BLOCK and max_len > KEY_BLOCK:
        raise ValueError(f"max_len must be a multiple of {KEY_BLOCK} above {KEY_BLOCK}; got {max_len}")

    t0 = time.perf_counter()
    if speculative is not None:
        # its own prefill: the same slices also fill the MTP cache from the prompt's main hidden states
        from nemotron_jax.inference.speculative import decode_mtp, prefill_mtp  # noqa: PLC0415
        logits, hidden, cache = _sync(prefill_mtp((graphdef, state), tokens_np, lengths, max_len=max_len,
                                                  chunk=prefill_chunk))
        prefill_s = time.perf_counter() - t0
        res = decode_mtp((graphdef, state), logits, hidden, cache, max_new_tokens=max_new_tokens, sampling=sampling,
                         seed=seed, stop_tokens=stops, draft_len=draft_len, decode_chunk=decode_chunk,
                         on_tokens=on_tokens)
        res.prefill_s, res.prompt_tokens = prefill_s, int(lengths.sum())
        return res
    logits, cache = _sync(prefill((graphdef, state), tokens_np, lengths, max_len=max_len, chunk=prefill_chunk))
    prefill_s = time.perf_counter() - t0

    b = tokens_np.shape[0]
    m = len(budget.end_ids) if budget is not None else 1
    width = buffer_width(max_new_tokens)
    c = _Loop(cache, logits, jnp.full((b, width), -1, jnp.int32),
              jnp.full((b, width), jnp.nan, jnp.float32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
              jnp.full((b, m), -1, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), bool),
              jax.random.key(seed), jnp.int32(0))
    t0 = time.perf_counter()
    done_steps = 0
    while done_steps < max_new_tokens:
        until = min(done_steps + decode_chunk, max_new_tokens)
        c = _sync(_decode(graphdef, state, c, jnp.int32(until), jnp.asarray(stops), sampling, budget))
        step = int(c.step)
        if on_tokens is not None and step > done_steps:
            toks = np.asarray(c.tokens[:, done_steps:step])
            on_tokens(toks, toks >= 0)
        if step == done_steps or bool(jnp.all(c.done)):
            break
        done_steps = step
    decode_s = time.perf_counter() - t0
    tokens, lps = np.asarray(c.tokens), np.asarray(c.logprobs)
    reasons = np.asarray(c.reason)
    out_tokens, out_lps = [], []
    for i in range(b):
        n = int((tokens[i] >= 0).sum())
        out_tokens.append(tokens[i, :n].tolist())
        out_lps.append(lps[i, :n])
    return GenerationResult(out_tokens, out_lps, [STOP_REASONS[r] for r in reasons], prefill_s=prefill_s,
                            decode_s=decode_s, prompt_tokens=int(lengths.sum()))
