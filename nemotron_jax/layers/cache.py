"""Decode caches of the mixers, and where a cached call writes (spec section 2, "Decode caches").

Every mixer is called as `mixer(h_btd, *, segment_ids=None, cache=None, index=None) -> (y_btd, cache, aux)`.
Without a cache it is the full-sequence (training) forward. With one, the call continues each row from the
cache: its T tokens sit at positions `index.start[b] + 0..T-1`, of which the first `index.valid[b]` are real
(right padding past them leaves the cache as if it were absent). Attention layers hold K/V, Mamba layers the
conv tail and the SSM state; MoE and MLP layers hold nothing (None).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax


class AttnCache(NamedTuple):
    k: jax.Array  # [b, max_len, kv_heads, head_dim] compute dtype
    v: jax.Array  # [b, max_len, kv_heads, head_dim]


class MambaCache(NamedTuple):
    """With `index.keep_steps`, both fields gain a step axis after the batch: the state after each token."""

    conv: jax.Array  # [b, conv_dim, conv_kernel - 1]: the last conv inputs (pre-activation xBC), oldest first
    ssm: jax.Array  # [b, h, p, n] in mamba_ssm_cache_dtype


@dataclasses.dataclass(frozen=True)
class CacheIndex:
    """Where a cached call's tokens go (built inside the traced function; not a pytree).

    keep_steps: Mamba layers return their state after every token of the call (speculative verification
    picks the state at the last accepted token; the call then runs the exact recurrence token by token).
    """

    start: jax.Array  # [b] int32: tokens already in the cache for each row
    valid: jax.Array  # [b] int32: real tokens of this call (<= T)
    keep_steps: bool = False
