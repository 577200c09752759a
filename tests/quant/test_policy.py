"""Precision policy table and quantization diagnostics."""

import jax.numpy as jnp
import ml_dtypes
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


def _nvfp4_fake_quant(x):
    """NVFP4 quantize-dequantize along the last axis, written from the format definition with numpy + ml_dtypes
    (no nemotron_jax code): the tensor scale S = amax / (6 * 448) maps the largest magnitude onto the largest
    E2M1 x E4M3 product; each 16-block gets the E4M3 scale s_b = rne_e4m3(amax_b / (6 S)); each value becomes
    s_b * S times the E2M1 value {0, 0.5, 1, 1.5, 2, 3, 4, 6} nearest (ties to even) to x / (s_b * S), clipped to +-6.
    Computed in float64; every block here is non-zero."""
    x = np.asarray(x, np.float64)
    tensor_scale = np.abs(x).max() / (6 * 448)
    xb = x.reshape(*x.shape[:-1], -1, 16)
    s_b = (np.abs(xb).max(-1, keepdims=True) / (6 * tensor_scale)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    scale = s_b * tensor_scale
    codes = np.clip(xb / scale, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    return (codes * scale).reshape(x.shape)


def _mxfp8_fake_quant(x):
    """OCP MXFP8 along the last axis, from the definition: 32-blocks, power-of-two scale 2^(floor(log2 amax_b) - 8)
    (8 = E4M3's largest exponent), elements rne_e4m3(x / scale) saturated at +-448 (a block max in
    [448, 512) * scale clips). Blocks here are non-zero and normal-ranged."""
    xb = np.asarray(x, np.float64).reshape(*np.shape(x)[:-1], -1, 32)
    scale = 2.0 ** (np.floor(np.log2(np.abs(xb).max(-1, keepdims=True))) - 8)
    codes = np.clip(xb / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (codes * scale).reshape(np.shape(x))


def _rel_err(xq, x):
    return np.linalg.norm(xq - x) / np.linalg.norm(x)


def test_diagnostics_ftz_and_rel_err():
    """Row = block 0 [1000, 1 x 15] + block 1 linspace(0.5, 1, 16). Block 0's scale maps 1000 to 6, so each 1
    becomes 0.006 before rounding -> 0 (15 flushed); block 1 (scale maps 1 to ~6.1) keeps all 16: ftz = 15/32.
    rel_err is checked against the independent numpy fake-quant above."""
    x = np.ones((1, 32), np.float32)
    x[0, 0] = 1000.0
    x[0, 16:] = np.linspace(0.5, 1.0, 16)
    xq = _nvfp4_fake_quant(x)
    assert np.count_nonzero(xq[0, :16]) == 1 and np.count_nonzero(xq[0, 16:]) == 16  # the oracle agrees: 15 flushed
    s = diagnostics.quant_stats(jnp.asarray(x))
    assert s["ftz"] == 15 / 32
    # fp32 sums of 32 squares (1000^2 dominates) in the library vs float64 here: measured 5.7e-8 relative (NVFP4)
    # and 1.7e-7 (MXFP8, below); 1e-6 is 6x the larger
    assert s["rel_err"] == pytest.approx(_rel_err(xq, x), rel=1e-6)
    tree = {"w": jnp.asarray(x), "skip": jnp.ones((3, 5)), "nested": {"v": jnp.zeros((16, 32))}}
    st = diagnostics.tree_quant_stats(tree)
    assert set(st) == {"w", "nested/v"} and st["nested/v"] == {"ftz": 0.0, "rel_err": 0.0}
    assert st["w"] == s
    assert "nested/v" in diagnostics.format_stats(st)
    mx = diagnostics.quant_stats(jnp.asarray(x), fmt="mxfp8")
    # MXFP8 keeps the 1s: one scale 2^(floor(log2 1000) - 8) = 2 for the 32, and 1/2 is an exact E4M3 value
    # (1000/2 = 500 saturates at 448, which dominates rel_err)
    assert mx["ftz"] == 0.0
    assert mx["rel_err"] == pytest.approx(_rel_err(_mxfp8_fake_quant(x), x), rel=1e-6)
