"""Applying the precision policy to a built model: each linear gets the GEMM its format calls for.

The policy (nemotron_jax.quant.policy) says which format every linear runs in; this module walks the model,
names each linear by its path, and sets `Linear.matmul` / `RoutedExperts.ragged_dot` to a quantized GEMM.
Stochastic rounding needs a key per step: `NemotronModel.forward(..., quant_key=key)` opens a scope in which
each quantized GEMM folds that key with a hash of its own path (so every linear draws different bits).

Shapes that are not multiples of the block (16 for NVFP4, 32 for MXFP8) are zero-padded: zeros change neither
a block's amax nor a dot product, so padding gives the values an unpadded quantizer would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.quant.key_scope import current_quant_key, quant_key_scope
from nemotron_jax.quant.policy import linear_format
from nemotron_jax.quant.recipe import NVFP4Recipe, mxfp8_matmul, nvfp4_matmul, nvfp4_ragged_dot, quantizer_key

__all__ = ["QuantMatmul", "QuantRaggedDot", "apply_precision_policy", "quant_key_scope"]


def _pad_to(a: jax.Array, axis: int, mult: int) -> jax.Array:
    r = (-a.shape[axis]) % mult
    if r == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, r)
    return jnp.pad(a, widths)


@dataclasses.dataclass(frozen=True)
class QuantMatmul:
    """matmul(x [..., K], w [K, N]) in `fmt`; hashable and static so it can live in an nnx graphdef."""

    fmt: str
    name: str
    recipe: NVFP4Recipe = NVFP4Recipe()

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        k, n = w.shape
        # NVFP4 blocks are 16 wide; MXFP8 blocks 32 along K (fprop) and along N (dgrad).
        mult = 16 if self.fmt == "nvfp4" else 32
        xp, wp = _pad_to(x, -1, mult), _pad_to(_pad_to(w, 0, mult), 1, mult)
        if self.fmt == "nvfp4":
            key = current_quant_key()
            y = nvfp4_matmul(xp, wp, None if key is None else quantizer_key(key, self.name), self.recipe)
        elif self.fmt == "mxfp8":
            y = mxfp8_matmul(xp, wp)
        else:
            raise ValueError(f"QuantMatmul: unknown format {self.fmt!r}")
        return y[..., :n]


@dataclasses.dataclass(frozen=True)
class QuantRaggedDot:
    """ragged_dot(x [M, K], w [G, K, N], group_sizes [G]) with the NVFP4 recipe (16x16 expert tiles)."""

    name: str
    recipe: NVFP4Recipe = NVFP4Recipe()

    def __call__(self, x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
        n = w.shape[-1]
        xp, wp = _pad_to(x, -1, 16), _pad_to(_pad_to(w, 1, 16), 2, 16)
        key = current_quant_key()
        y = nvfp4_ragged_dot(xp, wp, group_sizes, None if key is None else quantizer_key(key, self.name),
                             self.recipe)
        return y[..., :n]


def _role(names: list[str], mixer_type: str | None) -> str | None:
    leaf = names[-1]
    if names[0] == "lm_head":
        return "lm_head"
    if mixer_type == "mamba":
        return {"in_proj": "mamba.in_proj", "out_proj": "mamba.out_proj"}.get(leaf)
    if mixer_type == "attention":
        return "attn.o" if leaf == "o_proj" else "attn.qkv" if leaf in ("q_proj", "k_proj", "v_proj") else None
    if mixer_type == "mlp":
        return {"up_proj": "mlp.up", "down_proj": "mlp.down"}.get(leaf)
    if mixer_type == "moe":
        if "shared_experts" in names:
            return "moe.shared"
        if leaf in ("fc1_latent_proj", "fc2_latent_proj"):
            return "moe.latent"
        if leaf == "experts":
            return "moe.experts"
    return None


def apply_precision_policy(model: nnx.Module) -> list[tuple[str, str]]:
    """Set the GEMM of every linear of `model` (a NemotronModel) from its config; returns (path, format) pairs."""
    from nemotron_jax.layers.common import Linear  # noqa: PLC0415
    from nemotron_jax.layers.moe import RoutedExperts  # noqa: PLC0415

    cfg = model.cfg
    recipe = NVFP4Recipe.from_config(cfg)
    applied = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (Linear, RoutedExperts)):
            continue
        names = [str(p) for p in path]
        name = ".".join(names)
        if names[0] == "mtp":
            fmt = linear_format(cfg, None, "mtp")
        elif names[0] == "lm_head":
            fmt = linear_format(cfg, None, "lm_head")
        elif names[0] == "layers":
            layer_idx = int(names[1])
            role = _role(names, model.layers[layer_idx].kind)
            if role is None:
                raise ValueError(f"precision policy: no role for linear {name}")
            fmt = linear_format(cfg, layer_idx, role)
        else:
            raise ValueError(f"precision policy: linear {name} is outside the known layout")
        if isinstance(node, RoutedExperts):
            node.ragged_dot = QuantRaggedDot(name, recipe) if fmt == "nvfp4" else None
        else:
            node.matmul = QuantMatmul(fmt, name, recipe) if fmt in ("nvfp4", "mxfp8") else None
        applied.append((name, fmt))
    return applied
