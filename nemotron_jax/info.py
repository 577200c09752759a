"""Parameter counts of a preset, from abstract shapes only (jax.eval_shape: nothing is allocated).

    python -m nemotron_jax.info --preset nano_30b_a3b [--json] [--layers]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import jax
from flax import nnx

from nemotron_jax.config import LAYER_TYPES, PRESETS, ModelConfig
from nemotron_jax.model import abstract_model
from nemotron_jax.quant.policy import format_precision_table, precision_table


def _size(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _routed_expert_size(block_state) -> int:
    """Parameters of the routed experts inside one block's state (only `top-k / E` of them run per token)."""
    mixer = block_state.get("mixer") if hasattr(block_state, "get") else None
    if mixer is None or "experts" not in mixer:
        return 0
    return _size(mixer["experts"])


def count_params(cfg: ModelConfig) -> dict:
    model = abstract_model(cfg)
    params = nnx.state(model, nnx.Param)
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    layers = []
    for i, ch in enumerate(cfg.hybrid_override_pattern):
        st = params["layers"][i]
        total = _size(st)
        routed = _routed_expert_size(st)
        layers.append({"index": i, "char": ch, "type": LAYER_TYPES[ch], "params": total,
                       "active": total - routed + round(routed * frac)})
    embeddings = _size(params["embeddings"]) + _size(params["lm_head"])
    final_norm = _size(params["norm_f"])
    total = sum(r["params"] for r in layers) + embeddings + final_norm
    active_no_emb = sum(r["active"] for r in layers) + final_norm
    mtp_total = mtp_active = 0
    if cfg.mtp_enabled:
        mtp = params["mtp"]
        mtp_total = _size(mtp)
        routed = sum(_routed_expert_size(mtp["layers"][j]) for j in range(len(cfg.mtp_hybrid_override_pattern)))
        mtp_active = mtp_total - routed + round(routed * frac)
    p = cfg.hybrid_override_pattern
    return {
        "pattern": p,
        "num_layers": len(p),
        "layer_counts": {LAYER_TYPES[c]: n for c, n in Counter(p).items()},
        "total_params": total,  # main model, excluding MTP
        "embedding_params": embeddings,
        "active_params": active_no_emb + embeddings,
        "active_params_no_embeddings": active_no_emb,
        "mtp_params": mtp_total,
        "mtp_active_params": mtp_active,
        "mtp": f"{cfg.mtp_hybrid_override_pattern} x {cfg.mtp_depths} depths" if cfg.mtp_enabled else None,
        "layers": layers,
    }


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_report(name: str, info: dict, show_layers: bool = True) -> str:
    lines = [f"preset {name}: {info['num_layers']} layers, pattern {info['pattern']}",
             "layer counts: " + ", ".join(f"{k} {v}" for k, v in sorted(info["layer_counts"].items()))]
    if show_layers:
        lines.append(f"{'idx':>4} {'chr':>3} {'type':<10} {'params':>12} {'active':>12}")
        for r in info["layers"]:
            lines.append(f"{r['index']:>4} {r['char']:>3} {r['type']:<10} {_fmt(r['params']):>12} {_fmt(r['active']):>12}")
    lines += [
        f"total parameters (excl. MTP): {info['total_params']:,} ({_fmt(info['total_params'])})",
        f"embeddings + LM head:         {info['embedding_params']:,} ({_fmt(info['embedding_params'])})",
        f"active per token (with emb):  {info['active_params']:,} ({_fmt(info['active_params'])})",
        f"active per token (no emb):    {info['active_params_no_embeddings']:,} "
        f"({_fmt(info['active_params_no_embeddings'])})",
        f"MTP block:                    {info['mtp_params']:,} ({_fmt(info['mtp_params'])})"
        + (f", {info['mtp']}, active {_fmt(info['mtp_active_params'])}" if info["mtp"] else " (none)"),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=PRESETS)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    args = ap.parse_args(argv)
    cfg = ModelConfig.preset(args.preset)
    info = count_params(cfg)
    if args.json:
        info["precision_nvfp4"] = precision_table(cfg.replace(precision="nvfp4"))
        print(json.dumps(info, indent=1, default=str))
    else:
        print(format_report(args.preset, info, show_layers=not args.no_layers))
        print("\nprecision under precision='nvfp4':")
        print(format_precision_table(cfg.replace(precision="nvfp4")))


if __name__ == "__main__":
    main()
