"""Short training runs for tests: the bundled tiny config cut down to a few small steps."""

from configs.tiny import get_config


def small_exp(**kw):
    """configs/tiny.py at 8 steps of 4x32 tokens (checkpoints every 3 steps); `kw` sets fields by dotted path,
    e.g. small_exp(steps=5, **{"model.overrides.hybrid_override_pattern": "M*E-"})."""
    c = get_config()
    c.steps = 8
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.log_every = 1
    c.eval_every = 4
    c.eval_batches = 2
    c.ckpt_every = 3
    c.sample.length = 8
    c.optim.warmup_steps = 2
    for k, v in kw.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def cli(workdir, *overrides, check=True):
    """experiments/train.py in a subprocess on one CPU device (like the README command), at small_exp's sizes;
    `overrides` are extra --config flags. Returns the CompletedProcess (stdout, stderr, returncode)."""
    import os  # noqa: PLC0415
    import pathlib  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # a single CPU device, like the README command
    args = [sys.executable, str(root / "experiments" / "train.py"), f"--workdir={workdir}", "--no_progress",
            "--config.steps=8", "--config.data.seq_len=32", "--config.data.batch_size=4", "--config.log_every=1",
            "--config.eval_every=4", "--config.eval_batches=2", "--config.ckpt_every=3", "--config.sample.length=8",
            "--config.optim.warmup_steps=2", *overrides]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, check=check, timeout=600)


def logged_losses(workdir):
    """[(step, loss string)] from a run's metrics.csv: strings, so equality is bit for bit."""
    import csv  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    with open(pathlib.Path(workdir) / "metrics.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f) if r["loss"]]
