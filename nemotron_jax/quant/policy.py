"""Precision policy: which format each linear runs in (spec section 4, "What stays in high precision").

Under ``precision="bf16"`` every linear is bf16. Under ``"nvfp4"``:
  * bf16: the last ceil(nvfp4_bf16_last_fraction * num_layers) layers (Super: ceil(0.15 * 88) = 14), attention
    qkv and o, the LatentMoE latent projections, everything in the MTP block, the embedding, the LM head and
    the router;
  * mxfp8: Mamba out_proj (when mamba_out_proj_mxfp8; else nvfp4);
  * nvfp4: every other linear (Mamba in_proj, MoE experts and shared expert, dense MLP up/down).
Layers are 0-based indices into hybrid_override_pattern; ``layer_idx=None`` (or role "mtp") is the MTP block.
"""

from __future__ import annotations

import math
from collections import Counter

FORMATS = ("bf16", "nvfp4", "mxfp8")
ROLES_BY_TYPE = {
    "mamba": ("mamba.in_proj", "mamba.out_proj"),
    "attention": ("attn.qkv", "attn.o"),
    "moe": ("moe.router", "moe.experts", "moe.shared", "moe.latent"),
    "mlp": ("mlp.up", "mlp.down"),
}
GLOBAL_ROLES = ("embed", "lm_head")
ROLES = tuple(r for rs in ROLES_BY_TYPE.values() for r in rs) + GLOBAL_ROLES + ("mtp",)
_ALWAYS_BF16 = {"embed", "lm_head", "moe.router", "attn.qkv", "attn.o", "moe.latent", "mtp"}


def num_bf16_last_layers(cfg) -> int:
    n = cfg.num_hidden_layers
    if getattr(cfg, "nvfp4_bf16_last_layers", None) is not None:
        return cfg.nvfp4_bf16_last_layers
    # tiny epsilon: 0.15 * 20 is 3.0000000000000004 in binary and must not round up to 4
    return min(n, math.ceil(cfg.nvfp4_bf16_last_fraction * n - 1e-9))


def linear_format(cfg, layer_idx: int | None, role: str) -> str:
    """"bf16" | "nvfp4" | "mxfp8" for the linear ``role`` of block ``layer_idx`` (None: the MTP block)."""
    if role not in ROLES:
        raise ValueError(f"unknown linear role {role!r}; known roles: {ROLES}")
    if layer_idx is not None and not 0 <= layer_idx < cfg.num_hidden_layers:
        raise ValueError(f"layer_idx={layer_idx} outside 0..{cfg.num_hidden_layers - 1} (None means MTP)")
    if cfg.precision == "bf16":
        return "bf16"
    if role in _ALWAYS_BF16 or (layer_idx is None and role not in GLOBAL_ROLES):
        return "bf16"
    if layer_idx is not None and layer_idx >= cfg.num_hidden_layers - num_bf16_last_layers(cfg):
        return "bf16"
    if role == "mamba.out_proj" and cfg.mamba_out_proj_mxfp8:
        return "mxfp8"
    return "nvfp4"


def _roles(cfg, layer_type: str) -> tuple[str, ...]:
    roles = ROLES_BY_TYPE[layer_type]
    if layer_type == "moe":
        roles = tuple(r for r in roles
                      if not (r == "moe.latent" and not cfg.moe_latent_size)
                      and not (r == "moe.shared" and not (cfg.n_shared_experts and
                                                          cfg.moe_shared_expert_intermediate_size)))
    return roles


def precision_table(cfg) -> list[dict]:
    """One row per block: {"layer": idx | "mtp" | "embed" | "lm_head", "type", "formats": {role: fmt}}."""
    rows = [{"layer": "embed", "type": "embedding", "formats": {"embed": linear_format(cfg, None, "embed")}}]
    for i, t in enumerate(cfg.layer_types):
        rows.append({"layer": i, "type": t, "formats": {r: linear_format(cfg, i, r) for r in _roles(cfg, t)}})
    if cfg.mtp_enabled:
        from nemotron_jax.config import LAYER_TYPES
        for c in cfg.mtp_hybrid_override_pattern:
            t = LAYER_TYPES[c]
            rows.append({"layer": "mtp", "type": t, "formats": {r: linear_format(cfg, None, r) for r in _roles(cfg, t)}})
    rows.append({"layer": "lm_head", "type": "head", "formats": {"lm_head": linear_format(cfg, None, "lm_head")}})
    return rows


def layer_summary(row: dict) -> str:
    """A block's format: the single format of all its linears, or "mixed"."""
    fmts = set(row["formats"].values())
    return fmts.pop() if len(fmts) == 1 else "mixed"


def format_precision_table(cfg) -> str:
    rows = precision_table(cfg)
    lines = [f"precision policy: {cfg.precision}  (last {num_bf16_last_layers(cfg)} of {cfg.num_hidden_layers} "
             f"layers bf16 under nvfp4)" if cfg.precision == "nvfp4" else f"precision policy: {cfg.precision}",
             f"{'layer':>7}  {'type':<10} linears"]
    for r in rows:
        lines.append(f"{str(r['layer']):>7}  {r['type']:<10} " + "  ".join(f"{k}={v}" for k, v in r["formats"].items()))
    counts = Counter(v for r in rows for v in r["formats"].values())
    lines.append("linears per format: " + ", ".join(f"{f}={counts.get(f, 0)}" for f in FORMATS))
    return "\n".join(lines)


def gemm_for(cfg, layer_idx: int | None, role: str, name: str):
    """The GEMM a linear of `role` in block `layer_idx` is built with: None (plain x @ W in the compute dtype) or
    a QuantMatmul. `name` (the linear's path, e.g. "layers.0.mixer.in_proj") keys its stochastic rounding."""
    fmt = linear_format(cfg, layer_idx, role)
    if fmt == "bf16":
        return None
    from nemotron_jax.quant.gemm import QuantMatmul  # noqa: PLC0415
    from nemotron_jax.quant.recipe import NVFP4Recipe  # noqa: PLC0415
    return QuantMatmul(fmt, name, NVFP4Recipe.from_config(cfg))


def ragged_dot_for(cfg, layer_idx: int | None, name: str):
    """The routed experts' grouped GEMM: None (the default ragged dot) or an NVFP4 QuantRaggedDot."""
    if linear_format(cfg, layer_idx, "moe.experts") != "nvfp4":
        return None
    from nemotron_jax.quant.gemm import QuantRaggedDot  # noqa: PLC0415
    from nemotron_jax.quant.recipe import NVFP4Recipe  # noqa: PLC0415
    return QuantRaggedDot(name, NVFP4Recipe.from_config(cfg))
