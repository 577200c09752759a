"""HF config mapping (legacy forms) and malformed checkpoints: every failure names the tensor or field."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from nemotron_jax import ConfigError
from nemotron_jax.convert import CheckpointError, config_from_hf, from_hf
from nemotron_jax.convert.safetensors_io import save
from tests.helpers.checkpoints import edit_json, edit_tensors, read_tensors

REF = Path(__file__).resolve().parents[1] / "fixtures" / "hf_reference"


def copy_case(case: str, dst: Path) -> Path:
    d = dst / case
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(REF / case / f, d / f)
    return d


def edit_config(d: Path, **changes) -> None:
    """Set config.json fields (`...` removes one)."""
    def edit(cfg):
        for k, v in changes.items():
            cfg.pop(k) if v is ... else cfg.__setitem__(k, v)
    edit_json(d, "config.json", edit)


def hf_config(case: str) -> dict:
    return json.loads((REF / case / "config.json").read_text())


# ----------------------------------------------------------------------------- config mapping
def test_legacy_config_equals_modern_config():
    legacy = config_from_hf(hf_config("dt_clamp_legacy"))
    modern = dict(hf_config("dt_clamp_legacy"))
    for old, new in [("mamba_chunk_size", "chunk_size"), ("mamba_conv_bias", "use_conv_bias"),
                     ("mamba_d_conv", "conv_kernel"), ("mamba_dt_init_floor", "time_step_floor"),
                     ("mamba_dt_limit", "time_step_limit"), ("mamba_dt_max", "time_step_max"),
                     ("mamba_dt_min", "time_step_min"), ("mamba_expand", "expand"), ("mamba_n_groups", "n_groups")]:
        modern[new] = modern.pop(old)
    modern["layers_block_type"] = ["mamba", "moe", "linear_attention", "attention", "mlp"]  # legacy names too
    modern["mtp_layers_block_type"] = ["full_attention", "moe"]
    del modern["hybrid_override_pattern"], modern["mtp_hybrid_override_pattern"], modern["num_hidden_layers"]
    modern["time_step_limit"] = [0.0, "Infinity"]
    assert config_from_hf(modern) == legacy
    assert legacy.hybrid_override_pattern == "MEM*-" and legacy.n_groups == 2 and legacy.chunk_size == 8
    assert legacy.time_step_limit == (0.05, math.inf)


def test_pattern_precedence_and_legacy_key_wins():
    c = hf_config("moe")
    c2 = dict(c, hybrid_override_pattern="MMMMMM")  # the list wins
    assert config_from_hf(c2).hybrid_override_pattern == "ME*EME"
    c3 = dict(c, mamba_n_groups=4)  # the legacy key wins, as in HF
    assert config_from_hf(c3).n_groups == 4
    # mtp_hybrid_override_pattern is used while mtp_layers_block_type is the HF default
    c4 = dict(c, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E-")
    assert config_from_hf(c4).mtp_hybrid_override_pattern == "*E-"
    c5 = dict(c4, mtp_layers_block_type=["full_attention", "mlp"])
    assert config_from_hf(c5).mtp_hybrid_override_pattern == "*-"
    # keys with no effect are ignored
    c6 = dict(c, rope_theta=10000.0, residual_in_fp32=True, expand=7, moe_shared_expert_overlap=False)
    assert config_from_hf(c6) == config_from_hf(c)


@pytest.mark.parametrize("field,value,match", [
    ("foo_bar", 1, "foo_bar"),
    ("mlp_hidden_act", "gelu", "mlp_hidden_act"),
    ("mamba_hidden_act", "relu", "mamba_hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("mlp_bias", True, "mlp_bias"),
    ("use_bias", True, "use_bias"),
    ("mamba_proj_bias", True, "mamba_proj_bias"),
    ("sliding_window", 1024, "sliding_window"),
    ("n_shared_experts", 2, "n_shared_experts"),
    ("num_nextn_predict_layers", 2, "num_nextn_predict_layers"),
    ("hidden_size", "48", "hidden_size"),
    ("hidden_size", 48.0, "hidden_size"),
    ("routed_scaling_factor", "big", "routed_scaling_factor"),
    ("layers_block_type", ["linear_attention", "ssm"], "layers_block_type"),
    ("num_hidden_layers", 7, "num_hidden_layers"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),  # group routing selects only 2 groups of 4 = 8
    ("n_group", 16, "n_group"),  # 1 expert per group: HF's top-2 group score cannot run
    ("model_type", "mamba2", "model_type"),
    ("time_step_limit", [0.0], "time_step_limit"),
])
def test_bad_config_field_is_named(field, value, match):
    c = dict(hf_config("group_routing"), **{field: value})
    if field == "n_group":
        c["topk_group"] = 16
    with pytest.raises(ConfigError, match=match):
        config_from_hf(c)


def test_unknown_field_can_be_waived(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    edit_config(d, foo_bar=3)
    with pytest.raises(ConfigError, match="foo_bar"):
        from_hf(d)
    with pytest.warns(UserWarning, match="foo_bar"):
        from_hf(d, strict=False)


def test_bad_pattern_character(tmp_path):
    c = dict(hf_config("dt_clamp_legacy"), hybrid_override_pattern="MEMX-", num_hidden_layers=5)
    with pytest.raises(ConfigError, match="hybrid_override_pattern.*'X'"):
        config_from_hf(c)


# ----------------------------------------------------------------------------- checkpoint contents
def test_missing_tensor(tmp_path):
    d = copy_case("moe", tmp_path)
    edit_tensors(d, lambda t: t.pop("backbone.layers.3.mixer.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*backbone\.layers\.3\.mixer\.experts\.5\.up_proj\.weight"):
        from_hf(d)


def test_unexpected_tensor(tmp_path):
    d = copy_case("moe", tmp_path)
    e = "backbone.layers.1.mixer.experts.{}.up_proj.weight"
    edit_tensors(d, lambda t: t.update({e.format(8): t[e.format(0)]}))
    with pytest.raises(CheckpointError, match=r"unexpected.*experts\.8\.up_proj"):
        from_hf(d)


def test_wrong_shape(tmp_path):
    d = copy_case("latent_moe", tmp_path)
    w = "backbone.layers.0.mixer.conv1d.weight"
    edit_tensors(d, lambda t: t.update({w: t[w][..., :3].copy()}))
    msg = r"backbone\.layers\.0\.mixer\.conv1d\.weight.*shape \[96, 1, 3\]; the config needs \[96, 1, 4\]"
    with pytest.raises(CheckpointError, match=msg):
        from_hf(d)


def test_config_disagrees_with_tensors(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    edit_config(d, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.3\.mixer\.(up|down)_proj\.weight.*shape"):
        from_hf(d)


def test_wrong_dtype(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    a = "backbone.layers.2.mixer.A_log"
    edit_tensors(d, lambda t: t.update({a: t[a].astype(np.int32)}))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.2\.mixer\.A_log.*dtype I32"):
        from_hf(d)


def test_sharded_index_problems(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    wmap, names = _sharded(d)
    wmap[names[0]] = "b.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(CheckpointError, match=repr(names[0])):
        from_hf(d)
    wmap[names[0]] = "a.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    assert from_hf(d).cfg.hybrid_override_pattern == "M*M-M*"
    wmap[names[1]] = "c.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(CheckpointError, match="c.safetensors"):
        from_hf(d)


def test_no_checkpoint(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(REF / "moe" / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="safetensors"):
        from_hf(d)


# ----------------------------------------------------------------------------- loading safety (issue 16.6)
def _sharded(d: Path) -> tuple[dict, list[str]]:
    t = read_tensors(d)
    names = sorted(t)
    (d / "model.safetensors").unlink()
    save({k: t[k] for k in names[:10]}, d / "a.safetensors")
    save({k: t[k] for k in names[10:]}, d / "b.safetensors")
    return {k: ("a.safetensors" if i < 10 else "b.safetensors") for i, k in enumerate(names)}, names


@pytest.mark.parametrize("bad", ["../b.safetensors", "/etc/passwd", "sub/../../b.safetensors", "~/b.safetensors"])
def test_index_naming_files_outside_the_folder_is_refused(tmp_path, bad):
    d = copy_case("hybrid_dense", tmp_path)
    wmap, names = _sharded(d)
    shutil.copy(d / "b.safetensors", tmp_path / "b.safetensors")  # a real file is there: still refused
    wmap = {k: (bad if v == "b.safetensors" else v) for k, v in wmap.items()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        from_hf(d)


def test_index_symlink_out_of_the_folder_is_refused(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    wmap, _ = _sharded(d)
    (d / "b.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (d / "b.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint folder"):
        from_hf(d)


@pytest.mark.parametrize("keep", [0, 5, 100, -1000, -1])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    d = copy_case("hybrid_dense", tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        from_hf(d)


def test_truncated_shard_names_the_shard(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    wmap, _ = _sharded(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    raw = (d / "b.safetensors").read_bytes()
    (d / "b.safetensors").write_bytes(raw[:-7])
    with pytest.raises(CheckpointError, match=r"b\.safetensors: truncated safetensors file: tensor '.*'"):
        from_hf(d)


def test_corrupt_index_json(tmp_path):
    d = copy_case("hybrid_dense", tmp_path)
    _sharded(d)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        from_hf(d)


def test_no_pickle_on_any_load_path():
    """Loading goes through orbax, safetensors and JSON only: no pickle, torch.load or np.load(allow_pickle)."""
    import re  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]
    pat = re.compile(r"\bimport pickle\b|\bfrom pickle\b|cPickle|\bdill\b|joblib|torch\.load\(|allow_pickle\s*=\s*True"
                     r"|pickle\.loads?\(")
    hits = []
    for sub in ("nemotron_jax", "scripts", "benchmarks", "experiments"):
        for f in (root / sub).rglob("*.py"):
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if pat.search(line):
                    hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, hits
