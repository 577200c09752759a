"""Multi-token prediction (spec section 3): one shared-weight block applied at every depth.

u = eh_proj([enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])  (embedding first), then the blocks of
mtp_hybrid_override_pattern ('*E' for Nemotron 3), then final_layernorm -> h^k; logits_k = lm_head(h^k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.blocks import Block
from nemotron_jax.layers.common import Linear, Site, dtype_of
from nemotron_jax.layers.norms import RMSNorm


class MTPBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, quant_key=None):
        d, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.enorm = RMSNorm(d, eps=eps)
        self.hnorm = RMSNorm(d, eps=eps)
        site = Site(cfg, None, "mtp", quant_key)  # layer_idx None: the MTP block, for the precision policy
        self.eh_proj = Linear(2 * d, d, axes=("mtp_concat", "embed"), rngs=rngs, std=cfg.initializer_range,
                              dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                              **site.linear("mtp", "eh_proj"))
        # layer_idx continues after the main stack: the MoE layers' bias updates are keyed by it
        n = cfg.num_hidden_layers
        self.layers = nnx.List([Block(cfg, ch, rngs=rngs, layer_idx=n + i, site=site.child(f"layers.{i}"))
                                for i, ch in enumerate(cfg.mtp_hybrid_override_pattern)])
        self.final_layernorm = RMSNorm(d, eps=eps)
        # layer_idx of this block's MoE layers, in call order (their aux dicts come back in this order)
        self.moe_layer_indices = tuple(blk.mixer.layer_idx for blk in self.layers if blk.kind == "moe")

    def init_cache(self, batch: int, max_len: int) -> tuple:
        return tuple(blk.init_cache(batch, max_len) for blk in self.layers)

    def __call__(self, h_prev_btd: jax.Array, emb_next_btd: jax.Array, *, segment_ids: jax.Array | None = None,
                 cache: tuple | None = None, index=None) -> tuple[jax.Array, list, tuple | None]:
        """(h^k, aux dicts of its MoE layers, new cache when `cache` is given: one entry per layer)."""
        u = self.eh_proj(jnp.concatenate([self.enorm(emb_next_btd), self.hnorm(h_prev_btd)], axis=-1))
        auxes, new_cache = [], []
        for i, blk in enumerate(self.layers):
            u, c, aux = blk(u, segment_ids=segment_ids, cache=None if cache is None else cache[i], index=index)
            new_cache.append(c)
            if aux is not None:
                auxes.append(aux)
        return self.final_layernorm(u), auxes, (tuple(new_cache) if cache is not None else None)
