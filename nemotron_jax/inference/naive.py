"""The old sampler, kept as an oracle and a benchmark baseline: no cache, the whole causal model re-run over a
fixed-size buffer for every new token (O(T) forwards of length T). Use `nemotron_jax.generate` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax import model as M


def sample(graphdef: nnx.GraphDef, state, prompt_ids: np.ndarray, *, max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0) -> np.ndarray:
    """Continue `prompt_ids` (1-D ints) by `max_new_tokens`; temperature 0 is greedy. Returns only the new ids."""
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("sample: the prompt must hold at least one token")
    total = prompt.size + max_new_tokens
    buf = jnp.zeros((1, total), jnp.int32).at[0, : prompt.size].set(prompt)

    @jax.jit
    def next_token(st, buf, pos, key):
        logits = M.apply(graphdef, st, buf, mtp=False).logits[0, pos - 1]
        if temperature <= 0:
            return jnp.argmax(logits).astype(jnp.int32)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    key = jax.random.PRNGKey(seed)
    for pos in range(prompt.size, total):
        key, sub = jax.random.split(key)
        tok = next_token(state, buf, jnp.int32(pos), sub)
        buf = buf.at[0, pos].set(tok)
    return np.asarray(buf[0, prompt.size:])
