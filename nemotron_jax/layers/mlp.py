"""The dense squared-ReLU MLP ('-' layers; also the shape of every expert): down(relu(up(x))^2), no gate."""

from __future__ import annotations

import math

import jax
from flax import nnx

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.common import Linear, Site, dtype_of
from nemotron_jax.ops.activations import activation


def out_proj_std(cfg: ModelConfig) -> float:
    """Init std of a projection that writes into the residual stream (GPT-2 style 1/sqrt(2L) scaling)."""
    if cfg.rescale_prenorm_residual:
        return cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    return cfg.initializer_range


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, intermediate_size: int | None = None,
                 site: Site = Site(), roles: tuple[str, str] = ("mlp.up", "mlp.down")):
        """roles: the precision-policy roles of up and down (the shared expert is ("moe.shared",) * 2)."""
        m = intermediate_size or cfg.intermediate_size
        kw = dict(rngs=rngs, use_bias=cfg.mlp_bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        up, down = (site.linear(r, n) for r, n in zip(roles, ("up_proj", "down_proj")))
        self.up_proj = Linear(cfg.hidden_size, m, axes=("embed", "mlp"), std=cfg.initializer_range, **kw, **up)
        self.down_proj = Linear(m, cfg.hidden_size, axes=("mlp", "embed"), std=out_proj_std(cfg), **kw, **down)
        self.act = activation(cfg.mlp_hidden_act)

    def ffn(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.up_proj(x_btd)))

    def __call__(self, x_btd: jax.Array, *, segment_ids=None, cache=None, index=None) -> tuple[jax.Array, None, None]:
        """The mixer call shape (see layers/cache.py); token-wise, so it holds no cache."""
        return self.ffn(x_btd), None, None
