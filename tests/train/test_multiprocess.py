"""Multi-process training through jax.distributed on this machine (gloo CPU collectives), via the launcher.

Runs the trainer as subprocesses: one process with 8 CPU devices (the reference), and 2 processes x 4 devices
(`python -m nemotron_jax.launch --processes 2 --cpu-devices 4 -- experiments/train.py ...`), 20 steps of the
tiny config at 8x32 tokens, fp32 compute; and 4 processes x 2 devices for 6 steps. Checks: the same losses within
TOL; a resume from the step-10 checkpoint continues bit for bit; a dead process stops the job with a message.
Cost, measured (2 cores at load ~12): 27 + 78 + 52 + 90 CPU-s for the four training runs (reference, 2-process,
resume, 4-process), about 8 for each dead-process run; 7 minutes wall at that load, so roughly 2.5 to 3 minutes
on a quiet 2-core machine.
"""

from __future__ import annotations

import csv
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 20
# Same global batch and initial state in both runs; what differs is the order of the gradient and loss
# reductions (in-process all-reduce vs gloo across processes), so the runs drift apart by rounding. Measured
# at fp32 compute (8 devices vs 2 x 4): steps 1-3 equal, max |difference| over 20 steps 9.5e-7 (about one fp32
# ulp of a loss near 4); TOL leaves 10x margin. (At bf16 compute the same comparison drifts to 1.7e-3 by step
# 20: bf16 rounding turns the reduction-order differences into whole bf16 ulps, which Adam then carries on.)
TOL = 1e-5
TOL_STEP1 = 1e-6


def _train_args(workdir, steps=STEPS):
    return ["experiments/train.py", "--config", "configs/tiny.py", f"--workdir={workdir}", f"--config.steps={steps}",
            "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.mesh.data=8",
            "--config.model.overrides.dtype=float32", "--config.log_every=1", "--config.eval_every=0",
            "--config.eval_batches=1", "--config.ckpt_every=10", "--config.sample.length=0",
            "--config.optim.warmup_steps=2", "--no_progress"]


def _env(devices=None):
    # no persistent compilation cache: a process that finds its programs there while its peer compiles reaches
    # the first collective so much earlier that gloo's 30 s context set-up can time out
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(cmd, env, timeout=600, rc=0):
    t0, cpu0 = time.monotonic(), _children_cpu()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == rc, f"{cmd} failed ({p.returncode}):\n{out[-6000:]}"
    return out, f"{time.monotonic() - t0:.0f} s wall, {_children_cpu() - cpu0:.0f} CPU-s"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _launch(n, devices, args, env, rc=0):
    return _run([sys.executable, "-m", "nemotron_jax.launch", "--processes", str(n), "--cpu-devices", str(devices),
                 "--", *args], env, rc=rc)


# Runs that only feed loss comparisons stop right after their last step (and its checkpoint) through the
# existing test switch, skipping the end-of-run validation and sample (two more compiles); the launcher then
# reports the SIGKILL and exits 137.
_CUT = f"--config.debug_kill_after_step={STEPS}"


def _losses(workdir) -> dict[int, float]:
    with open(pathlib.Path(workdir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    one = tmp_path_factory.mktemp("multiprocess") / "one"
    _, t1 = _run([sys.executable, *_train_args(one), _CUT], _env(8), rc=-signal.SIGKILL)
    print(f"\nsingle process x 8 devices: {t1}")
    return one


@pytest.fixture(scope="module")
def runs(single):
    two = single.parent / "two"
    out2, t2 = _launch(2, 4, _train_args(two), _env())
    print(f"\n2 processes x 4 devices: {t2}")
    return dict(tmp=single.parent, one=single, two=two, out2=out2)


@pytest.mark.slow
def test_two_processes_match_single_process(runs):
    assert "[p0] model tiny" in runs["out2"] and "[p1] model tiny" in runs["out2"]
    assert "launch: all 2 processes exited 0" in runs["out2"]
    a, b = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    diff = np.array([abs(a[s] - b[s]) for s in a])
    print(f"max |loss difference| over {STEPS} steps: {diff.max():.3g} (step 1: {diff[0]:.3g})")
    assert diff[0] <= TOL_STEP1  # the same global batch from the same initial state
    assert diff.max() <= TOL
    # orbax wrote one multi-host checkpoint per save (not one per process)
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


@pytest.mark.slow
def test_resume_on_two_processes_is_bit_for_bit(runs):
    """A run stopped after its step-10 checkpoint (the step-20 one removed) continues exactly like the
    uninterrupted run: parameters, optimizer state and the data iterator all restore on both processes."""
    resumed = runs["tmp"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    out, t = _launch(2, 4, [*_train_args(resumed), _CUT], _env(), rc=128 + signal.SIGKILL)
    print(f"\nresume 10 -> 20 on 2 processes: {t}")
    assert "[p0] resumed from step 10" in out and "[p1] resumed from step 10" in out
    a, b = _losses(runs["two"]), _losses(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert {s: b[s] for s in range(11, STEPS + 1)} == {s: a[s] for s in range(11, STEPS + 1)}


@pytest.mark.slow
def test_four_processes_match_single_process(single):
    """4 processes x 2 devices, cut short to save time: the run is the 20-step run (same schedule), and every
    process SIGKILLs itself after step 6 (`config.debug_kill_after_step`), before validation and the sample;
    steps 1-5 (written by process 0 before any process can finish step 6) match the single-process run."""
    four = single.parent / "four"
    env = _env()
    cmd = [sys.executable, "-m", "nemotron_jax.launch", "--processes", "4", "--cpu-devices", "2", "--",
           *_train_args(four), "--config.debug_kill_after_step=6"]
    t0, cpu0 = time.monotonic(), _children_cpu()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(f"\n4 processes x 2 devices, 6 steps: {time.monotonic() - t0:.0f} s wall, "
          f"{_children_cpu() - cpu0:.0f} CPU-s")
    out = p.stdout + p.stderr
    assert p.returncode == 128 + signal.SIGKILL and "was killed by SIGKILL" in out, out[-4000:]
    a, b = _losses(single), _losses(four)
    assert set(range(1, 6)) <= set(b), out[-4000:]
    diff = np.array([abs(a[s] - b[s]) for s in range(1, 6)])
    print(f"4 processes: max |loss difference| over steps 1-5: {diff.max():.3g}")
    assert diff[0] <= TOL_STEP1 and diff.max() <= TOL


_PEER = textwrap.dedent("""
    import os, signal, sys, time
    from nemotron_jax import launch
    launch.initialize_distributed()
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    me = jax.process_index()
    print(f"process {me} of {jax.process_count()} up", flush=True)
    with launch.fail_fast():
        for i in range(100000):
            multihost_utils.process_allgather(jnp.full((2,), me + i))  # a collective every iteration
            if me == 1 and i == 20:
                if sys.argv[1] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)  # die without a word, like an OOM kill
                raise RuntimeError("injected failure in process 1")
            time.sleep(0.01)
""")


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_dead_process_stops_the_others(tmp_path, how):
    """Process 1 dies mid-run (SIGKILL, or an exception: `launch.fail_fast` exits at once instead of waiting up
    to 300 s at jax's shutdown barrier); the launcher names it, stops process 0 (which would otherwise wait in a
    collective; it ignores SIGTERM there, so SIGKILL after --grace) and returns non-zero in bounded time."""
    script = tmp_path / "peer.py"
    script.write_text(_PEER)
    env = _env()
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "nemotron_jax.launch", "--processes", "2", "--grace", "5", "--",
                        str(script), how], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert "[p1] process 1 of 2 up" in out, out[-3000:]
    if how == "kill":
        assert p.returncode == 128 + signal.SIGKILL, out[-3000:]
        assert re.search(r"launch: process 1 \(pid \d+\) was killed by SIGKILL\n", out), out
    else:
        assert p.returncode == 1, out[-3000:]
        assert "[p1] RuntimeError: injected failure in process 1" in out
        assert re.search(r"launch: process 1 \(pid \d+\) exited with code 1\n", out), out
    assert took < 60, f"took {took:.0f} s"


def test_launcher_usage_errors():
    from nemotron_jax import launch

    with pytest.raises(SystemExit):
        launch.main(["--processes", "2"])  # no command
    with pytest.raises(SystemExit):
        launch.main(["--processes", "0", "--", "x.py"])
    assert launch._command(["a.py", "--x"]) == [sys.executable, "a.py", "--x"]
    assert launch._command(["-m", "pkg"]) == [sys.executable, "-m", "pkg"]
    assert launch._command(["prog"]) == ["prog"]


def test_process_rows_and_pipeline_rows():
    """Rows of a global batch per process: a single process holds all of them; the pipeline's row selection
    splits the same global batches and leaves the iterator state unchanged (so one copy in a checkpoint)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from nemotron_jax.data import make_dataset
    from nemotron_jax.train.mesh import make_mesh, process_rows

    mesh = make_mesh({"data": 8})
    for spec in (PartitionSpec(("data",)), PartitionSpec()):
        assert process_rows(NamedSharding(mesh, spec), (16, 4)).tolist() == list(range(16))
    assert jax.process_count() == 1

    kw = dict(seq_len=32, batch_size=4, seed=3)
    full, lo, hi = (iter(make_dataset(rows=r, **kw)) for r in (None, [0, 1], [2, 3]))
    for _ in range(3):
        f, a, b = next(full), next(lo), next(hi)
        for k in f:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k])
    assert lo.get_state() == hi.get_state() == full.get_state()
    with pytest.raises(ValueError, match="rows must be sorted"):
        make_dataset(rows=[2, 1], **kw)
    with pytest.raises(ValueError, match="rows must be sorted"):
        make_dataset(rows=[4], **kw)
