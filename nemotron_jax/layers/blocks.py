"""Pre-norm residual block: x <- x + Mixer(RMSNorm(x)), the mixer chosen by the layer-pattern character."""

from __future__ import annotations

import jax
from flax import nnx

from nemotron_jax.config import LAYER_TYPES, ModelConfig
from nemotron_jax.layers.attention import Attention
from nemotron_jax.layers.cache import CacheIndex
from nemotron_jax.layers.common import Site
from nemotron_jax.layers.mamba2 import Mamba2Mixer
from nemotron_jax.layers.mlp import MLP
from nemotron_jax.layers.norms import RMSNorm


def make_mixer(cfg: ModelConfig, char: str, *, rngs: nnx.Rngs, layer_idx: int, site: Site = Site()):
    kind = LAYER_TYPES[char]
    if kind == "mamba":
        return Mamba2Mixer(cfg, rngs=rngs, site=site)
    if kind == "attention":
        return Attention(cfg, rngs=rngs, site=site)
    if kind == "mlp":
        return MLP(cfg, rngs=rngs, site=site)
    from nemotron_jax.layers.moe import MoE  # noqa: PLC0415  (MoE pulls in the dispatch ops)
    return MoE(cfg, rngs=rngs, layer_idx=layer_idx, site=site)


class Block(nnx.Module):
    """`layer_idx` numbers the block (MTP blocks continue after the main stack; MoE bias updates are keyed by
    it); `site` says where it sits for the precision policy (its layer_idx is None inside the MTP block)."""

    def __init__(self, cfg: ModelConfig, char: str, *, rngs: nnx.Rngs, layer_idx: int, site: Site = Site()):
        self.kind = LAYER_TYPES[char]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mixer = make_mixer(cfg, char, rngs=rngs, layer_idx=layer_idx, site=site.child("mixer"))

    def init_cache(self, batch: int, max_len: int):
        """This block's decode cache (None for token-wise mixers)."""
        if self.kind == "attention":
            return self.mixer.init_cache(batch, max_len)
        if self.kind == "mamba":
            return self.mixer.init_cache(batch)
        return None

    def __call__(self, x_btd: jax.Array, *, segment_ids: jax.Array | None = None, cache=None,
                 index: CacheIndex | None = None) -> tuple[jax.Array, object, dict | None]:
        """(x + mixer(norm(x)), the mixer's new cache, its aux dict or None)."""
        y, cache, aux = self.mixer(self.norm(x_btd), segment_ids=segment_ids, cache=cache, index=index)
        return x_btd + y.astype(x_btd.dtype), cache, aux
