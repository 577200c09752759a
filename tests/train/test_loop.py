"""End-to-end training runs: CLI outputs, kill-and-resume bit for bit (also a kill inside a checkpoint save),
corrupt checkpoint fallback, meshes."""

import pathlib
import re

import jax
import numpy as np
import pytest

from nemotron_jax.config import ConfigError
from nemotron_jax.train.checkpoint import CheckpointMismatchError
from nemotron_jax.train.loop import check_config, train
from tests.helpers.runs import cli as _cli
from tests.helpers.runs import logged_losses as _losses
from tests.helpers.runs import small_exp

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 8-step CLI run (checkpoints at 3, 6, 8): the reference of the kill tests."""
    full = tmp_path_factory.mktemp("full")
    return full, _cli(full)


def test_cli_end_to_end_and_kill_resume_bit_exact(tmp_path, full_run):
    full, out = full_run
    for name in ("metrics.csv", "loss.png", "sample.txt", "summary.json", "config.json"):
        assert (full / name).exists(), name
    assert sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 8]
    assert "unigram baseline" in out.stdout and "sample" in out.stdout
    # the comparison with the baseline says which way it goes (it said "(-0.54 better)" for a worse model)
    assert re.search(r"validation loss [\d.]+ nats/token, [\d.]+ (better|worse) than the unigram baseline", out.stdout)
    assert (full / "loss.png").stat().st_size > 5000

    killed = tmp_path / "killed"
    r = _cli(killed, "--config.debug_kill_after_step=7", check=False)
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL: no clean shutdown, last checkpoint is step 6
    r = _cli(killed)
    assert "resumed from step 6" in r.stdout
    a, b = _losses(full), _losses(killed)
    assert [s for s, _ in a] == list(range(1, 9)) and a == b  # identical strings: bit for bit


def test_kill_inside_checkpoint_save_loses_only_that_save(tmp_path, full_run):
    """SIGKILL inside the save of step 6, after orbax wrote every item to its temporary directory and before it
    committed (renamed) it: step 6 is lost, step 3 is intact; the rerun removes the leftover, resumes from step 3
    and continues bit for bit like the uninterrupted run."""
    full, _ = full_run
    run = tmp_path / "killed_in_save"
    r = _cli(run, "--config.debug_kill_in_save_at_step=6", check=False)
    assert r.returncode == -9, r.stderr[-2000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [n for n in names if n.isdigit()] == ["3"] and any(n.startswith("6.") and "tmp" in n for n in names), names
    r = _cli(run)
    assert "resumed from step 3" in r.stdout, r.stdout[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6", "8"]  # leftover removed
    a, b = _losses(full), _losses(run)
    assert [s for s, _ in a] == list(range(1, 9)) and a == b


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    exp = small_exp(steps=6)
    train(exp, tmp_path, progress=False)
    latest = tmp_path / "checkpoints" / "6"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in str(f):
            f.write_bytes(b"garbage")
    exp.steps = 7
    exp.allow_schedule_change = True  # a longer run is a schedule change: allowed explicitly (tests/train/test_faults.py)
    summary = train(exp, tmp_path, progress=False)
    assert summary["steps"] == 7
    steps = [s for s, _ in _losses(tmp_path)]
    assert steps == list(range(1, 8))  # resumed from step 3, rewrote 4..7
    assert any((tmp_path / "checkpoints.corrupt").iterdir())  # the bad step is kept aside, not deleted
    # a changed model cannot restore any checkpoint: that must stop the run, not restart it from step 0
    exp.model.overrides.hidden_size = 96
    with pytest.raises(CheckpointMismatchError, match="hidden_size"):
        train(exp, tmp_path, progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 7]


# Custom rules: the tensor axis shards nothing but the routed experts' intermediate, and tokens split over
# fsdp x expert only. The expert-parallel op must run under these, not the defaults, or its shard_map layout
# would disagree with the expert weights' placement.
CUSTOM_RULES = (("batch", ("fsdp", "expert")), ("seq", None), ("vocab", None), ("embed", "fsdp"),
                ("q_heads", None), ("kv_heads", None), ("mlp", None), ("mamba_in", None), ("mamba_inner", None),
                ("mamba_conv", None), ("mamba_heads", None), ("conv_kernel", None), ("expert", "expert"),
                ("expert_in", None), ("expert_mlp", "tensor"), ("latent", None), ("router", None),
                ("mtp_concat", None))


def test_mesh_training_matches_single_device(tmp_path, capfd):
    assert jax.device_count() == 8
    # fp32 compute here: the comparison is about sharding, and bf16 rounding would swamp reduction-order effects
    # no end-of-run sample: its compiles are a quarter of each run here and the comparison is the losses
    base = dict(steps=6, eval_every=0, ckpt_every=0,
                **{"data.batch_size": 8, "model.overrides": {"dtype": "float32"}, "sample.length": 0})
    single = train(small_exp(**base), tmp_path / "one", progress=False)
    assert single["sample"] is None and not (tmp_path / "one" / "sample.txt").exists()
    meshed = train(small_exp(**base, mesh={"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}), tmp_path / "ep",
                   progress=False)
    fsdp = train(small_exp(**base, mesh={"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}), tmp_path / "fsdp",
                 progress=False)
    custom = dict(base, **{"model.overrides": {"dtype": "float32", "sharding_rules": CUSTOM_RULES}})
    capfd.readouterr()
    train(small_exp(**custom, mesh={"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}), tmp_path / "custom",
          progress=False)
    # activations carry their logical sharding at block boundaries: XLA never falls back to replicating them
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    a = np.array([float(v) for _, v in _losses(tmp_path / "one")])
    for other in ("ep", "fsdp", "custom"):
        b = np.array([float(v) for _, v in _losses(tmp_path / other)])
        # fp32 everywhere; only reduction order differs across shardings: 1e-4 relative over 6 Adam steps.
        np.testing.assert_allclose(b, a, rtol=1e-4)
    assert np.isfinite(single["val_loss"]) and np.isfinite(meshed["val_loss"]) and np.isfinite(fsdp["val_loss"])


def test_nvfp4_expert_parallel_training_tracks_single_device(tmp_path):
    """NVFP4 (stochastic rounding, RHT: the default recipe) on an expert=4 x data=2 mesh trains: this
    raised before (the step key closed over inside shard_map; the custom-VJP GEMMs' dW/dx types).
    The two runs draw different rounding bits (the key is folded with each token shard's index), so
    losses agree only to the SR noise: measured gaps <= 5e-4 relative over 4 steps; bound 5e-3.
    The exact check of the gradient sums is tests/ops/test_expert_parallel.py (custom-VJP GEMM vs one device)."""
    base = dict(steps=4, eval_every=0, ckpt_every=0, precision="nvfp4", **{"data.batch_size": 8, "sample.length": 0})
    train(small_exp(**base), tmp_path / "one", progress=False)
    train(small_exp(**base, mesh={"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}), tmp_path / "ep", progress=False)
    a, b = (np.array([float(v) for _, v in _losses(tmp_path / d)]) for d in ("one", "ep"))
    assert len(a) == len(b) == 4 and np.all(np.isfinite(b))
    np.testing.assert_allclose(b, a, rtol=5e-3)


@pytest.mark.parametrize("kw, words", [
    (dict(mesh={"data": 3, "fsdp": 1, "expert": 1, "tensor": 1}), "needs 3 devices but 8"),
    (dict(mesh={"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, **{"data.batch_size": 4}), "does not split over the 8"),
    (dict(**{"data.source": "/nonexistent/corpus.txt"}), "data.source: path '/nonexistent/corpus.txt' does not exist"),
    (dict(**{"data.tokenizer": "/nope/tokenizer.json"}), "data.tokenizer"),
    (dict(precision="fp8"), "config.precision"),
    (dict(steps=0), "config.steps"),
    (dict(**{"sample.length": -1}), "config.sample.length"),
])
def test_bad_configs_fail_before_compile(kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_config(small_exp(**kw))


def test_unknown_config_key_is_rejected(tmp_path):
    r = _cli(tmp_path, "--config.optim.learning_rate=1.0", check=False)
    assert r.returncode != 0 and "learning_rate" in r.stderr


def test_unknown_model_override_is_rejected():
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        check_config(small_exp(**{"model.overrides": {"hidden_sise": 32}}))
    with pytest.raises(ConfigError, match="set config.precision instead"):
        check_config(small_exp(**{"model.overrides": {"precision": "nvfp4"}}))


def test_any_model_field_overrides_from_the_cli_end_to_end(tmp_path):
    """A vocabulary larger than the byte tokenizer's is legal: the run trains and its sample decodes ids past
    255 as U+FFFD instead of crashing. hidden_size and the pattern change the model (its params count moves)."""
    run = tmp_path / "big_vocab"
    r = _cli(run, "--config.steps=2", "--config.eval_every=0", "--config.ckpt_every=0",
             "--config.model.overrides.vocab_size=300", "--config.model.overrides.hidden_size=48",
             "--config.model.overrides.hybrid_override_pattern=M*E", "--config.sample.temperature=2.0",
             "--config.sample.top_k=0", "--config.sample.length=64")
    assert "sample" in r.stdout
    import json  # noqa: PLC0415
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["overrides"]["vocab_size"] == 300 and cfg["model"]["overrides"]["hidden_size"] == 48
    sample = (run / "sample.txt").read_text(encoding="utf-8")
    # 64 near-uniform draws over 300 ids: P(no id >= 256) = (256/300)^64 ~ 4e-5
    assert sample.startswith("ROMEO:") and "\ufffd" in sample


@pytest.mark.parametrize("flag, words", [
    ("--config.model.overrides.vocab_sise=300", "did you mean 'vocab_size'"),
    ("--config.model.overrides.precision=nvfp4", "set --config.precision instead"),
    ("--config.model.overrides.vocab_size=100", "vocab_size=100 is smaller than the tokenizer's 256"),
])
def test_bad_model_overrides_are_refused_on_the_cli(tmp_path, flag, words):
    r = _cli(tmp_path / "x", flag, check=False)
    assert r.returncode != 0 and words in r.stderr, r.stderr[-2000:]
