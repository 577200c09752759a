"""Causal GQA self-attention with no positional encoding (Nemotron 3 '*' layers).

The attention core goes through `tokamax.dot_product_attention`: its Mosaic kernels serve Hopper and TPUs. On the
CPU, sequences longer than one query block take `ops.blocked_attention` instead, which skips the masked future
keys that tokamax's XLA implementation computes and throws away (1.1-1.7x faster forward + backward at T 512-4k,
docs/benchmarks.md). Packed documents are kept apart with a segment mask. With a decode cache the new
K/V are written into it and the queries attend over it (`ops.cached_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import tokamax
from flax import nnx

from nemotron_jax import platform
from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.cache import AttnCache, CacheIndex
from nemotron_jax.layers.common import Linear, Site, dtype_of
from nemotron_jax.layers.mlp import out_proj_std
from nemotron_jax.ops import blocked_attention
from nemotron_jax.ops.cached_attention import cached_attention, write_kv


def segment_mask(segment_ids_bt: jax.Array | None) -> jax.Array | None:
    """[b, 1, t, t] boolean: query and key belong to the same packed document."""
    if segment_ids_bt is None:
        return None
    return segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]


def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segment_ids_bt: jax.Array | None = None, *, implementation=None) -> jax.Array:
    """Causal GQA attention of q [b, t, n, h] over k, v [b, t, kv, h], same segment id only. `implementation`:
    None picks (`ops.blocked_attention` on the CPU where it saves work, else tokamax's default), "blocked" is
    ours, anything else is passed to tokamax ("xla", "mosaic", ...)."""
    t = q_btnh.shape[1]
    if implementation == "blocked" or (implementation is None and platform.on_cpu()
                                       and blocked_attention.supports(t)):
        return blocked_attention.blocked_causal_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    scale = q_btnh.shape[-1] ** -0.5
    return tokamax.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=segment_mask(segment_ids_bt),
                                         is_causal=True, scale=scale, implementation=implementation)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, site: Site = Site()):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, qd, kvd = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        kw = dict(rngs=rngs, use_bias=cfg.attention_bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        std = cfg.initializer_range
        self.q_proj = Linear(d, qd, axes=("embed", "q_heads"), std=std, **kw, **site.linear("attn.qkv", "q_proj"))
        self.k_proj = Linear(d, kvd, axes=("embed", "kv_heads"), std=std, **kw, **site.linear("attn.qkv", "k_proj"))
        self.v_proj = Linear(d, kvd, axes=("embed", "kv_heads"), std=std, **kw, **site.linear("attn.qkv", "v_proj"))
        self.o_proj = Linear(qd, d, axes=("q_heads", "embed"), std=out_proj_std(cfg), **kw, **site.linear("attn.o", "o_proj"))
        self.dtype = dtype_of(cfg.dtype)

    def init_cache(self, batch: int, max_len: int) -> AttnCache:
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return AttnCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def __call__(self, x_btd: jax.Array, *, segment_ids: jax.Array | None = None, cache: AttnCache | None = None,
                 index: CacheIndex | None = None) -> tuple[jax.Array, AttnCache | None, None]:
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if cache is None:
            o = causal_attention(q, k, v, segment_ids)
        else:
            # entries past a row's valid tokens are written too; only queries at those (ignored) positions see
            # them, and the row's next call overwrites them
            cache = AttnCache(write_kv(cache.k, k, index.start), write_kv(cache.v, v, index.start))
            o = cached_attention(q, cache.k, cache.v, index.start[:, None] + jnp.arange(t)[None, :])
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), cache, None
