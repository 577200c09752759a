"""Loading a training run for inference: the model (parameters and router biases) and the run's tokenizer.

    model = load_run("runs/tiny")                      # newest checkpoint
    model, tok = load_run_with_tokenizer("runs/tiny", step=250)
    out = nemotron_jax.generate(model, [tok.encode("ROMEO:\\n")], max_new_tokens=100)

A run directory (nemotron_jax.train.loop.train) holds `config.json` (the experiment config) and
`checkpoints/<step>/` (orbax; the TrainState saved as a flat {keystr(path): array} dict). Only the entries the
model needs are read (`.params[...]` and `.rest[...]`: weights and MoE router correction biases), through
orbax's partial restore into host arrays: no optimizer is built and the Adam moments are never read. The
entry names come from flattening a TrainState of the abstract model the same way the trainer does, so they
cannot drift from what the trainer writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class RunError(ValueError):
    """The directory is not a usable training run (not a run, no checkpoint, unreadable config or tokenizer)."""


class RunMismatchError(RunError):
    """The checkpoint does not hold the model that the run's config.json describes."""


def _experiment_config(workdir: pathlib.Path):
    import ml_collections  # noqa: PLC0415

    path = workdir / CONFIG_FILE
    if not workdir.is_dir():
        raise RunError(f"run directory {str(workdir)!r} does not exist")
    if not path.is_file():
        raise RunError(f"{str(workdir)!r} is not a training run: it has no {CONFIG_FILE} "
                       f"(written by nemotron_jax.train.loop.train / experiments/train.py)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: cannot read the experiment config ({e})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise RunError(f"{path} is not an experiment config (no 'model' section)")
    return ml_collections.ConfigDict(raw)


def run_model_config(workdir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a run trained (its preset, overrides and precision), read from `config.json`."""
    from nemotron_jax.experiment import model_config_from  # noqa: PLC0415

    workdir = pathlib.Path(workdir)
    exp = _experiment_config(workdir)
    try:
        cfg = model_config_from(exp)
        return cfg.replace(precision=exp.get("precision", cfg.precision))
    except ConfigError as e:
        raise RunError(f"{workdir / CONFIG_FILE}: {e}") from None


@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs absl warnings (e.g. a missing _CHECKPOINT_METADATA) that mean nothing to a reader."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(workdir: pathlib.Path):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    ckdir = workdir / CHECKPOINT_DIR
    if not ckdir.is_dir():
        raise RunError(f"run {str(workdir)!r} has no checkpoint: {CHECKPOINT_DIR}/ does not exist "
                       f"(did training save one? checkpoints are written every ckpt_every steps and at the end)")
    opts = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(ckdir.absolute(), options=opts,
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in the run, oldest first."""
    workdir = pathlib.Path(workdir)
    _experiment_config(workdir)
    with _quiet_absl():
        mgr = _manager(workdir)
        try:
            return sorted(mgr.all_steps())
        finally:
            mgr.close()


def with_dtype(cfg: ModelConfig, dtype: Any) -> ModelConfig:
    """cfg with parameter and compute dtype `dtype` (float32 or bfloat16); None returns cfg unchanged."""
    if dtype is None:
        return cfg
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype={name!r}: use float32 or bfloat16")
    return cfg.replace(dtype=name, param_dtype=name)


def load_run(workdir: str | os.PathLike, *, step: int | None = None, dtype: Any = None):
    """The NemotronModel of a training run at `step` (default: the newest checkpoint).

    dtype: None keeps the run's numerics (fp32 parameters, the trained compute dtype); float32 or bfloat16
    sets both the parameter and the compute dtype (the router stays fp32, as the model builds it).
    Raises RunError (not a run, no checkpoint, unknown step) or RunMismatchError (the checkpoint holds another
    model than config.json describes) before anything is compiled.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    from nemotron_jax.model import abstract_model  # noqa: PLC0415
    from nemotron_jax.train.step import TrainState  # noqa: PLC0415

    workdir = pathlib.Path(workdir)
    cfg = with_dtype(run_model_config(workdir), dtype)
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    # the trainer saves _flat(TrainState): flatten one the same way (None fields have no leaves)
    only_model = TrainState(**{**dict.fromkeys(TrainState._fields), "params": params, "rest": rest})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(only_model)
    names = [jax.tree_util.keystr(p) for p, _ in leaves]

    with _quiet_absl():
        mgr = _manager(workdir)
        try:
            steps = sorted(mgr.all_steps())
            if not steps:
                raise RunError(f"run {str(workdir)!r} has no complete checkpoint in {CHECKPOINT_DIR}/")
            if step is None:
                step = steps[-1]
            elif step not in steps:
                raise RunError(f"run {str(workdir)!r} has no checkpoint at step {step}; it has steps {steps}")
            def unreadable(e: Exception) -> RunError:
                first = str(e).splitlines()[0][:200] if str(e) else ""
                older = [s for s in steps if s < step]
                hint = f"; an older one: step={older[-1]}" if older else ""
                return RunError(f"checkpoint step {step} of {str(workdir)!r} is unreadable "
                                f"({type(e).__name__}: {first}){hint}")

            try:
                meta = mgr.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 - any read failure: say which checkpoint
                raise unreadable(e) from None
            if meta is None:
                raise unreadable(FileNotFoundError("no state item"))
            _check_entries(workdir, step, cfg, names, leaves, meta)
            item = {n: jax.ShapeDtypeStruct(tuple(meta[n].shape), meta[n].dtype) for n in names}
            restore_args = {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}
            try:
                got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True)))["state"]
            except Exception as e:  # noqa: BLE001 - a corrupt or partial checkpoint
                raise unreadable(e) from None
        finally:
            mgr.close()

    values = [jnp.asarray(np.asarray(got[n]).astype(x.dtype)) for n, (_, x) in zip(names, leaves)]
    restored = jax.tree_util.tree_unflatten(treedef, values)
    return nnx.merge(graphdef, restored.params, restored.rest)


def _check_entries(workdir, step, cfg, names, leaves, meta) -> None:
    missing = [n for n in names if n not in meta]
    wrong = [(n, tuple(meta[n].shape), tuple(x.shape)) for n, (_, x) in zip(names, leaves)
             if n in meta and tuple(meta[n].shape) != tuple(x.shape)]
    wanted = set(names)
    extra = sorted(n for n in meta.keys() if n.startswith((".params", ".rest")) and n not in wanted)
    if not missing and not wrong and not extra:
        return
    if missing:
        what = f"lacks {len(missing)} of the {len(names)} model entries the config needs (e.g. {missing[:2]})"
    elif wrong:
        what = (f"has {len(wrong)} entries of another shape (e.g. {wrong[0][0]}: saved {list(wrong[0][1])}, "
                f"the config needs {list(wrong[0][2])})")
    else:
        what = f"has {len(extra)} model entries the config does not use (e.g. {extra[:2]})"
    raise RunMismatchError(f"checkpoint step {step} of {str(workdir)!r} {what}: it was not written by the model "
                           f"that {CONFIG_FILE} describes (pattern {cfg.hybrid_override_pattern!r}, hidden "
                           f"{cfg.hidden_size}, vocab {cfg.vocab_size}); was config.json edited or replaced?")


def run_tokenizer(workdir: str | os.PathLike):
    """The tokenizer a run trained with: bytes when `data.tokenizer` is unset, else that tokenizer.json.

    A relative path is tried as given, then relative to the run directory; a `tokenizer.json` inside the run
    directory is used when the recorded path no longer exists.
    """
    from nemotron_jax.data.tokenizer import make_tokenizer  # noqa: PLC0415

    workdir = pathlib.Path(workdir)
    exp = _experiment_config(workdir)
    data = exp.get("data")
    path = data.get("tokenizer") if data is not None else None
    if path in (None, "", "bytes", "byte"):
        return make_tokenizer(None)
    candidates = [pathlib.Path(path).expanduser(), workdir / path, workdir / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return make_tokenizer(c)
    raise RunError(f"run {str(workdir)!r} trained with tokenizer {path!r}, which no longer exists "
                   f"(also looked for {workdir / 'tokenizer.json'}); copy the tokenizer.json into the run directory")


def load_run_with_tokenizer(workdir: str | os.PathLike, *, step: int | None = None, dtype: Any = None):
    """(model, tokenizer) of a training run: see load_run and run_tokenizer."""
    tok = run_tokenizer(workdir)
    model = load_run(workdir, step=step, dtype=dtype)
    if tok.vocab_size > model.cfg.vocab_size:
        raise RunMismatchError(f"run {str(workdir)!r}: the tokenizer has {tok.vocab_size} ids but the model's "
                               f"vocabulary only {model.cfg.vocab_size}")
    return model, tok
