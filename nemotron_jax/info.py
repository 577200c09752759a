"""Parameter counts and weight bytes of a preset, from abstract shapes only (jax.eval_shape: nothing is allocated).

    python -m nemotron_jax.info --preset nano_30b_a3b [--json] [--layers]
    python -m nemotron_jax.info --weights nvfp4 [--preset NAME]   # weight bytes, packed NVFP4 vs BF16
"""

from __future__ import annotations

import argparse
import json
import math
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


def weight_bytes(cfg: ModelConfig, weights: str = "nvfp4", exclude: list[str] | None = None) -> dict:
    """Bytes of the checkpoint weights of cfg (main model + MTP), from abstract shapes only.

    weights="nvfp4": the ModelOpt unified layout (nemotron_jax.convert.modelopt): each quantized linear
    [N, K] is N*K/2 bytes of E2M1 codes + N*K/16 E4M3 block scales + a 4-byte fp32 weight_scale_2, i.e.
    4.5 bits per weight; the rest BF16 (router weight and bias fp32, as HF keeps them). "fp8": 1 byte per
    weight + a 4-byte scale. "bf16": 2 bytes everywhere. exclude: the modules kept BF16; default the released
    checkpoints' policy (convert.modelopt.released_exclude_modules).
    """
    import jax.numpy as jnp  # noqa: PLC0415

    from nemotron_jax.convert.hf import _quantized_names, expected_hf_shapes  # noqa: PLC0415
    from nemotron_jax.convert.hf_names import entries  # noqa: PLC0415
    from nemotron_jax.convert.modelopt import NVFP4_GROUP, QuantSpec, released_exclude_modules  # noqa: PLC0415

    if weights not in ("nvfp4", "fp8", "bf16"):
        raise ValueError(f"weights={weights!r}: use nvfp4, fp8 or bf16")
    flat = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg))))
    shapes = expected_hf_shapes(cfg, flat)
    table = entries(cfg)
    q: dict[str, str] = {}
    if weights != "bf16":
        spec = QuantSpec(algo=weights.upper(), group_size=NVFP4_GROUP,
                         exclude=released_exclude_modules(cfg) if exclude is None else exclude)
        q = {n: a for n, a in _quantized_names(table, shapes, spec).items()
             if a != "NVFP4" or shapes[n][1] % NVFP4_GROUP == 0}

    def packed(sds):  # the stored tensors of one quantized weight, as shapes (jax.eval_shape below)
        n, k = sds.shape
        if weights == "nvfp4":
            return (jnp.zeros((n, k // 2), jnp.uint8), jnp.zeros((n, k // NVFP4_GROUP), jnp.float8_e4m3fn),
                    jnp.zeros((), jnp.float32))
        return jnp.zeros((n, k), jnp.float8_e4m3fn), jnp.zeros((), jnp.float32)

    out = {"quantized_params": 0, "quantized_bytes": 0, "bf16_params": 0, "bf16_bytes": 0, "fp32_params": 0,
           "fp32_bytes": 0}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name in q:
            leaves = jax.eval_shape(packed, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
            out["quantized_params"] += n
            out["quantized_bytes"] += sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(leaves))
        elif ".gate." in name:  # router weight and correction bias stay fp32
            out["fp32_params"] += n
            out["fp32_bytes"] += 4 * n
        else:
            out["bf16_params"] += n
            out["bf16_bytes"] += 2 * n
    total_params = out["quantized_params"] + out["bf16_params"] + out["fp32_params"]
    out.update(weights=weights, total_params=total_params,
               total_bytes=out["quantized_bytes"] + out["bf16_bytes"] + out["fp32_bytes"],
               all_bf16_bytes=2 * (total_params - out["fp32_params"]) + out["fp32_bytes"],
               bits_per_quantized_weight=(8 * out["quantized_bytes"] / out["quantized_params"]
                                          if out["quantized_params"] else None))
    return out


def format_weight_bytes(name: str, b: dict) -> str:
    gib = 2.0 ** 30
    lines = [f"{name}: {b['total_params']:,} checkpoint weights (with MTP)",
             f"  {b['weights']:<5} total:  {b['total_bytes'] / gib:8.2f} GiB   (BF16 checkpoint: "
             f"{b['all_bf16_bytes'] / gib:.2f} GiB, x{b['all_bf16_bytes'] / b['total_bytes']:.2f} smaller)"]
    if b["quantized_params"]:
        lines.append(f"  quantized linears: {b['quantized_params']:,} weights in {b['quantized_bytes'] / gib:.2f} GiB "
                     f"({b['bits_per_quantized_weight']:.3f} bits/weight)")
    lines.append(f"  kept BF16: {b['bf16_params']:,} weights in {b['bf16_bytes'] / gib:.2f} GiB; router fp32: "
                 f"{b['fp32_params']:,} in {b['fp32_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


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
    ap.add_argument("--preset", choices=PRESETS, help="default: nano_30b_a3b (with --weights: Nano and Super)")
    ap.add_argument("--weights", choices=("nvfp4", "fp8", "bf16"),
                    help="print checkpoint weight bytes in this format (released exclusion policy)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    args = ap.parse_args(argv)
    if args.weights:
        names = [args.preset] if args.preset else ["nano_30b_a3b", "super_120b_a12b"]
        res = {n: weight_bytes(ModelConfig.preset(n), args.weights) for n in names}
        print(json.dumps(res, indent=1) if args.json else "\n".join(format_weight_bytes(n, b) for n, b in res.items()))
        return
    if args.preset is None:
        ap.error("--preset is required (unless --weights is given)")
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
