import json
import subprocess
import sys

import pytest

from nemotron_jax.config import ModelConfig
from nemotron_jax.info import count_params


def _rel(a, b):
    return abs(a - b) / b


@pytest.fixture(scope="module")
def nano():
    return count_params(ModelConfig.nano_30b_a3b())


@pytest.fixture(scope="module")
def sup():
    return count_params(ModelConfig.super_120b_a12b())


def test_nano_counts_match_published(nano):
    assert _rel(nano["total_params"], 31.6e9) < 0.005, nano["total_params"]
    assert _rel(nano["active_params"], 3.6e9) < 0.02, nano["active_params"]
    assert nano["layer_counts"] == {"mamba": 23, "moe": 23, "attention": 6}
    assert nano["mtp_params"] == 0


def test_super_counts_match_published(sup):
    assert _rel(sup["total_params"], 120.6e9) < 0.005, sup["total_params"]
    assert _rel(sup["active_params"], 12.7e9) < 0.02, sup["active_params"]
    # spec section 1: the shared-weight MTP block is ~2.94B and not part of the 120.6B
    assert _rel(sup["mtp_params"], 2.94e9) < 0.01, sup["mtp_params"]


def test_layer_table_is_consistent(nano):
    d, v = 2688, 131072
    assert nano["embedding_params"] == 2 * v * d
    assert sum(r["params"] for r in nano["layers"]) + nano["embedding_params"] + d == nano["total_params"]
    mamba = next(r for r in nano["layers"] if r["type"] == "mamba")
    # spec: a Nano Mamba layer is ~38.7M (in_proj 2688x10304 + out_proj 4096x2688 + conv, norms, per-head vectors)
    assert mamba["params"] == 2688 * 10304 + 4096 * 2688 + 6144 * 4 + 6144 + 3 * 64 + 4096 + 2688
    moe = next(r for r in nano["layers"] if r["type"] == "moe")
    routed = 128 * 2 * 1856 * 2688
    assert moe["params"] - moe["active"] == routed - round(routed * 6 / 128)


def test_ultra_counts_without_allocating():
    info = count_params(ModelConfig.ultra_550b_a55b())
    assert 500e9 < info["total_params"] < 600e9 and 45e9 < info["active_params"] < 65e9


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "nemotron_jax.info", "--preset", "tiny", "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["pattern"] == ModelConfig.tiny().hybrid_override_pattern
    assert info["total_params"] == count_params(ModelConfig.tiny())["total_params"]


def test_weight_bytes_nvfp4_nano():
    from nemotron_jax.info import weight_bytes

    b = weight_bytes(ModelConfig.nano_30b_a3b(), "nvfp4")
    assert abs(b["bits_per_quantized_weight"] - 4.5) < 1e-4  # 4-bit codes + one E4M3 scale per 16 (+4 bytes per tensor)
    # every HF tensor; count_params counts nnx.Param only (not the router correction bias)
    assert 0 <= b["total_params"] - count_params(ModelConfig.nano_30b_a3b())["total_params"] <= 23 * 128
    # released policy: attention, the 6 Mamba layers before it and the LM head stay BF16
    assert b["bf16_params"] > 131072 * 2688 * 2
    assert 17.5 * 2**30 < b["total_bytes"] < 18.5 * 2**30  # public NVFP4 Nano checkpoint: about 19 GB
    assert b["all_bf16_bytes"] / b["total_bytes"] > 3.2


def test_weight_bytes_cli_small(capsys):
    from nemotron_jax.info import main, weight_bytes

    main(["--weights", "nvfp4", "--preset", "small"])
    out = capsys.readouterr().out
    assert "small:" in out and "4.500 bits/weight" in out
    fp8 = weight_bytes(ModelConfig.small(), "fp8")
    bf = weight_bytes(ModelConfig.small(), "bf16")
    assert bf["total_bytes"] == bf["all_bf16_bytes"] > fp8["total_bytes"]
