"""Train a Nemotron-3-style hybrid from an ml-collections config.

    python experiments/train.py --config configs/tiny.py --workdir runs/tiny [--config.steps=200]

Writes to the work directory: metrics.csv (and tensorboard/ when tensorboardX is installed), checkpoints/
(orbax; a rerun resumes from the newest good one), loss.png, sample.txt and summary.json.
Multi-process: `python -m nemotron_jax.launch --processes N --cpu-devices D -- experiments/train.py ...` runs N
local processes; on a cluster start the same command on every host with --multihost (jax.distributed.initialize()
runs first; on Cloud TPU and SLURM it finds its peers itself, elsewhere pass --coordinator_address,
--num_processes and --process_id). See nemotron_jax/launch.py.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # before DEFINE_config_file, which applies the overrides as it is defined
    from nemotron_jax.config import ConfigError
    from nemotron_jax.experiment import check_override_flags
    try:
        check_override_flags(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
_CONFIG = config_flags.DEFINE_config_file("config", str(_ROOT / "configs" / "tiny.py"), "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, plot, sample)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() before anything else")
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 (auto on TPU/SLURM)")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes (auto on TPU/SLURM)")
_PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index (auto on TPU/SLURM)")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "no progress bar (logs only)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required (where checkpoints, metrics and the plot go)")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    import jax  # noqa: PLC0415

    from nemotron_jax import launch  # noqa: PLC0415

    if _MULTIHOST.value or launch.launched():  # launched: python -m nemotron_jax.launch --processes N -- ...
        launch.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    from nemotron_jax.train.loop import NonFiniteError, train  # noqa: PLC0415

    from nemotron_jax.config import ConfigError  # noqa: PLC0415
    from nemotron_jax.train.checkpoint import CheckpointMismatchError  # noqa: PLC0415
    from nemotron_jax.train.metrics import baseline_comparison  # noqa: PLC0415
    with launch.fail_fast():  # multi-process: a failing process exits at once (see nemotron_jax/launch.py)
        try:
            summary = train(_CONFIG.value, _WORKDIR.value, progress=not _NO_PROGRESS.value)
        except (ConfigError, CheckpointMismatchError, NonFiniteError) as e:
            sys.exit(f"error: {e}")
    print(f"\nvalidation loss {summary['val_loss']:.4f} nats/token, "
          f"{baseline_comparison(summary['val_loss'], summary['unigram_baseline'])} the unigram baseline "
          f"{summary['unigram_baseline']:.4f}")
    if summary["sample"] is not None:  # config.sample.length=0 skips it
        print(f"sample ({_WORKDIR.value}/sample.txt):\n{'-' * 60}\n{summary['sample']}\n{'-' * 60}")
    print(f"loss plot: {_WORKDIR.value}/loss.png   metrics: {_WORKDIR.value}/metrics.csv")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
