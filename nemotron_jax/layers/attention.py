"""Causal GQA self-attention with no positional encoding (Nemotron 3 '*' layers).

The attention core goes through `tokamax.dot_product_attention`: its Mosaic kernels serve Hopper and its XLA
implementation serves the CPU. Packed documents are kept apart with a segment mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import tokamax
from flax import nnx

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.common import Linear, dtype_of
from nemotron_jax.layers.mlp import out_proj_std


def segment_mask(segment_ids_bt: jax.Array | None) -> jax.Array | None:
    """[b, 1, t, t] boolean: query and key belong to the same packed document."""
    if segment_ids_bt is None:
        return None
    return segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]


def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segment_ids_bt: jax.Array | None = None, *, implementation=None) -> jax.Array:
    scale = q_btnh.shape[-1] ** -0.5
    return tokamax.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=segment_mask(segment_ids_bt),
                                         is_causal=True, scale=scale, implementation=implementation)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, qd, kvd = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        kw = dict(rngs=rngs, use_bias=cfg.attention_bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        std = cfg.initializer_range
        self.q_proj = Linear(d, qd, axes=("embed", "q_heads"), std=std, **kw)
        self.k_proj = Linear(d, kvd, axes=("embed", "kv_heads"), std=std, **kw)
        self.v_proj = Linear(d, kvd, axes=("embed", "kv_heads"), std=std, **kw)
        self.o_proj = Linear(qd, d, axes=("q_heads", "embed"), std=out_proj_std(cfg), **kw)

    def __call__(self, x_btd: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        o = causal_attention(q, k, v, segment_ids)
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))
