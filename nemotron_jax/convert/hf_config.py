"""HF NemotronH `config.json` <-> ModelConfig (transformers 5.24 semantics, docs/hf_numerics.md section 6).

Import (`config_from_hf`):
- Legacy keys are accepted and win over the new ones, as in HF: `mamba_n_groups`, `mamba_d_conv`,
  `mamba_expand`, `mamba_dt_min/max/limit/init_floor`, `mamba_conv_bias`, `mamba_chunk_size`.
- The layer pattern comes from `layers_block_type` (or its alias `layer_types`; legacy values `mamba` and
  `attention` allowed), else from the string `hybrid_override_pattern`; the list wins when both are given. The
  MTP pattern likewise from `mtp_layers_block_type`, else `mtp_hybrid_override_pattern` (used only while the
  list is absent or the HF default).
- HF's dt clamp is `clamp(min=time_step_min)` with no upper limit and `time_step_limit` is never read, so the
  imported config gets `time_step_limit=(time_step_min, inf)`. The stored `time_step_limit` is parsed
  (`{"__float__": "Infinity"}` and "Infinity" accepted) and otherwise ignored.
- `norm_eps` / `rms_norm_eps` are aliases of `layer_norm_epsilon` (equal values required when both are
  present). `quantization_config` (ModelOpt NVFP4 / FP8) is validated here and concerns only the weights;
  `keep_mtp_spec_in_bf16` (Megatron-Bridge) is ignored with a debug log.
- Refused with a ConfigError naming the field (HF would build something we do not implement, or silently
  drop a setting): `attention_bias`, `use_bias`, `mlp_bias`, `mamba_proj_bias`, `tie_word_embeddings` true;
  a non-null `sliding_window` or `rope_scaling`; a `quantization_config` that is not ModelOpt NVFP4 / FP8; `mlp_hidden_act` other than relu2;
  `mamba_hidden_act` other than silu; `n_shared_experts` other than 1; `num_nextn_predict_layers` other than 0
  or 1; top-k larger than the experts the group routing can select; fewer than 2 experts per routing group
  (HF's group score needs a top-2); a `num_hidden_layers` that disagrees with the pattern; a wrong type;
  an unknown block type or pattern character; any key not listed here (pass `strict=False` to only warn).
- Ignored (no effect on the weights or the forward, in HF as here): `IGNORED_KEYS` below, i.e. generic
  PretrainedConfig / generation / tokenizer keys (`architectures`, `model_type`, `transformers_version`,
  `dtype`/`torch_dtype`, `bos/eos/pad_token_id`, `use_cache`, `num_logits_to_keep`, ...), dropout rates
  (eval only), `residual_in_fp32` (HF never reads it), `expand` (HF derives d_inner from heads x head dim),
  `moe_shared_expert_overlap`, `output_router_logits`, `use_mamba_kernels`, `rope_theta` and
  `partial_rotary_factor` (no positional encoding in NemotronH), `auto_map`.

Export (`config_to_hf`) writes the modern key names (`layers_block_type`, `mtp_layers_block_type`), what
`save_pretrained` would write for these fields.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from nemotron_jax.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

BLOCK_TYPE_TO_CHAR = {"linear_attention": "M", "full_attention": "*", "moe": "E", "mlp": "-",
                      "mamba": "M", "attention": "*"}  # the last two: legacy names HF remaps
CHAR_TO_BLOCK_TYPE = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
_HF_DEFAULT_MTP_TYPES = ["full_attention", "moe"]

# legacy key -> current key (HF pops the legacy key; the legacy value wins)
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}

# HF key -> (ModelConfig field, kind, HF default when the key is absent). HF defaults are those of
# NemotronHConfig in transformers 5.24 (docs/hf_numerics.md "Defaults"), not ours.
_INT, _FLOAT, _BOOL, _STR, _OPT_INT = "int", "float", "bool", "str", "int|None"
MAPPED = {
    "vocab_size": ("vocab_size", _INT, 131072),
    "hidden_size": ("hidden_size", _INT, 4096),
    "layer_norm_epsilon": ("layer_norm_epsilon", _FLOAT, 1e-5),
    "initializer_range": ("initializer_range", _FLOAT, 0.02),
    "rescale_prenorm_residual": ("rescale_prenorm_residual", _BOOL, True),
    "max_position_embeddings": ("max_position_embeddings", _INT, 4096),
    "num_attention_heads": ("num_attention_heads", _INT, 32),
    "num_key_value_heads": ("num_key_value_heads", _INT, 8),
    "head_dim": ("head_dim", _INT, 128),
    "intermediate_size": ("intermediate_size", _INT, 21504),
    "mlp_hidden_act": ("mlp_hidden_act", _STR, "relu2"),
    "mamba_num_heads": ("mamba_num_heads", _INT, 128),
    "mamba_head_dim": ("mamba_head_dim", _INT, 64),
    "ssm_state_size": ("ssm_state_size", _INT, 128),
    "n_groups": ("n_groups", _INT, 8),
    "conv_kernel": ("conv_kernel", _INT, 4),
    "chunk_size": ("chunk_size", _INT, 128),
    "use_conv_bias": ("use_conv_bias", _BOOL, True),
    "mamba_hidden_act": ("mamba_hidden_act", _STR, "silu"),
    "time_step_min": ("time_step_min", _FLOAT, 1e-3),
    "time_step_max": ("time_step_max", _FLOAT, 0.1),
    "time_step_floor": ("time_step_floor", _FLOAT, 1e-4),
    "mamba_ssm_cache_dtype": ("mamba_ssm_cache_dtype", _STR, "float32"),
    "n_routed_experts": ("n_routed_experts", _INT, 8),
    "num_experts_per_tok": ("num_experts_per_tok", _INT, 2),
    "moe_intermediate_size": ("moe_intermediate_size", _INT, 7688),
    "moe_shared_expert_intermediate_size": ("moe_shared_expert_intermediate_size", _INT, 7688),
    "n_shared_experts": ("n_shared_experts", _INT, 1),
    "moe_latent_size": ("moe_latent_size", _OPT_INT, None),
    "routed_scaling_factor": ("routed_scaling_factor", _FLOAT, 1.0),
    "n_group": ("n_group", _INT, 1),
    "topk_group": ("topk_group", _INT, 1),
    "norm_topk_prob": ("norm_topk_prob", _BOOL, True),
    "num_nextn_predict_layers": ("num_nextn_predict_layers", _INT, 0),
}

# Keys that must hold exactly this value (HF accepts others but we do not implement / HF ignores them).
REQUIRED_VALUES = {
    "attention_bias": (False, "HF hard-codes bias=False in attention; a true value would be silently dropped"),
    "use_bias": (False, "Mamba in_proj/out_proj biases are not implemented"),
    "mlp_bias": (False, "MLP / shared-expert / latent-projection biases are not implemented"),
    "mamba_proj_bias": (False, "HF never reads it; a true value would be silently dropped"),
    "tie_word_embeddings": (False, "HF NemotronH never ties lm_head to the embeddings"),
    "sliding_window": (None, "HF NemotronH always uses a full causal mask"),
    "rope_scaling": (None, "NemotronH has no positional encoding"),
}

# Aliases some published configs carry beside (or instead of) the HF key; equal values are required when
# both are present. The released Nemotron 3 Nano config.json has `norm_eps` next to `layer_norm_epsilon`.
ALIASES = {"norm_eps": "layer_norm_epsilon", "rms_norm_eps": "layer_norm_epsilon"}

# Keys that only serve other frameworks (Megatron-Bridge, TensorRT-LLM, vLLM): no effect on the HF forward;
# ignored with a debug log. `quantization_config` is validated (nemotron_jax.convert.modelopt) and then
# concerns the weights only.
FRAMEWORK_KEYS = frozenset({"keep_mtp_spec_in_bf16", "quantization_config"})

# Keys accepted and ignored: no effect on the weights or the forward pass (see the module docstring).
IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "use_cache", "num_logits_to_keep", "output_router_logits", "output_attentions",
    "output_hidden_states", "return_dict", "hidden_dropout", "attention_dropout", "residual_in_fp32",
    "expand", "moe_shared_expert_overlap", "use_mamba_kernels", "rope_theta", "partial_rotary_factor",
    "time_step_limit", "is_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label",
    "label2id", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "pruned_heads",
    "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size", "torchscript",
    "use_return_dict", "attn_implementation", "experts_implementation", "_attn_implementation",
})
PATTERN_KEYS = frozenset({"layers_block_type", "layer_types", "hybrid_override_pattern", "num_hidden_layers",
                          "mtp_layers_block_type", "mtp_hybrid_override_pattern"})


def _err(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"HF config field {field!r}={value!r}: {why}")


def _parse_float(field: str, v: Any) -> float:
    """A float as HF's JSON writes it: a number, {"__float__": "Infinity"}, or the strings Infinity/NaN."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    if isinstance(v, str) and v in ("Infinity", "inf", "-Infinity", "-inf", "NaN", "nan"):
        return float(v.replace("Infinity", "inf"))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(field, v, "expected a number")
    return float(v)


def _typed(field: str, v: Any, kind: str) -> Any:
    if kind == _INT or (kind == _OPT_INT and v is not None):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(field, v, "expected an integer" + (" or null" if kind == _OPT_INT else ""))
        return v
    if kind == _FLOAT:
        return _parse_float(field, v)
    if kind == _BOOL:
        if not isinstance(v, bool):
            raise _err(field, v, "expected true or false")
        return v
    if kind == _STR:
        if not isinstance(v, str):
            raise _err(field, v, "expected a string")
        return v
    return v


def _pattern_from_types(field: str, types: Any) -> str:
    if not isinstance(types, (list, tuple)) or not types:
        raise _err(field, types, "expected a non-empty list of block types")
    out = []
    for i, t in enumerate(types):
        if t not in BLOCK_TYPE_TO_CHAR:
            raise _err(field, types, f"unknown block type {t!r} at index {i}; use one of "
                                     f"{sorted(CHAR_TO_BLOCK_TYPE.values())}")
        out.append(BLOCK_TYPE_TO_CHAR[t])
    return "".join(out)


def _check_pattern_string(field: str, pat: Any) -> str:
    if not isinstance(pat, str) or not pat:
        raise _err(field, pat, "expected a non-empty string over M, *, E, -")
    for i, c in enumerate(pat):
        if c not in CHAR_TO_BLOCK_TYPE:
            raise _err(field, pat, f"unknown layer character {c!r} at position {i}; use M, *, E or -")
    return pat


def config_from_hf(hf: dict[str, Any] | str | Path, *, dtype: str = "float32", strict: bool = True,
                   **overrides: Any) -> ModelConfig:
    """An HF NemotronH config (dict, config.json path, or checkpoint directory) -> ModelConfig.

    `dtype` sets both the compute and the parameter dtype ("float32" or "bfloat16"). `strict=False` turns
    the error for an unknown key into a warning. `overrides` are applied to the result (e.g. ssd_impl).
    """
    if not isinstance(hf, dict):
        p = Path(hf)
        if p.is_dir():
            p = p / "config.json"
        hf = json.loads(p.read_text())
    hf = dict(hf)
    mt = hf.get("model_type", "nemotron_h")
    if mt != "nemotron_h":
        raise _err("model_type", mt, "not a NemotronH config (expected 'nemotron_h')")

    # legacy keys win, as in NemotronHConfig.__post_init__
    for old, new in LEGACY_KEYS.items():
        if old in hf:
            hf[new] = hf.pop(old)

    for alias, key in ALIASES.items():
        if alias in hf:
            v = hf.pop(alias)
            if key in hf and _parse_float(alias, v) != _parse_float(key, hf[key]):
                raise _err(alias, v, f"disagrees with {key}={hf[key]!r} (both name the RMSNorm epsilon)")
            hf.setdefault(key, v)
    if hf.get("quantization_config") is not None:
        from nemotron_jax.convert.modelopt import parse_quant_config  # noqa: PLC0415

        if not isinstance(hf["quantization_config"], dict):
            raise _err("quantization_config", hf["quantization_config"], "expected an object")
        parse_quant_config(dict(hf["quantization_config"]), "config.json quantization_config")
    for key in sorted(FRAMEWORK_KEYS & set(hf)):
        log.debug("HF config key %r ignored: it serves other frameworks, not the forward pass", key)
    unknown = sorted(set(hf) - set(MAPPED) - set(REQUIRED_VALUES) - IGNORED_KEYS - PATTERN_KEYS - FRAMEWORK_KEYS)
    if unknown:
        msg = (f"HF config has unknown field(s) {unknown}: they may change the architecture and nemotron-jax "
               "does not know them; pass strict=False to ignore them")
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=2)

    for key, (want, why) in REQUIRED_VALUES.items():
        if key in hf and hf[key] != want and not (want is False and hf[key] is None):
            raise _err(key, hf[key], f"unsupported ({why}); only {json.dumps(want)} is supported")

    kw: dict[str, Any] = {}
    for key, (field, kind, default) in MAPPED.items():
        kw[field] = _typed(key, hf[key], kind) if key in hf else default

    # layer patterns
    types = hf.get("layers_block_type", hf.get("layer_types"))
    tkey = "layers_block_type" if "layers_block_type" in hf else "layer_types"
    if types is not None:
        pattern = _pattern_from_types(tkey, types)
    elif "hybrid_override_pattern" in hf:
        pattern = _check_pattern_string("hybrid_override_pattern", hf["hybrid_override_pattern"])
    else:
        pattern = "ME*-"  # HF default ["linear_attention","moe","full_attention","mlp"]
    if "num_hidden_layers" in hf and hf["num_hidden_layers"] is not None and hf["num_hidden_layers"] != len(pattern):
        raise _err("num_hidden_layers", hf["num_hidden_layers"],
                   f"disagrees with the layer pattern {pattern!r} ({len(pattern)} blocks)")
    mtp_types = hf.get("mtp_layers_block_type")
    if mtp_types is not None and list(mtp_types) != _HF_DEFAULT_MTP_TYPES:
        mtp_pattern = _pattern_from_types("mtp_layers_block_type", mtp_types)
    elif "mtp_hybrid_override_pattern" in hf:
        mtp_pattern = _check_pattern_string("mtp_hybrid_override_pattern", hf["mtp_hybrid_override_pattern"])
    else:
        mtp_pattern = "*E"

    # values we refuse although HF accepts them
    if kw["mlp_hidden_act"] != "relu2":
        raise _err("mlp_hidden_act", kw["mlp_hidden_act"], "only 'relu2' (squared ReLU) is implemented")
    if kw["mamba_hidden_act"] != "silu":
        raise _err("mamba_hidden_act", kw["mamba_hidden_act"], "only 'silu' is implemented")
    if kw["n_shared_experts"] != 1:
        raise _err("n_shared_experts", kw["n_shared_experts"],
                   "HF NemotronH always builds exactly one shared expert; only 1 is supported")
    if kw["num_nextn_predict_layers"] not in (0, 1):
        raise _err("num_nextn_predict_layers", kw["num_nextn_predict_layers"],
                   "only 0 or 1 (one shared-weight MTP block) is supported")
    if kw["time_step_min"] <= 0:
        raise _err("time_step_min", kw["time_step_min"], "must be positive (it is HF's dt clamp)")
    uses_moe = "E" in pattern or ("E" in mtp_pattern and kw["num_nextn_predict_layers"] > 0)
    if uses_moe:
        e, g, tg, k = kw["n_routed_experts"], kw["n_group"], kw["topk_group"], kw["num_experts_per_tok"]
        if g < 1 or e % g:
            raise _err("n_group", g, f"must divide n_routed_experts={e}")
        if e // g < 2:
            raise _err("n_group", g, f"HF's group score needs at least 2 experts per group (n_routed_experts={e})")
        if not 1 <= tg <= g:
            raise _err("topk_group", tg, f"must lie in [1, n_group={g}]")
        if k > tg * (e // g):
            raise _err("num_experts_per_tok", k,
                       f"exceeds the {tg * (e // g)} experts selectable under group routing "
                       f"(topk_group={tg} of n_group={g} groups of {e // g})")
    if "time_step_limit" in hf:
        lim = hf["time_step_limit"]
        if not isinstance(lim, (list, tuple)) or len(lim) != 2:
            raise _err("time_step_limit", lim, "expected a pair [low, high]")
        [_parse_float("time_step_limit", x) for x in lim]  # validated, then ignored like HF does

    kw.update(hybrid_override_pattern=pattern, mtp_hybrid_override_pattern=mtp_pattern,
              attention_bias=False, mlp_bias=False, mamba_proj_bias=False,
              time_step_limit=(kw["time_step_min"], math.inf), dtype=dtype, param_dtype=dtype)
    kw.update(overrides)
    return ModelConfig(**kw)


def _json_float(x: float) -> Any:
    return {"__float__": "Infinity"} if x == math.inf else float(x)


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str | None = None) -> dict[str, Any]:
    """ModelConfig -> an HF NemotronH config dict (modern key names) that transformers 5.24 loads.

    HF clamps dt at `time_step_min` from below and knows no other clamp, so `time_step_min` is written as
    our clamp's lower bound when that is positive. Refused: configs HF cannot represent (a tied head,
    biases, no shared expert, a non-relu2 activation). A clamp HF cannot reproduce (lower bound 0, or a
    finite upper bound) only warns: HF's prefill will then differ wherever dt crosses the bound.
    """
    def refuse(field: str, why: str) -> ConfigError:
        return ConfigError(f"ModelConfig.{field}={getattr(cfg, field)!r} cannot be exported to HF NemotronH: {why}")

    for f in ("attention_bias", "mlp_bias", "mamba_proj_bias"):
        if getattr(cfg, f):
            raise refuse(f, "HF has no such bias (or never reads the field)")
    if cfg.mlp_hidden_act != "relu2":
        raise refuse("mlp_hidden_act", "only relu2 is implemented here")
    if "E" in cfg.hybrid_override_pattern and (cfg.n_shared_experts != 1
                                               or cfg.moe_shared_expert_intermediate_size < 1):
        raise refuse("n_shared_experts", "HF always has exactly one shared expert of width "
                                         "moe_shared_expert_intermediate_size >= 1")
    lo, hi = cfg.time_step_limit
    t_min = lo if lo > 0 else cfg.time_step_min
    if lo <= 0 or math.isfinite(hi):
        warnings.warn(f"ModelConfig.time_step_limit={cfg.time_step_limit}: HF clamps dt to [time_step_min, inf) "
                      f"with time_step_min={t_min}; its logits differ where dt leaves the model's range",
                      stacklevel=2)
    if torch_dtype is None:
        torch_dtype = cfg.param_dtype
    hf: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
                          "dtype": torch_dtype}
    for key, (field, _kind, _default) in MAPPED.items():
        v = getattr(cfg, field)
        hf[key] = list(v) if isinstance(v, tuple) else v
    hf["time_step_min"] = t_min
    hf["layers_block_type"] = [CHAR_TO_BLOCK_TYPE[c] for c in cfg.hybrid_override_pattern]
    hf["mtp_layers_block_type"] = [CHAR_TO_BLOCK_TYPE[c] for c in cfg.mtp_hybrid_override_pattern]
    hf["time_step_limit"] = [0.0, _json_float(math.inf)]
    hf.update(attention_bias=False, use_bias=False, mlp_bias=False, mamba_proj_bias=False,
              tie_word_embeddings=False, residual_in_fp32=False, sliding_window=None)
    return hf
