"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), with a PRNG key.

`Sampling` is static data (it shapes the compiled decode loop); the key is traced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k None or 0 keeps every token; top_p 1.0 keeps every token."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy); got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int or None; got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_logits(logits_bv: jax.Array, s: Sampling) -> jax.Array:
    """Logits of the distribution `s` samples from (fp32; -inf outside top-k / top-p), before the draw."""
    x = logits_bv.astype(jnp.float32) / s.temperature
    v = x.shape[-1]
    if s.top_k and s.top_k < v:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = before < s.top_p  # the most likely token always stays
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, -jnp.inf)
    return x


def probs(logits_bv: jax.Array, s: Sampling) -> jax.Array:
    """The probabilities `choose` draws from: one-hot at the argmax when greedy."""
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_bv, axis=-1), logits_bv.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits_bv, s), axis=-1)


def choose(logits_bv: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One token per row [b] int32."""
    if s.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_bv, s), axis=-1).astype(jnp.int32)


def token_logprob(logits_bv: jax.Array, tokens_b: jax.Array) -> jax.Array:
    """log p(token) under the model's own distribution (unscaled logits, no filtering) [b] fp32."""
    lp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, tokens_b[:, None], axis=-1)[:, 0]
