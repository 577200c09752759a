"""Precision policy table and quantization diagnostics."""

import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.config import ModelConfig
from nemotron_jax.quant import diagnostics, policy


def test_super_preset_table():
    cfg = ModelConfig.super_120b_a12b(precision="nvfp4")
    assert policy.num_bf16_last_layers(cfg) == 14  # ceil(0.15 * 88)
    rows = policy.precision_table(cfg)
    layers = [r for r in rows if isinstance(r["layer"], int)]
    assert len(layers) == 88
    assert all(policy.layer_summary(r) == "bf16" for r in layers[74:])
    assert all(policy.layer_summary(r) != "bf16" for r in layers[:74] if r["type"] != "attention")
    summary = [policy.layer_summary(r) for r in layers]
    # first 74 layers: 37 Mamba (in_proj nvfp4 + out_proj mxfp8 -> mixed), 31 MoE (mixed: router/latent bf16),
    # 6 attention (bf16); last 14 all bf16
    pat = cfg.hybrid_override_pattern[:74]
    assert summary.count("bf16") == 14 + pat.count("*")
    assert summary.count("mixed") == pat.count("M") + pat.count("E")
    for r in layers[:74]:
        f = r["formats"]
        if r["type"] == "mamba":
            assert f == {"mamba.in_proj": "nvfp4", "mamba.out_proj": "mxfp8"}
        if r["type"] == "moe":
            assert f == {"moe.router": "bf16", "moe.experts": "nvfp4", "moe.shared": "nvfp4", "moe.latent": "bf16"}
        if r["type"] == "attention":
            assert set(f.values()) == {"bf16"}
    mtp = [r for r in rows if r["layer"] == "mtp"]
    assert [r["type"] for r in mtp] == ["attention", "moe"] and all(policy.layer_summary(r) == "bf16" for r in mtp)
    assert policy.linear_format(cfg, None, "embed") == policy.linear_format(cfg, None, "lm_head") == "bf16"
    assert policy.linear_format(cfg, 0, "mtp") == "bf16"
    text = policy.format_precision_table(cfg)
    assert "last 14 of 88" in text and "mamba.out_proj=mxfp8" in text


def test_switches_and_bf16_policy():
    cfg = ModelConfig.super_120b_a12b()
    assert {v for r in policy.precision_table(cfg) for v in r["formats"].values()} == {"bf16"}
    cfg = ModelConfig.super_120b_a12b(precision="nvfp4", mamba_out_proj_mxfp8=False)
    assert policy.linear_format(cfg, 0, "mamba.out_proj") == "nvfp4"
    tiny = ModelConfig.tiny(precision="nvfp4", hybrid_override_pattern="M-" * 10)  # 20 layers
    assert policy.num_bf16_last_layers(tiny) == 3  # 0.15*20 = 3.0000000000000004 in binary: still 3
    assert policy.linear_format(tiny, 16, "mlp.up") == "nvfp4" and policy.linear_format(tiny, 17, "mlp.down") == "bf16"
    with pytest.raises(ValueError, match="unknown linear role"):
        policy.linear_format(tiny, 0, "mlp.gate")


def test_diagnostics_ftz_and_rel_err():
    """Block [1000, 1, 1, ...]: e_b = 6/1000 scale-ish, so the 1s quantize to 0 (15 of 16 non-zeros flushed)."""
    x = np.ones((1, 32), np.float32)
    x[0, 0] = 1000.0
    x[0, 16:] = np.linspace(0.5, 1.0, 16)
    s = diagnostics.quant_stats(jnp.asarray(x))
    assert s["ftz"] == pytest.approx(15 / 32)
    from nemotron_jax.quant import nvfp4
    xq = np.asarray(nvfp4.qdq(jnp.asarray(x)))
    assert s["rel_err"] == pytest.approx(np.linalg.norm(xq - x) / np.linalg.norm(x), rel=1e-5)
    tree = {"w": jnp.asarray(x), "skip": jnp.ones((3, 5)), "nested": {"v": jnp.zeros((16, 32))}}
    st = diagnostics.tree_quant_stats(tree)
    assert set(st) == {"w", "nested/v"} and st["nested/v"] == {"ftz": 0.0, "rel_err": 0.0}
    assert "nested/v" in diagnostics.format_stats(st)
    assert diagnostics.quant_stats(jnp.asarray(x), fmt="mxfp8")["ftz"] == 0.0  # MXFP8 keeps the 1s
