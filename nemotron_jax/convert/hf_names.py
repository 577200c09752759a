"""The Hub tensor-name table: (regex on the HF name) -> (our parameter path, transform), both directions.

Hub layout (spec section 6): `backbone.embeddings.weight`, `backbone.layers.{i}.norm.weight`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`, `lm_head.weight`; routed experts one tensor per
expert (`experts.{j}.{up,down}_proj.weight`, [out, in]); the MTP block under `mtp.layers.{p}.*` where p is the
position in the flattened MTP pattern (one depth: the weights are shared), `enorm`/`hnorm`/`eh_proj` on
position 0 and `final_layernorm` on the last position.

Our side (nnx state paths of NemotronModel): Linear kernels are [in, out] (transpose of HF's [out, in]);
the conv weight is [k, conv_dim] (HF [conv_dim, 1, k]); routed experts are stacked: up_proj [E, in, m],
down_proj [E, m, in], so HF expert j's [out, in] matrix is slice j, transposed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from nemotron_jax.config import LAYER_TYPES, ModelConfig

Path = tuple  # an nnx state path, e.g. ("layers", 3, "mixer", "in_proj", "kernel")


@dataclass(frozen=True)
class Transform:
    """to_ours: HF array -> our array (or expert slice); to_hf: the inverse."""
    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    shape_to_hf: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda a: a, lambda a: a, lambda s: tuple(s))
TRANSPOSE = Transform("transpose", lambda a: a.T, lambda a: a.T, lambda s: tuple(s[::-1]))
CONV = Transform("conv",  # HF [C, 1, k] <-> ours [k, C]
                 lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :], lambda s: (s[1], 1, s[0]))

_BLOCK = r"(?P<stack>backbone|mtp)\.layers\.(?P<i>\d+)\."
_MIX = _BLOCK + r"mixer\."

# (regex on the HF name, our path template below the block (or from the root), transform, expert?)
# Templates: "{blk}" expands to ("layers", i) for backbone and ("mtp", "layers", i) for mtp.
RULES: list[tuple[re.Pattern, tuple, Transform]] = [(re.compile(r), t, f) for r, t, f in [
    (r"backbone\.embeddings\.weight", ("embeddings",), IDENTITY),
    (r"backbone\.norm_f\.weight", ("norm_f", "weight"), IDENTITY),
    (r"lm_head\.weight", ("lm_head", "kernel"), TRANSPOSE),
    (_BLOCK + r"norm\.weight", ("{blk}", "norm", "weight"), IDENTITY),
    # Mamba-2
    (_MIX + r"in_proj\.weight", ("{blk}", "mixer", "in_proj", "kernel"), TRANSPOSE),
    (_MIX + r"conv1d\.weight", ("{blk}", "mixer", "conv_weight"), CONV),
    (_MIX + r"conv1d\.bias", ("{blk}", "mixer", "conv_bias"), IDENTITY),
    (_MIX + r"dt_bias", ("{blk}", "mixer", "dt_bias"), IDENTITY),
    (_MIX + r"A_log", ("{blk}", "mixer", "A_log"), IDENTITY),
    (_MIX + r"D", ("{blk}", "mixer", "D"), IDENTITY),
    (_MIX + r"norm\.weight", ("{blk}", "mixer", "norm", "weight"), IDENTITY),
    (_MIX + r"out_proj\.weight", ("{blk}", "mixer", "out_proj", "kernel"), TRANSPOSE),
    # attention
    (_MIX + r"(?P<proj>[qkvo]_proj)\.weight", ("{blk}", "mixer", "{proj}", "kernel"), TRANSPOSE),
    # dense MLP ('-') and the MoE shared expert / latent projections
    (_MIX + r"(?P<proj>up_proj|down_proj)\.weight", ("{blk}", "mixer", "{proj}", "kernel"), TRANSPOSE),
    (_MIX + r"shared_experts\.(?P<proj>up_proj|down_proj)\.weight",
     ("{blk}", "mixer", "shared_experts", "{proj}", "kernel"), TRANSPOSE),
    (_MIX + r"(?P<proj>fc1_latent_proj|fc2_latent_proj)\.weight", ("{blk}", "mixer", "{proj}", "kernel"), TRANSPOSE),
    # router
    (_MIX + r"gate\.weight", ("{blk}", "mixer", "gate", "kernel"), TRANSPOSE),
    (_MIX + r"gate\.e_score_correction_bias", ("{blk}", "mixer", "gate", "e_score_correction_bias"), IDENTITY),
    # routed experts: slice j of the stacked tensor
    (_MIX + r"experts\.(?P<j>\d+)\.(?P<proj>up_proj|down_proj)\.weight",
     ("{blk}", "mixer", "experts", "{proj}"), TRANSPOSE),
    # MTP extras
    (r"mtp\.layers\.(?P<i>\d+)\.(?P<proj>enorm|hnorm)\.weight", ("mtp", "{proj}", "weight"), IDENTITY),
    (r"mtp\.layers\.(?P<i>\d+)\.eh_proj\.weight", ("mtp", "eh_proj", "kernel"), TRANSPOSE),
    (r"mtp\.layers\.(?P<i>\d+)\.final_layernorm\.weight", ("mtp", "final_layernorm", "weight"), IDENTITY),
]]


@dataclass(frozen=True)
class Entry:
    hf_name: str
    path: Path  # our nnx state path
    transform: Transform
    expert: int | None = None  # slice of the stacked expert tensor, or None for a whole leaf


class UnknownTensorError(KeyError):
    pass


def resolve(name: str) -> Entry:
    """The table applied to one HF name (our path, transform, expert slot); KeyError if no rule matches."""
    for rx, tmpl, tf in RULES:
        m = rx.fullmatch(name)
        if m is None:
            continue
        g = m.groupdict()
        out: list = []
        for part in tmpl:
            if part == "{blk}":
                out += (["layers", int(g["i"])] if g["stack"] == "backbone" else ["mtp", "layers", int(g["i"])])
            elif part == "{proj}":
                out.append(g["proj"])
            else:
                out.append(part)
        return Entry(name, tuple(out), tf, int(g["j"]) if g.get("j") is not None else None)
    raise UnknownTensorError(f"tensor {name!r} matches no rule of the NemotronH name table")


def _mixer_names(prefix: str, char: str, cfg: ModelConfig) -> list[str]:
    kind = LAYER_TYPES[char]
    mx = prefix + "mixer."
    if kind == "mamba":
        names = [mx + s for s in ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight",
                                  "out_proj.weight")]
        if cfg.use_conv_bias:
            names.append(mx + "conv1d.bias")
        return names
    if kind == "attention":
        return [mx + f"{p}_proj.weight" for p in "qkvo"]
    if kind == "mlp":
        return [mx + "up_proj.weight", mx + "down_proj.weight"]
    names = [mx + "gate.weight", mx + "gate.e_score_correction_bias",
             mx + "shared_experts.up_proj.weight", mx + "shared_experts.down_proj.weight"]
    if cfg.moe_latent_size is not None:
        names += [mx + "fc1_latent_proj.weight", mx + "fc2_latent_proj.weight"]
    for j in range(cfg.n_routed_experts):
        names += [mx + f"experts.{j}.up_proj.weight", mx + f"experts.{j}.down_proj.weight"]
    return names


def hub_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name of the Hub checkpoint for `cfg` (MTP included when enabled), in our layer order."""
    names = ["backbone.embeddings.weight"]
    for i, ch in enumerate(cfg.hybrid_override_pattern):
        p = f"backbone.layers.{i}."
        names += [p + "norm.weight"] + _mixer_names(p, ch, cfg)
    names += ["backbone.norm_f.weight", "lm_head.weight"]
    if cfg.mtp_enabled:
        pat = cfg.mtp_hybrid_override_pattern
        for i, ch in enumerate(pat):
            p = f"mtp.layers.{i}."
            if i == 0:
                names += [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight"]
            names += [p + "norm.weight"] + _mixer_names(p, ch, cfg)
            if i == len(pat) - 1:
                names.append(p + "final_layernorm.weight")
    return names


def entries(cfg: ModelConfig) -> list[Entry]:
    """hub_names(cfg) resolved through the table, in checkpoint order."""
    return [resolve(n) for n in hub_names(cfg)]


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)
