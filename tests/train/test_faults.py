"""Faults a training run survives (docs/reliability.md): non-finite steps skipped bit for bit and the stop after
too many in a row, resume safety (another model config, a schedule change), and the small defects of issue 16.
The kill inside a checkpoint save is in tests/train/test_loop.py (it shares the uninterrupted reference run)."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nemotron_jax import model as M
from nemotron_jax.config import ConfigError, ModelConfig
from nemotron_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from nemotron_jax.train.loop import NonFiniteError, train
from nemotron_jax.train.metrics import EventLog, baseline_comparison
from nemotron_jax.train.optim import make_optimizer, wsd_schedule
from nemotron_jax.train.run_setup import check_resume, run_record
from nemotron_jax.train.step import init_train_state, make_train_step
from tests.helpers.runs import small_exp

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _leaves(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


# ---- non-finite steps -----------------------------------------------------------------------------------------

def test_nonfinite_step_changes_nothing_bit_exact():
    """A NaN loss (so NaN gradients) at data step 2: params, optimizer state, router biases, the step counter and
    the key come out bit for bit as they went in; the next finite step updates all of them again."""
    cfg = ModelConfig.tiny(moe_router_bias_update_rate=0.01)
    sched = wsd_schedule(1e-2, 10, 2)
    opt = make_optimizer(sched)
    graphdef, state = init_train_state(M.init_model(cfg, seed=1), opt, seed=0)
    step = jax.jit(make_train_step(cfg, graphdef, opt, sched, debug_nan_at_steps=(2,)))
    toks = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size, jnp.int32)
    batch = {"tokens": toks, "segment_ids": jnp.ones((2, 16), jnp.int32), "loss_mask": jnp.ones((2, 16), jnp.int32)}

    s1, m1 = step(state, batch, np.int32(1))
    assert int(m1["skipped"]) == 0 and int(s1.step) == 1 and not _same(s1.params, state.params)
    before = jax.tree.map(np.array, s1)
    s2, m2 = step(s1, batch, np.int32(2))
    assert int(m2["skipped"]) == 1 and math.isnan(float(m2["loss"])) and math.isnan(float(m2["grad_norm"]))
    # the router-bias update does not depend on the loss: without the hold it would have moved
    assert not _same(s1.rest, state.rest)
    for name in ("step", "params", "rest", "opt_state", "rng"):
        assert _same(getattr(s2, name), getattr(before, name)), name
    s3, m3 = step(s2, batch, np.int32(3))
    assert int(m3["skipped"]) == 0 and int(s3.step) == 2
    assert not _same(s3.params, before.params) and not _same(s3.opt_state, before.opt_state)
    assert not _same(s3.rest, before.rest)


def _restore_state(directory, step):
    ck = Checkpointer(directory, every=0)
    got = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    meta = ck.read_meta(step)
    ck.close()
    return dict(got["state"]), meta


def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_state_saved(tmp_path, capsys):
    exp = small_exp(steps=6, eval_every=0, ckpt_every=3, debug_nan_at_steps=(2, 4, 5), max_consecutive_skips=2)
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps \(4\.\.5\).*checkpoint 5"):
        train(exp, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "WARNING: step 2: non-finite loss" in out and "WARNING: step 5" in out
    import csv  # noqa: PLC0415
    rows = {int(r["step"]): r for r in csv.DictReader((tmp_path / "metrics.csv").open())}
    assert sorted(rows) == [1, 2, 3, 4, 5]  # every skipped step has its row
    assert [int(rows[s]["skipped_steps"]) for s in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 3]
    assert rows[2]["loss"] == "nan" and rows[3]["loss"] != "nan"
    events = EventLog(tmp_path / "events.jsonl").read()
    assert [(e["step"], e["event"]) for e in events] == [(2, "skipped_nonfinite"), (4, "skipped_nonfinite"),
                                                        (5, "skipped_nonfinite"), (5, "stopped_nonfinite")]
    # checkpoint 5 (saved at the stop) holds the state of step 3 bit for bit: steps 4 and 5 changed nothing
    s3, _ = _restore_state(tmp_path / "checkpoints", 3)
    s5, meta5 = _restore_state(tmp_path / "checkpoints", 5)
    assert s3.keys() == s5.keys() and all(np.array_equal(s3[k], s5[k]) for k in s3)
    assert meta5["skipped_steps"] == 3
    # the run resumes from the saved state; the skip count carries over
    exp.debug_nan_at_steps = ()
    train(exp, tmp_path, progress=False)
    assert "resumed from step 5" in capsys.readouterr().out
    rows = {int(r["step"]): r for r in csv.DictReader((tmp_path / "metrics.csv").open())}
    assert sorted(rows) == list(range(1, 7)) and rows[6]["skipped_steps"] == "3" and rows[6]["loss"] != "nan"


# ---- resume safety ----------------------------------------------------------------------------------------------

def _snapshot(d: pathlib.Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_refuses_another_model_and_an_unflagged_schedule_change_writing_nothing(tmp_path, capsys):
    exp = small_exp(steps=3, eval_every=0, ckpt_every=3)
    train(exp, tmp_path, progress=False)
    before = _snapshot(tmp_path)

    other = small_exp(steps=3, eval_every=0, ckpt_every=3, **{"model.overrides.hidden_size": 96})
    with pytest.raises(CheckpointMismatchError, match="differing fields: hidden_size: checkpoint 64, now 96"):
        train(other, tmp_path, progress=False)
    assert "could not be restored" not in capsys.readouterr().out  # refused by the record, not by failed reads
    assert _snapshot(tmp_path) == before  # config.json, metrics, checkpoints: nothing written, nothing set aside
    assert not (tmp_path / "checkpoints.corrupt").exists()

    longer = small_exp(steps=4, eval_every=0, ckpt_every=3, **{"optim.lr": 1e-3})
    with pytest.raises(ConfigError, match=r"allow_schedule_change.*optim\.lr: checkpoint 0\.003, now 0\.001.*"
                                          r"steps: checkpoint 3, now 4"):
        train(longer, tmp_path, progress=False)
    assert _snapshot(tmp_path) == before

    longer.allow_schedule_change = True
    train(longer, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and "WARNING: schedule changed on resume at step 3" in out
    events = EventLog(tmp_path / "events.jsonl").read()
    assert [(e["step"], e["event"]) for e in events] == [(3, "schedule_change")]
    assert any("steps: checkpoint 3, now 4" in c for c in events[0]["changes"])
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 4  # rewritten after the restore
    # the new schedule is the record from now on (resuming the finished run again needs no flag)
    ck = Checkpointer(tmp_path / "checkpoints", every=0)
    assert ck.read_meta(4)["schedule"]["steps"] == 4 and ck.read_meta(4)["schedule"]["optim.lr"] == 1e-3
    ck.close()


def test_checkpoints_without_a_record_are_checked_against_config_json(tmp_path):
    """Run folders written before checkpoints recorded their config: the fallback compares with config.json."""
    from nemotron_jax.train import run_setup  # noqa: PLC0415

    exp = small_exp()
    (tmp_path / "config.json").write_text(exp.to_json_best_effort(indent=1))
    legacy = run_setup._record_from_config_json(tmp_path / "config.json")
    cfg = run_setup.model_config_from(exp).replace(precision=exp.precision)
    assert legacy == run_record(exp, cfg)
    other = cfg.replace(hidden_size=96)
    with pytest.raises(CheckpointMismatchError, match="hidden_size: checkpoint 64, now 96"):
        check_resume(legacy, run_record(exp, other), allow_schedule_change=False, where="x")
    assert check_resume({}, run_record(exp, other), allow_schedule_change=False, where="x") == []  # nothing known
    assert run_setup._record_from_config_json(tmp_path / "missing.json") is None


# ---- small defects ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("val, base, words", [
    (3.87, 3.33, "0.5400 worse than"), (1.44, 3.33, "1.8900 better than"), (3.33, 3.33, "equal to"),
    (float("nan"), 3.33, "not comparable with"),
])
def test_baseline_comparison_says_better_or_worse(val, base, words):
    assert baseline_comparison(val, base) == words


def _load_script(path: pathlib.Path, name: str):
    import importlib.util  # noqa: PLC0415
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("logged", [1, 2, 3, 4, 5, 12])
def test_nvfp4_vs_bf16_plot_handles_short_runs(tmp_path, logged):
    """--config.steps=20 logs 3 rows per run; the 5-point moving mean of the gap crashed the plot below 5 rows."""
    mod = _load_script(ROOT / "experiments" / "nvfp4_vs_bf16.py", "_nvfp4_vs_bf16")
    steps = [1, *range(10, 10 * logged, 10)][:logged]

    def rows(offset):
        return [{"step": str(s), "loss_main": str(5.0 - 0.01 * s + offset), "val_loss": "4.5" if s == steps[-1] else ""}
                for s in steps]

    results = {name: {"val": 4.5 + off, "train_tail": 4.6 + off, "rows": rows(off), "ftz": 0.01 if "nvfp4" in name
                      else None} for name, off in (("bf16", 0.0), ("nvfp4", 0.02), ("bf16 seed+1", -0.01))}
    assert "| nvfp4 | 4.5200 | +0.44% |" in mod.results_table(results)
    mod.plot_results(results, "t", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000
    st, mean = mod.moving_mean(steps, np.arange(logged, dtype=float))
    assert len(st) == len(mean) == logged - min(5, logged) + 1


def test_gpu_ssd_report_never_lands_in_the_repository_root(tmp_path, monkeypatch):
    import sys  # noqa: PLC0415
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    mod = _load_script(ROOT / "benchmarks" / "gpu_ssd.py", "_gpu_ssd")
    monkeypatch.delenv("OUT", raising=False)
    assert pathlib.Path(mod.default_out()) == ROOT / "runs" / "gpu_ssd.json"  # git-ignored
    monkeypatch.setenv("OUT", str(tmp_path))
    assert pathlib.Path(mod.default_out()) == tmp_path / "gpu_ssd.json"
    out = mod.write_report({"a": 1}, str(tmp_path / "deep" / "r.json"))
    assert json.loads(pathlib.Path(out).read_text()) == {"a": 1}
    assert not (ROOT / "gpu_ssd.json").exists()
