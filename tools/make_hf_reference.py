"""Build the HF NemotronH reference data that the JAX converter tests compare against.

Run from the repository root with the separate Python 3.11 venv that holds torch and
transformers (see tools/README.md):

    /tmp/hfvenv/bin/python tools/make_hf_reference.py            # regenerate everything
    /tmp/hfvenv/bin/python tools/make_hf_reference.py --case moe  # one case only
    /tmp/hfvenv/bin/python tools/make_hf_reference.py --names-only
    /tmp/hfvenv/bin/python tools/make_hf_reference.py --check-export DIR --case moe

Output, under tests/fixtures/hf_reference/:
  <case>/config.json, <case>/model.safetensors   save_pretrained output (Hub layout)
  <case>/inputs.npz      input_ids [B, T] int32
  <case>/outputs.npz     logits, hidden_states, block_outputs, router_* (see _run_case)
  <case>/meta.json       config dict, seeds, versions, what every npz key holds
  names_nano.json, names_super.json   every tensor name/shape of a Hub checkpoint
  <case>/export_check.npz, export_check.json   written by --check-export only

Every model is fp32 and CPU; HF is run with attn_implementation="eager" and
experts_implementation="eager" (the plain-torch paths; the defaults "sdpa"/"grouped_mm"
are also run and their max deviation recorded in meta.json).

torch and transformers are NOT dependencies of nemotron-jax; CI only reads the saved files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import NemotronHConfig, NemotronHForCausalLM

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "hf_reference"

BATCH = 2
SEQ = 20  # with chunk_size 8: three chunks, the last one padded (20 % 8 = 4)

# --------------------------------------------------------------------------------------
# Tiny cases. Each entry: config kwargs for NemotronHConfig, plus generator-only options
# under the "_gen" key (not part of the config).
# --------------------------------------------------------------------------------------
_COMMON = dict(
    vocab_size=256,
    hidden_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # q width 64 != hidden 48: catches reshapes that assume d = H*hd
    max_position_embeddings=256,
    ssm_state_size=8,
    mamba_num_heads=8,
    mamba_head_dim=8,  # d_inner 64; `expand` (2) would give 96 and is ignored by HF
    n_groups=2,  # 4 heads per B/C group; gated norm groups of 32 channels
    conv_kernel=4,
    chunk_size=8,
    intermediate_size=80,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# What the MoE cases share: expert and shared-expert widths, normalised top-k, no group limit.
_MOE = dict(
    moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
)

CASES: dict[str, dict] = {
    # Mamba-2 (groups > 1), GQA attention, dense relu2 MLP; no MoE.
    "hybrid_dense": dict(
        _COMMON,
        layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp",
                           "linear_attention", "full_attention"],
        _gen=dict(seed=1001),
    ),
    # Plain MoE (no latent): sigmoid router, random correction bias, scale 2.5.
    "moe": dict(
        _COMMON,
        **_MOE,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "moe"],
        n_routed_experts=8,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        _gen=dict(seed=2002),
    ),
    # LatentMoE: experts live in a 16-wide latent space; router and shared expert stay at 48.
    "latent_moe": dict(
        _COMMON,
        **_MOE,
        layers_block_type=["linear_attention", "moe", "linear_attention", "full_attention", "moe", "moe"],
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_latent_size=16,
        routed_scaling_factor=5.0,
        _gen=dict(seed=3003),
    ),
    # Group-limited routing (n_group 4, topk_group 2) on top of LatentMoE.
    "group_routing": dict(
        _COMMON,
        **dict(_MOE, n_group=4, topk_group=2),
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_latent_size=16,
        routed_scaling_factor=2.0,
        _gen=dict(seed=4004),
    ),
    # Time-step clamp actually active: time_step_min 0.05 and dt_bias drawn so that many
    # softplus(dt + dt_bias) fall below it. time_step_limit is set to a non-default value to
    # show HF ignores it. config.json is rewritten in the legacy Hub style
    # (hybrid_override_pattern, mamba_* keys, num_hidden_layers); HF parses it to the same config.
    "dt_clamp_legacy": dict(
        _COMMON,
        **_MOE,
        layers_block_type=["linear_attention", "moe", "linear_attention", "full_attention", "mlp"],
        n_routed_experts=8,
        num_experts_per_tok=3,
        routed_scaling_factor=1.5,
        time_step_min=0.05,
        time_step_limit=(0.0, 2.0),
        _gen=dict(seed=5005, dt_low=True, legacy_config=True),
    ),
}

# Legacy Hub key -> current NemotronHConfig field (configuration_nemotron_h.__post_init__).
LEGACY_KEYS = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "expand": "mamba_expand",
    "time_step_min": "mamba_dt_min",
    "time_step_max": "mamba_dt_max",
    "time_step_limit": "mamba_dt_limit",
    "time_step_floor": "mamba_dt_init_floor",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
}
PATTERN_CHAR = {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}

# --------------------------------------------------------------------------------------
# Presets for the abstract name tables (spec section 1).
# --------------------------------------------------------------------------------------
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
                 "EMEMEMEM*EMEMEMEME")
PRESETS = {
    "nano": dict(
        vocab_size=131072, hidden_size=2688, hybrid_override_pattern=NANO_PATTERN,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
        chunk_size=128, n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
        n_group=1, topk_group=1, norm_topk_prob=True, n_shared_experts=1,
        max_position_embeddings=262144, tie_word_embeddings=False, layer_norm_epsilon=1e-5,
    ),
    "super": dict(
        vocab_size=131072, hidden_size=4096, hybrid_override_pattern=SUPER_PATTERN,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
        chunk_size=128, n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
        n_group=1, topk_group=1, norm_topk_prob=True, n_shared_experts=1,
        max_position_embeddings=262144, tie_word_embeddings=False, layer_norm_epsilon=1e-5,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", eos_token_id=[2, 11],
    ),
}
# Tensors HF keeps in fp32 even when the rest of the model is bf16 (_keep_in_fp32_modules_strict).
FP32_SUFFIXES = ("gate.weight", "gate.e_score_correction_bias")


def versions() -> dict:
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------------------
# Hub-name mapping (in-memory HF names -> names save_pretrained writes)
# --------------------------------------------------------------------------------------
def hub_names_from_state(state: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Map in-memory names/shapes to the Hub layout: `model.` -> `backbone.`, and the stacked
    experts `experts.up_proj [E, m, in]` / `experts.down_proj [E, in, m]` -> one
    `experts.{j}.{up,down}_proj.weight` per expert. This reverses the "nemotron_h" entry of
    transformers' conversion_mapping.py; check_hub_names() verifies it against save_pretrained."""
    out: dict[str, list[int]] = {}
    for name, shape in state.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        if name.endswith(".mixer.experts.up_proj") or name.endswith(".mixer.experts.down_proj"):
            prefix, proj = name.rsplit(".", 1)
            for j in range(shape[0]):
                out[f"{prefix}.{j}.{proj}.weight"] = list(shape[1:])
        else:
            out[name] = list(shape)
    return out


def in_memory_state(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def saved_names(path: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (list(sl.get_shape()), sl.get_dtype())
    return out


# --------------------------------------------------------------------------------------
# Parameter randomisation
# --------------------------------------------------------------------------------------
@torch.no_grad()
def randomise(model: NemotronHForCausalLM, cfg: NemotronHConfig, gen: dict) -> None:
    """Overwrite every tensor with seeded random values. Nothing is left at an init value that
    could hide a bug (ones, zeros, arange): norm weights ~ 1 + 0.2 N, biases nonzero, etc.
    Scales are chosen so that every block changes the residual stream by O(0.1-1) and logits
    are O(1)."""
    g = torch.Generator().manual_seed(gen["seed"] + 1)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo

    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("embeddings.weight"):
            v = normal(shape, 1.0)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            v = normal(shape, 0.2, mean=1.0)
        elif leaf == "A_log":
            v = torch.log(uniform(shape, 0.5, 4.0))
        elif leaf == "D":
            v = normal(shape, 0.5, mean=0.5)
        elif leaf == "dt_bias":
            if gen.get("dt_low"):
                # softplus^-1 of dt in [5e-3, 0.2]: about half the heads' dt fall below 0.05
                dt = torch.exp(uniform(shape, math.log(5e-3), math.log(0.2)))
            else:
                dt = torch.exp(uniform(shape, math.log(0.02), math.log(0.8)))
            v = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("conv1d.weight"):
            v = normal(shape, 0.4)
        elif name.endswith("conv1d.bias"):
            v = normal(shape, 0.1)
        elif name.endswith("gate.weight"):  # router [E, d]
            v = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif name.endswith("experts.up_proj") or name.endswith("experts.down_proj"):  # [E, out, in]
            v = normal(shape, 0.8 / math.sqrt(shape[2]))
        elif name == "lm_head.weight":
            v = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif p.ndim == 2:  # every other Linear [out, in]
            v = normal(shape, 0.8 / math.sqrt(shape[1]))
        else:
            raise AssertionError(f"unhandled parameter {name} {shape}")
        p.copy_(v)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(normal(tuple(b.shape), 0.1))
        else:
            raise AssertionError(f"unhandled buffer {name}")


# --------------------------------------------------------------------------------------
# Running HF with hooks
# --------------------------------------------------------------------------------------
def run_hf(model: NemotronHForCausalLM, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Forward pass with output_hidden_states, plus forward hooks that record each block's raw
    output (before norm_f for the last one) and each router's outputs."""
    blocks, routers = [], {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o: blocks.append(o.detach().clone())))
        if layer.block_type == "moe":
            def rhook(m, a, o, i=i):
                x = a[0].reshape(-1, m.hidden_dim).float()
                routers[i] = dict(input=x.detach().clone(), logits=o[0].detach().clone(),
                                  weights=o[1].detach().clone(), indices=o[2].detach().clone())
            hooks.append(layer.mixer.gate.register_forward_hook(rhook))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    res = {
        "logits": out.logits.float().numpy(),
        "hidden_states": torch.stack(out.hidden_states).float().numpy(),
        "block_outputs": torch.stack(blocks).float().numpy(),
    }
    res["_routers"] = routers
    return res


def routing_margins(model: NemotronHForCausalLM, routers: dict) -> dict[str, float]:
    """Smallest gap, over all tokens, between the k-th and (k+1)-th biased router score (and
    between the selected and unselected group scores). A tiny gap would make expert selection
    depend on fp32 rounding; the generator refuses cases where it is below 1e-4."""
    out = {}
    for i, r in routers.items():
        gate = model.model.layers[i].mixer.gate
        s = torch.sigmoid(r["logits"]) + gate.e_score_correction_bias
        E, k, ng, tg = gate.num_experts, gate.top_k, gate.num_group, gate.topk_group
        if ng > 1:
            gs = s.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
            srt = gs.sort(dim=-1, descending=True)[0]
            out[f"layer{i}_group"] = float((srt[:, tg - 1] - srt[:, tg]).min())
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(tg, dim=-1)[1], 1.0)
            s = s.masked_fill(~keep.repeat_interleave(E // ng, dim=1).bool(), float("-inf"))
        srt = s.sort(dim=-1, descending=True)[0]
        gap = srt[:, k - 1] - srt[:, k]
        out[f"layer{i}_topk"] = float(gap[torch.isfinite(gap)].min()) if torch.isfinite(gap).any() else float("inf")
    return out


def bias_changes_selection(model: NemotronHForCausalLM, routers: dict) -> dict[str, int]:
    """Number of tokens whose top-k set differs when the correction bias is dropped (n_group 1
    view): shows the bias is doing something in the reference data."""
    out = {}
    for i, r in routers.items():
        gate = model.model.layers[i].mixer.gate
        s = torch.sigmoid(r["logits"])
        a = torch.topk(s, gate.top_k, dim=-1)[1].sort(-1)[0]
        b = torch.topk(s + gate.e_score_correction_bias, gate.top_k, dim=-1)[1].sort(-1)[0]
        out[f"layer{i}"] = int((a != b).any(-1).sum())
    return out


def dt_clamp_stats(model: NemotronHForCausalLM, hidden_in: np.ndarray) -> dict[str, float]:
    """Fraction of (token, head) dt values that HF's clamp dt >= time_step_min changes, per Mamba layer."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        if layer.block_type != "linear_attention":
            continue
        mix = layer.mixer
        with torch.no_grad():
            h = layer.norm(torch.from_numpy(hidden_in[i]))
            dt = mix.in_proj(h)[..., -mix.num_heads:]
            dt = torch.nn.functional.softplus(dt + mix.dt_bias)
        out[f"layer{i}"] = float((dt < mix.time_step_limit[0]).float().mean())
    return out


# --------------------------------------------------------------------------------------
# Independent numpy oracle (float64), written from docs/hf_numerics.md. It reads only the
# saved config.json + model.safetensors (legacy config keys included) and uses the
# token-by-token Mamba-2 recurrence rather than HF's chunked scan, so agreement with HF
# (~3e-6 on these cases) checks both the saved files and the documented numerics.
# --------------------------------------------------------------------------------------
def _cfg_get(c: dict, key: str):
    legacy = LEGACY_KEYS.get(key)
    return c[key] if key in c else c[legacy]


def _block_pattern(c: dict) -> str:
    if c.get("layers_block_type") is not None:
        return "".join(PATTERN_CHAR[t] for t in c["layers_block_type"])
    return c["hybrid_override_pattern"]


def numpy_forward(case_dir: Path, input_ids: np.ndarray, dt_clamp: bool = True):
    from safetensors.numpy import load_file

    c = json.loads((case_dir / "config.json").read_text())
    W = {k: v.astype(np.float64) for k, v in load_file(str(case_dir / "model.safetensors")).items()}
    eps = c["layer_norm_epsilon"]
    G, N, K = _cfg_get(c, "n_groups"), c["ssm_state_size"], _cfg_get(c, "conv_kernel")
    H, P = c["mamba_num_heads"], c["mamba_head_dim"]
    di, t_min = H * P, _cfg_get(c, "time_step_min")

    def rms(x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def relu2(x):
        return np.maximum(x, 0.0) ** 2

    def softplus(x):  # torch: beta 1, threshold 20
        return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))

    x = W["backbone.embeddings.weight"][input_ids]
    Bsz, T, d = x.shape
    hidden = [x]
    for i, ch in enumerate(_block_pattern(c)):
        h = rms(x, W[f"backbone.layers.{i}.norm.weight"])
        m = f"backbone.layers.{i}.mixer."
        if ch == "M":
            zxbcdt = h @ W[m + "in_proj.weight"].T
            z, xbc, dt = np.split(zxbcdt, [di, 2 * di + 2 * G * N], axis=-1)
            w = W[m + "conv1d.weight"][:, 0, :]  # [conv_dim, K]; tap K-1 multiplies the current token
            padded = np.concatenate([np.zeros((Bsz, K - 1, xbc.shape[-1])), xbc], axis=1)
            xbc = silu(sum(padded[:, k:k + T] * w[:, k] for k in range(K)) + W[m + "conv1d.bias"])
            xs, Bm, Cm = np.split(xbc, [di, di + G * N], axis=-1)
            xs = xs.reshape(Bsz, T, H, P)
            Bm = np.repeat(Bm.reshape(Bsz, T, G, N), H // G, axis=2)  # head h uses group h // (H/G)
            Cm = np.repeat(Cm.reshape(Bsz, T, G, N), H // G, axis=2)
            dt = softplus(dt + W[m + "dt_bias"])
            if dt_clamp:
                dt = np.maximum(dt, t_min)
            A = -np.exp(W[m + "A_log"])
            S = np.zeros((Bsz, H, P, N))
            ys = []
            for t in range(T):
                S = (np.exp(dt[:, t] * A)[:, :, None, None] * S
                     + (dt[:, t, :, None] * xs[:, t])[..., None] * Bm[:, t, :, None, :])
                ys.append(np.einsum("bhpn,bhn->bhp", S, Cm[:, t]) + W[m + "D"][:, None] * xs[:, t])
            y = np.stack(ys, axis=1).reshape(Bsz, T, di) * silu(z)
            yg = y.reshape(Bsz, T, G, di // G)
            yg = yg / np.sqrt((yg * yg).mean(-1, keepdims=True) + eps)
            out = (W[m + "norm.weight"] * yg.reshape(Bsz, T, di)) @ W[m + "out_proj.weight"].T
        elif ch == "*":
            nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
            q = (h @ W[m + "q_proj.weight"].T).reshape(Bsz, T, nh, hd)
            k = np.repeat((h @ W[m + "k_proj.weight"].T).reshape(Bsz, T, nkv, hd), nh // nkv, axis=2)
            v = np.repeat((h @ W[m + "v_proj.weight"].T).reshape(Bsz, T, nkv, hd), nh // nkv, axis=2)
            s = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            out = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(Bsz, T, nh * hd) @ W[m + "o_proj.weight"].T
        elif ch == "-":
            out = relu2(h @ W[m + "up_proj.weight"].T) @ W[m + "down_proj.weight"].T
        elif ch == "E":
            E, k_, ng, tg = c["n_routed_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
            hf = h.reshape(-1, d)
            scores = 1.0 / (1.0 + np.exp(-(hf @ W[m + "gate.weight"].T)))
            choice = scores + W[m + "gate.e_score_correction_bias"]
            if ng > 1:
                gscore = np.sort(choice.reshape(-1, ng, E // ng), axis=-1)[..., -2:].sum(-1)
                keep = np.zeros_like(gscore, dtype=bool)
                np.put_along_axis(keep, np.argsort(-gscore, axis=-1)[:, :tg], True, axis=-1)
                choice = np.where(np.repeat(keep, E // ng, axis=1), choice, -np.inf)
            idx = np.argsort(-choice, axis=-1)[:, :k_]
            g = np.take_along_axis(scores, idx, axis=-1)
            if c["norm_topk_prob"]:
                g = g / (g.sum(-1, keepdims=True) + 1e-20)
            g = g * c["routed_scaling_factor"]
            latent = c.get("moe_latent_size") is not None
            u = hf @ W[m + "fc1_latent_proj.weight"].T if latent else hf
            r = np.zeros_like(u)
            for e in range(E):
                tok, slot = np.nonzero(idx == e)
                if len(tok):
                    ye = relu2(u[tok] @ W[m + f"experts.{e}.up_proj.weight"].T) @ W[m + f"experts.{e}.down_proj.weight"].T
                    np.add.at(r, tok, g[tok, slot, None] * ye)
            if latent:
                r = r @ W[m + "fc2_latent_proj.weight"].T
            shared = relu2(hf @ W[m + "shared_experts.up_proj.weight"].T) @ W[m + "shared_experts.down_proj.weight"].T
            out = (r + shared).reshape(Bsz, T, d)
        else:
            raise ValueError(ch)
        x = x + out
        hidden.append(x)
    hidden[-1] = rms(x, W["backbone.norm_f.weight"])
    return hidden[-1] @ W["lm_head.weight"].T, np.stack(hidden)


# --------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------
def build_case(name: str) -> None:
    spec = dict(CASES[name])
    gen = spec.pop("_gen")
    cfg_kwargs = spec
    torch.manual_seed(gen["seed"])
    cfg = NemotronHConfig(**cfg_kwargs)
    model = NemotronHForCausalLM(cfg).float().eval()
    randomise(model, cfg, gen)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")

    tok_gen = torch.Generator().manual_seed(gen["seed"] + 2)
    input_ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=tok_gen)

    res = run_hf(model, input_ids)
    routers = res.pop("_routers")
    margins = routing_margins(model, routers)
    if margins and min(margins.values()) < 1e-4:
        raise SystemExit(f"{name}: routing margin {margins} < 1e-4; choose another seed")
    if not np.isfinite(res["logits"]).all():
        raise SystemExit(f"{name}: non-finite logits")

    # Default (sdpa / grouped_mm) kernels: record how far they are from the eager reference.
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("grouped_mm")
    alt = run_hf(model, input_ids)
    default_impl_diff = float(np.abs(alt["logits"] - res["logits"]).max())
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")

    case_dir = OUT / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    model.save_pretrained(str(case_dir), safe_serialization=True)

    # The saved file must hold exactly the Hub names (backbone.*, one tensor per expert).
    saved = saved_names(case_dir / "model.safetensors")
    expect = hub_names_from_state(in_memory_state(model))
    if {k: v[0] for k, v in saved.items()} != expect:
        raise SystemExit(f"{name}: save_pretrained names differ from the Hub-layout mapping:\n"
                         f"only saved: {sorted(set(saved) - set(expect))}\n"
                         f"only mapped: {sorted(set(expect) - set(saved))}")

    if gen.get("legacy_config"):
        write_legacy_config(case_dir, cfg)

    # Reload what was written and check it reproduces the logits (config parse + weight load).
    reloaded = NemotronHForCausalLM.from_pretrained(
        str(case_dir), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    reloaded.eval()
    if reloaded.config.to_dict()["layers_block_type"] != cfg.layers_block_type:
        raise SystemExit(f"{name}: reloaded config differs")
    rl = run_hf(reloaded, input_ids)
    reload_diff = float(np.abs(rl["logits"] - res["logits"]).max())
    if reload_diff != 0.0:
        raise SystemExit(f"{name}: reloaded checkpoint gives different logits ({reload_diff})")

    np.savez(case_dir / "inputs.npz", input_ids=input_ids.numpy().astype(np.int32))
    np_logits, np_hidden = numpy_forward(case_dir, input_ids.numpy())
    np_logit_diff = float(np.abs(np_logits - res["logits"]).max())
    np_hidden_diff = float(np.abs(np_hidden - res["hidden_states"]).max())
    if np_logit_diff > 2e-5 or np_hidden_diff > 2e-5:
        raise SystemExit(f"{name}: numpy fp64 oracle disagrees with HF: logits {np_logit_diff}, hidden {np_hidden_diff}")
    clamp_effect = None
    if gen.get("dt_low"):
        clamp_effect = float(np.abs(numpy_forward(case_dir, input_ids.numpy(), dt_clamp=False)[0] - res["logits"]).max())
    outputs = dict(res)
    moe_layers = sorted(routers)
    if moe_layers:
        outputs["router_layers"] = np.array(moe_layers, dtype=np.int32)
        outputs["router_logits"] = torch.stack([routers[i]["logits"] for i in moe_layers]).numpy()
        outputs["router_topk_indices"] = torch.stack(
            [routers[i]["indices"].sort(-1)[0] for i in moe_layers]).numpy().astype(np.int32)
        # weights reordered to match the sorted indices
        w = []
        for i in moe_layers:
            order = routers[i]["indices"].argsort(-1)
            w.append(routers[i]["weights"].gather(1, order))
        outputs["router_topk_weights"] = torch.stack(w).numpy()
    np.savez_compressed(case_dir / "outputs.npz", **outputs)

    L = cfg.num_hidden_layers
    meta = {
        "case": name,
        "description": describe(name),
        "config_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg_kwargs.items()},
        "config": json.loads(cfg.to_json_string()),
        "pattern": "".join(PATTERN_CHAR[t] for t in cfg.layers_block_type),
        "seeds": {"torch.manual_seed": gen["seed"], "param_generator": gen["seed"] + 1,
                  "input_generator": gen["seed"] + 2},
        "versions": versions(),
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "default_impl_max_abs_logit_diff": default_impl_diff,
        "numpy_fp64_oracle_max_abs_diff": {"logits": np_logit_diff, "hidden_states": np_hidden_diff,
                                           "note": "numpy_forward() in tools/make_hf_reference.py: float64, "
                                                   "token-by-token Mamba recurrence, reads only the saved files"},
        "max_abs_logit_change_without_dt_clamp": clamp_effect,
        "config_json_style": "legacy (hybrid_override_pattern, mamba_* keys)" if gen.get("legacy_config")
                             else "save_pretrained (layers_block_type)",
        "routing_min_margin": margins,
        "tokens_changed_by_correction_bias": bias_changes_selection(model, routers),
        "dt_fraction_clamped_by_time_step_min": dt_clamp_stats(model, res["hidden_states"]),
        "logits_abs_max": float(np.abs(res["logits"]).max()),
        "logits_std": float(res["logits"].std()),
        "files": {
            "inputs.npz": {"input_ids": [BATCH, SEQ, "int32"]},
            "outputs.npz": {
                "logits": [BATCH, SEQ, cfg.vocab_size, "float32: lm_head(norm_f(block_{L-1} output))"],
                "hidden_states": [L + 1, BATCH, SEQ, cfg.hidden_size,
                                  "float32: HF output_hidden_states. [0] = embeddings (input of block 0); "
                                  "[i] for 1 <= i < L = output of block i-1 (residual stream); "
                                  "[L] = norm_f(output of block L-1), i.e. the lm_head input"],
                "block_outputs": [L, BATCH, SEQ, cfg.hidden_size,
                                  "float32: raw output of block i (residual added), from forward hooks; "
                                  "block_outputs[i] == hidden_states[i+1] for i < L-1; "
                                  "block_outputs[L-1] is before norm_f"],
                "router_layers": ["n_moe", "int32: block indices of the MoE layers"],
                "router_logits": ["n_moe", BATCH * SEQ, "n_routed_experts", "float32: pre-sigmoid, fp32"],
                "router_topk_indices": ["n_moe", BATCH * SEQ, "num_experts_per_tok",
                                        "int32: chosen experts, sorted ascending per token"],
                "router_topk_weights": ["n_moe", BATCH * SEQ, "num_experts_per_tok",
                                        "float32: final gate weights (normalised, times routed_scaling_factor), "
                                        "in the order of router_topk_indices"],
            },
        },
        "hub_tensors": {k: {"shape": v[0], "dtype": v[1]} for k, v in sorted(saved.items())},
    }
    if not moe_layers:
        for k in [k for k in meta["files"]["outputs.npz"] if k.startswith("router_")]:
            del meta["files"]["outputs.npz"][k]
    with open(case_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: L={L} logits max {meta['logits_abs_max']:.3f} std {meta['logits_std']:.3f} "
          f"margins {min(margins.values()) if margins else None} sdpa/grouped_mm diff {default_impl_diff:.2e} "
          f"numpy oracle {np_logit_diff:.1e}/{np_hidden_diff:.1e} no-clamp change {clamp_effect}")


def describe(name: str) -> str:
    return {
        "hybrid_dense": "Mamba-2 (8 heads, n_groups 2, chunk 8 over T 20), GQA 4/2 attention (head_dim 16), dense relu2 MLP",
        "moe": "MoE without latent: 8 experts top-2, sigmoid router, random e_score_correction_bias, scale 2.5",
        "latent_moe": "LatentMoE (latent 16 of hidden 48): 16 experts top-4, scale 5.0",
        "group_routing": "LatentMoE with group-limited routing: n_group 4, topk_group 2, 16 experts top-4, scale 2.0",
        "dt_clamp_legacy": "time_step_min 0.05 with low dt so the HF clamp is active; time_step_limit (0, 2) "
                           "set but ignored by HF; config.json in legacy Hub key style",
    }[name]


def write_legacy_config(case_dir: Path, cfg: NemotronHConfig) -> None:
    """Rewrite config.json the way older/Hub NemotronH configs spell it: hybrid_override_pattern
    instead of layers_block_type, mamba_* legacy keys, num_hidden_layers present."""
    path = case_dir / "config.json"
    d = json.loads(path.read_text())
    d["hybrid_override_pattern"] = "".join(PATTERN_CHAR[t] for t in d.pop("layers_block_type"))
    d["num_hidden_layers"] = len(d["hybrid_override_pattern"])
    for new, old in LEGACY_KEYS.items():
        if new in d:
            d[old] = d.pop(new)
    d["mtp_hybrid_override_pattern"] = "".join(PATTERN_CHAR[t] for t in d.pop("mtp_layers_block_type"))
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    back = NemotronHConfig.from_pretrained(str(case_dir))
    a, b = back.to_dict(), cfg.to_dict()
    diff = {k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ("transformers_version",)}
    if diff:
        raise SystemExit(f"legacy config parses differently in fields {sorted(diff)}")


# --------------------------------------------------------------------------------------
# Abstract name tables
# --------------------------------------------------------------------------------------
def mtp_names_from_spec(cfg: NemotronHConfig) -> dict[str, list[int]]:
    """MTP tensors of the Hub checkpoint, from spec section 6 (HF does not implement MTP).
    One shared-weight depth; mtp pattern "*E": layer 0 = attention (+ enorm/hnorm/eh_proj),
    layer 1 = (Latent)MoE (+ final_layernorm)."""
    d, E = cfg.hidden_size, cfg.n_routed_experts
    m, S = cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size
    lat = cfg.moe_latent_size or d
    hq = cfg.num_attention_heads * cfg.head_dim
    hkv = cfg.num_key_value_heads * cfg.head_dim
    assert [PATTERN_CHAR[t] for t in cfg.mtp_layers_block_type] == ["*", "E"], cfg.mtp_layers_block_type
    n = {
        "mtp.layers.0.enorm.weight": [d],
        "mtp.layers.0.hnorm.weight": [d],
        "mtp.layers.0.eh_proj.weight": [d, 2 * d],
        "mtp.layers.0.norm.weight": [d],
        "mtp.layers.0.mixer.q_proj.weight": [hq, d],
        "mtp.layers.0.mixer.k_proj.weight": [hkv, d],
        "mtp.layers.0.mixer.v_proj.weight": [hkv, d],
        "mtp.layers.0.mixer.o_proj.weight": [d, hq],
        "mtp.layers.1.norm.weight": [d],
        "mtp.layers.1.mixer.gate.weight": [E, d],
        "mtp.layers.1.mixer.gate.e_score_correction_bias": [E],
        "mtp.layers.1.mixer.shared_experts.up_proj.weight": [S, d],
        "mtp.layers.1.mixer.shared_experts.down_proj.weight": [d, S],
        "mtp.layers.1.final_layernorm.weight": [d],
    }
    for j in range(E):
        n[f"mtp.layers.1.mixer.experts.{j}.up_proj.weight"] = [m, lat]
        n[f"mtp.layers.1.mixer.experts.{j}.down_proj.weight"] = [lat, m]
    if cfg.moe_latent_size is not None:
        n["mtp.layers.1.mixer.fc1_latent_proj.weight"] = [lat, d]
        n["mtp.layers.1.mixer.fc2_latent_proj.weight"] = [d, lat]
    return n


def compact_expert_names(tensors: list[dict]) -> list[dict]:
    """Fold experts.{j}.* entries (identical shape/source/dtype for j = 0..n-1) into one entry
    with a literal "{j}" in the name and "count": n. Keeps names_super.json small (42k names)."""
    groups: dict[tuple, list[int]] = {}
    out: list[dict] = []
    for t in tensors:
        m = re.fullmatch(r"(.*\.experts\.)(\d+)(\..*)", t["name"])
        if m is None:
            out.append(t)
            continue
        key = (m.group(1) + "{j}" + m.group(3), tuple(t["shape"]), t["source"], t["hf_param_dtype_when_loaded_as_bf16"])
        if key not in groups:
            groups[key] = []
            out.append({"name": key[0], "count": None, "shape": t["shape"], "source": t["source"],
                        "hf_param_dtype_when_loaded_as_bf16": t["hf_param_dtype_when_loaded_as_bf16"]})
        groups[key].append(int(m.group(2)))
    for t in out:
        if t.get("count", 0) is None:
            js = sorted(groups[(t["name"], tuple(t["shape"]), t["source"], t["hf_param_dtype_when_loaded_as_bf16"])])
            assert js == list(range(len(js))), (t["name"], js[:5])
            t["count"] = len(js)
    return out


def expand_names(entries: list[dict]) -> dict[str, list[int]]:
    """Inverse of compact_expert_names: every Hub name -> shape."""
    out = {}
    for t in entries:
        if "count" in t:
            for j in range(t["count"]):
                out[t["name"].replace("{j}", str(j))] = t["shape"]
        else:
            out[t["name"]] = t["shape"]
    return out


def build_names(preset: str) -> None:
    kwargs = PRESETS[preset]
    cfg = NemotronHConfig(**kwargs)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    state = in_memory_state(model)
    hub = hub_names_from_state(state)
    tensors = []
    for k, shape in hub.items():
        tensors.append({"name": k, "shape": shape, "source": "hf_meta",
                        "hf_param_dtype_when_loaded_as_bf16": "float32" if k.endswith(FP32_SUFFIXES) else "bfloat16"})
    if cfg.num_nextn_predict_layers > 0:
        for k, shape in mtp_names_from_spec(cfg).items():
            tensors.append({"name": k, "shape": shape, "source": "spec_section_6",
                            "hf_param_dtype_when_loaded_as_bf16": "float32" if k.endswith(FP32_SUFFIXES) else "bfloat16"})
    tensors.sort(key=lambda t: t["name"])
    n_params = sum(math.prod(t["shape"]) for t in tensors if t["source"] == "hf_meta")
    n_mtp = sum(math.prod(t["shape"]) for t in tensors if t["source"] != "hf_meta")
    doc = {
        "preset": preset,
        "config_kwargs": kwargs,
        "config": json.loads(cfg.to_json_string()),
        "versions": versions(),
        "note": ("Names/shapes a Hub safetensors checkpoint holds. source=hf_meta: NemotronHForCausalLM built on "
                 "torch's meta device, in-memory names mapped to the Hub layout (model.->backbone., stacked "
                 "experts [E,out,in] -> experts.{j}.{up,down}_proj.weight [out,in]); the same mapping is checked "
                 "against save_pretrained on every tiny case. source=spec_section_6: MTP tensors, which HF "
                 "does not implement (dropped on load via _keys_to_ignore_on_load_unexpected=['mtp.*']). "
                 "hf_param_dtype_when_loaded_as_bf16: from_pretrained(dtype=bfloat16) upcasts gate.weight and "
                 "gate.e_score_correction_bias to fp32 (_keep_in_fp32_modules_strict); the dtype stored in a file "
                 "is whatever its writer chose. Compact form: an entry with \"count\": n stands for n "
                 "tensors, its name with the literal \"{j}\" replaced by 0..n-1, all of the same shape; "
                 "num_tensors counts the expanded names."),
        "num_tensors": len(tensors),
        "num_params_backbone_and_head": n_params,
        "num_params_mtp": n_mtp,
        "tensors": compact_expert_names(tensors),
    }
    assert expand_names(doc["tensors"]) == {t["name"]: t["shape"] for t in tensors}
    path = OUT / f"names_{preset}.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=0)
    print(f"names_{preset}.json: {len(tensors)} tensors, {n_params / 1e9:.2f}B params (+{n_mtp / 1e9:.2f}B MTP)")


# --------------------------------------------------------------------------------------
# --check-export
# --------------------------------------------------------------------------------------
def check_export(export_dir: Path, case: str) -> None:
    """Load a checkpoint written by nemotron_jax.to_hf with transformers, run the case's saved
    tokens and store the logits beside the reference (export_check.npz / export_check.json)."""
    case_dir = OUT / case
    ref = np.load(case_dir / "outputs.npz")
    input_ids = torch.from_numpy(np.load(case_dir / "inputs.npz")["input_ids"].astype(np.int64))
    model, info = NemotronHForCausalLM.from_pretrained(
        str(export_dir), dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager", output_loading_info=True)
    model.eval()
    res = run_hf(model, input_ids)
    res.pop("_routers")
    logit_diff = float(np.abs(res["logits"] - ref["logits"]).max())
    hidden_diff = float(np.abs(res["hidden_states"] - ref["hidden_states"]).max())
    np.savez_compressed(case_dir / "export_check.npz", logits=res["logits"], hidden_states=res["hidden_states"])
    report = {
        "case": case,
        "export_dir": str(export_dir),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "max_abs_logit_diff_vs_reference": logit_diff,
        "max_abs_hidden_diff_vs_reference": hidden_diff,
        "exported_tensors": {k: {"shape": v[0], "dtype": v[1]}
                             for k, v in sorted(_saved_in_dir(export_dir).items())},
        "versions": versions(),
    }
    with open(case_dir / "export_check.json", "w") as f:
        json.dump(report, f, indent=1)
    bad = any(report["loading_info"].get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    print(json.dumps({k: report[k] for k in ("case", "loading_info", "max_abs_logit_diff_vs_reference",
                                             "max_abs_hidden_diff_vs_reference")}, indent=1))
    if bad or logit_diff > 1e-4:
        raise SystemExit(1)


def _saved_in_dir(d: Path) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(saved_names(f))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable)")
    ap.add_argument("--names-only", action="store_true", help="only write names_nano.json / names_super.json")
    ap.add_argument("--no-names", action="store_true", help="skip the abstract name tables")
    ap.add_argument("--check-export", type=Path, metavar="DIR",
                    help="load a nemotron_jax.to_hf checkpoint in DIR with transformers and record its logits "
                         "for --case (required) into <case>/export_check.{npz,json}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.check_export is not None:
        if not args.case or len(args.case) != 1:
            ap.error("--check-export needs exactly one --case")
        check_export(args.check_export, args.case[0])
        return
    if not args.names_only:
        for name in args.case or CASES:
            build_case(name)
    if not args.no_names and not args.case:
        for preset in PRESETS:
            build_names(preset)


if __name__ == "__main__":
    main()
