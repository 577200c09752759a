"""The published config.json files load with default arguments and map to the matching presets."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest

from nemotron_jax import ConfigError
from nemotron_jax.config import ModelConfig
from nemotron_jax.convert import config_from_hf

DIR = Path(__file__).resolve().parents[1] / "fixtures" / "released_configs"
RELEASED = {"NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.config.json": "nano_30b_a3b"}
# Fields where the published config and the preset differ by design:
# dtype/param_dtype: from_hf's `dtype` argument; time_step_limit: HF's dt clamp (time_step_min, inf) for
# HF parity (docs/hf_numerics.md); initializer_range: init only (the published Nano config says 0.02,
# the preset follows the technical report's 0.0173); training-only fields HF configs do not carry.
NOT_IN_HF = {"dtype", "param_dtype", "time_step_limit", "initializer_range", "ssd_impl", "sharding_rules",
             "precision", "moe_router_bias_update_rate", "moe_aux_loss_coeff", "moe_capacity_factor",
             "mtp_depths", "mtp_loss_scaling_factor", "nvfp4_bf16_last_fraction", "nvfp4_bf16_last_layers",
             "nvfp4_rht", "nvfp4_stochastic_rounding", "nvfp4_weight_2d", "mamba_out_proj_mxfp8", "nvfp4_impl"}


@pytest.mark.parametrize("fname,preset", sorted(RELEASED.items()))
def test_released_config_maps_to_preset(fname, preset, caplog):
    with caplog.at_level(logging.DEBUG):
        cfg = config_from_hf(DIR / fname)  # default arguments: strict, no overrides
    want = ModelConfig.preset(preset)
    compared = 0
    for f in dataclasses.fields(ModelConfig):
        if f.name in NOT_IN_HF:
            continue
        assert getattr(cfg, f.name) == getattr(want, f.name), f.name
        compared += 1
    assert compared >= 35
    hf = json.loads((DIR / fname).read_text())
    assert cfg.time_step_limit == (hf["time_step_min"], math.inf)
    assert cfg.initializer_range == hf["initializer_range"]
    assert cfg.num_hidden_layers == hf["num_hidden_layers"] == 52


def test_nano_norm_eps_alias():
    hf = json.loads((DIR / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.config.json").read_text())
    assert hf["norm_eps"] == hf["layer_norm_epsilon"]  # the published file carries both
    only_alias = {k: v for k, v in hf.items() if k != "layer_norm_epsilon"} | {"norm_eps": 1e-6}
    assert config_from_hf(only_alias).layer_norm_epsilon == 1e-6
    with pytest.raises(ConfigError, match="norm_eps.*disagrees with layer_norm_epsilon"):
        config_from_hf(dict(hf, norm_eps=1e-6))


def test_framework_keys_ignored_math_keys_refused(caplog):
    hf = json.loads((DIR / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.config.json").read_text())
    with caplog.at_level(logging.DEBUG, logger="nemotron_jax.convert.hf_config"):
        assert config_from_hf(dict(hf, keep_mtp_spec_in_bf16=True)) == config_from_hf(hf)
    assert "keep_mtp_spec_in_bf16" in caplog.text
    for key, value in [("rope_scaling", {"type": "yarn"}), ("sliding_window", 4096), ("attention_bias", True),
                       ("brand_new_key", 1)]:
        with pytest.raises(ConfigError, match=key):
            config_from_hf(dict(hf, **{key: value}))


def test_quantization_sections_understood():
    hf = json.loads((DIR / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.config.json").read_text())
    modelopt = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"
    for algo in ("nvfp4", "fp8"):  # the sections ModelOpt writes into config.json
        qc = json.loads((modelopt / f"model_{algo}" / "config.json").read_text())["quantization_config"]
        assert config_from_hf(dict(hf, quantization_config=qc)) == config_from_hf(hf)
    with pytest.raises(ConfigError, match="unknown quant_algo 'W4A8_AWQ'"):
        config_from_hf(dict(hf, quantization_config={"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}))
    with pytest.raises(ConfigError, match="quant_method 'bitsandbytes'"):
        config_from_hf(dict(hf, quantization_config={"quant_method": "bitsandbytes"}))
