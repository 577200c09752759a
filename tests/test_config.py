import math

import pytest

from nemotron_jax.config import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_and_validate(name):
    cfg = ModelConfig.preset(name)
    assert cfg.num_hidden_layers == len(cfg.hybrid_override_pattern)


def test_published_shapes():
    nano, sup, ultra = ModelConfig.nano_30b_a3b(), ModelConfig.super_120b_a12b(), ModelConfig.ultra_550b_a55b()
    assert (nano.num_hidden_layers, sup.num_hidden_layers, ultra.num_hidden_layers) == (52, 88, 108)
    for cfg, counts in ((nano, (23, 23, 6)), (sup, (40, 40, 8)), (ultra, (48, 48, 12))):
        p = cfg.hybrid_override_pattern
        assert (p.count("M"), p.count("E"), p.count("*")) == counts
    assert [i for i, c in enumerate(nano.hybrid_override_pattern) if c == "*"] == [5, 12, 19, 26, 33, 42]
    assert [i for i, c in enumerate(sup.hybrid_override_pattern) if c == "*"] == [7, 16, 25, 36, 47, 58, 69, 78]
    assert nano.mamba_in_proj_dim == 10304 and sup.mamba_in_proj_dim == 18560 and ultra.mamba_in_proj_dim == 35072
    assert nano.mamba_conv_dim == 6144 and sup.mamba_conv_dim == 10240
    assert not nano.mtp_enabled and sup.mtp_enabled and ultra.mtp_enabled
    assert sup.moe_expert_input_size == 1024 and nano.moe_expert_input_size == 2688


def test_frozen_and_replace():
    cfg = ModelConfig.tiny()
    with pytest.raises(Exception):
        cfg.hidden_size = 3  # type: ignore[misc]
    assert cfg.replace(hidden_size=32).hidden_size == 32


@pytest.mark.parametrize("overrides, field, words", [
    (dict(hybrid_override_pattern="M*X"), "hybrid_override_pattern", "unknown layer character 'X' at position 2"),
    (dict(hybrid_override_pattern=""), "hybrid_override_pattern", "empty"),
    (dict(num_key_value_heads=3), "num_key_value_heads", "not divisible"),
    (dict(n_groups=3), "n_groups", "not divisible"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok", "exceeds n_routed_experts=8"),
    (dict(n_group=3), "n_group", "not divisible"),
    (dict(n_group=2, topk_group=3), "topk_group", "exceeds n_group"),
    (dict(hidden_size=0), "hidden_size", "positive integer"),
    (dict(chunk_size=-4), "chunk_size", "positive integer"),
    (dict(dtype="float16"), "dtype", "unsupported"),
    (dict(ssd_impl="fast"), "ssd_impl", "unknown SSD"),
    (dict(precision="fp4"), "precision", "unknown precision"),
    (dict(time_step_limit=(1.0, 0.5)), "time_step_limit", "low < high"),
    (dict(moe_latent_size=0), "moe_latent_size", "positive int or None"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor", "positive or None"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers", "only one"),
    (dict(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*Q"), "mtp_hybrid_override_pattern", "'Q'"),
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act", "squared ReLU"),
    (dict(nvfp4_bf16_last_fraction=1.5), "nvfp4_bf16_last_fraction", "[0, 1]"),
    (dict(n_shared_experts=2), "n_shared_experts", "only one shared expert"),
])
def test_validation_names_field_and_fix(overrides, field, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig.tiny(**overrides)
    msg = str(e.value)
    assert msg.startswith(f"ModelConfig.{field}="), msg
    assert words in msg
    assert ";" in msg  # the fix follows the reason


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_time_step_limit_list_is_normalised():
    cfg = ModelConfig.tiny(time_step_limit=[1e-3, math.inf])
    assert cfg.time_step_limit == (1e-3, math.inf)
