"""Setting up a training run from its experiment config: checks, model config, tokenizer, mesh, optimizer, the
placed train state and its shardings, data iterators, and the checkpoint restore.

`check_config(exp)` fails before any compile on what a config can get wrong; `setup_run(exp, workdir)` builds
everything the loop needs (`Run`), resuming from the newest good checkpoint when there is one.

Resume safety. Every checkpoint's meta records the resolved model config and the schedule (`run_record`). Before
a checkpoint's arrays are read, its record is compared with the new config (`check_resume`): another model config
raises `CheckpointMismatchError` naming each differing field; a changed step count or optimizer/schedule field
raises `ConfigError` unless `config.allow_schedule_change=True`, and an accepted change is printed and appended
to `<workdir>/events.jsonl` (`train.metrics.EventLog`). Checkpoints written before the record existed are compared
with the run folder's config.json. Nothing in the run folder is written before the restore succeeds: config.json
is rewritten only after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemotron_jax import model as M
from nemotron_jax.config import PRECISIONS, ConfigError, ModelConfig
from nemotron_jax.data import make_dataset, make_tokenizer
from nemotron_jax.experiment import model_config_from
from nemotron_jax.sharding import batch_sharding, rules_of, shardings
from nemotron_jax.train import mesh as mesh_lib
from nemotron_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from nemotron_jax.train.metrics import EventLog
from nemotron_jax.train.optim import make_optimizer, wsd_schedule
from nemotron_jax.train.step import TrainState, init_train_state


def check_config(exp) -> None:
    """Fail before any compile on what a config can get wrong; messages name the field and the fix."""
    def need(cond, field, why, fix):
        if not cond:
            raise ConfigError(f"config.{field}: {why}; {fix}")

    need(exp.steps >= 1, "steps", f"got {exp.steps}", "train for at least one step")
    need(exp.data.seq_len >= 2, "data.seq_len", f"got {exp.data.seq_len}", "use at least 2 tokens")
    need(exp.data.batch_size >= 1, "data.batch_size", f"got {exp.data.batch_size}", "use a positive batch")
    need(exp.precision in PRECISIONS, "precision", f"unknown precision {exp.precision!r}", f"use one of {PRECISIONS}")
    src = exp.data.source
    need(src is None or os.path.exists(src), "data.source", f"path {src!r} does not exist",
         "point it at a text file or a directory of .txt files (None uses the bundled corpus)")
    tok = exp.data.tokenizer
    need(tok is None or os.path.exists(tok), "data.tokenizer", f"path {tok!r} does not exist",
         "point it at a tokenizer.json (None uses bytes)")
    mesh_shape = dict(exp.mesh)
    try:
        full = mesh_lib.validate_mesh_shape(mesh_shape, jax.device_count())
    except mesh_lib.MeshConfigError as e:
        raise ConfigError(str(e)) from None
    shards = full["data"] * full["fsdp"] * full["expert"]
    need(exp.data.batch_size % shards == 0, "data.batch_size",
         f"{exp.data.batch_size} does not split over the {shards} batch shards of mesh {full}",
         f"use a multiple of {shards}")
    need(exp.data.batch_size % jax.process_count() == 0, "data.batch_size",
         f"{exp.data.batch_size} does not split over {jax.process_count()} processes", "use a multiple of it")
    need(exp.eval_every >= 0 and exp.ckpt_every >= 0, "eval_every", "negative intervals", "use 0 to turn off")
    need(exp.sample.length >= 0, "sample.length", f"got {exp.sample.length}", "use 0 to skip the end-of-run sample")
    need(exp.get("max_consecutive_skips", 10) >= 0, "max_consecutive_skips", f"got {exp.get('max_consecutive_skips')}",
         "use 0 to never stop on non-finite steps, or a positive count")
    model_config_from(exp)  # validates the model fields


SCHEDULE_FIELDS = ("steps", "optim.lr", "optim.warmup_steps", "optim.decay_fraction", "optim.min_lr_ratio",
                   "optim.decay_shape", "optim.b1", "optim.b2", "optim.weight_decay", "optim.clip_norm")


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _get(exp, dotted: str):
    node = exp
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def run_record(exp, cfg: ModelConfig) -> dict:
    """What a checkpoint records about the run that wrote it: the resolved model config and the schedule."""
    return {"model_config": _jsonable(cfg.to_dict()), "schedule": _jsonable({f: _get(exp, f) for f in SCHEDULE_FIELDS})}


def _record_from_config_json(path: pathlib.Path) -> dict | None:
    """The record of a run folder whose checkpoints predate the meta record, from its config.json."""
    import ml_collections  # noqa: PLC0415
    try:
        saved = ml_collections.ConfigDict(json.loads(path.read_text()))
        return run_record(saved, model_config_from(saved).replace(precision=saved.precision))
    except Exception:  # noqa: BLE001 - an unreadable or foreign config.json: nothing to compare with
        return None


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check_resume(saved: dict, record: dict, *, allow_schedule_change: bool, where: str) -> list[str]:
    """Compare a checkpoint's record with the new run's. Raises CheckpointMismatchError for another model config,
    ConfigError for a schedule change without the flag; returns the accepted schedule changes (may be [])."""
    model = _diff(saved.get("model_config") or {}, record["model_config"]) if saved.get("model_config") else []
    if model:
        raise CheckpointMismatchError(
            f"{where} was written by another model config; differing fields: {'; '.join(model)}. "
            f"Resume with the checkpoint's model config, or use a new --workdir")
    sched = _diff(saved.get("schedule") or {}, record["schedule"]) if saved.get("schedule") else []
    if sched and not allow_schedule_change:
        raise ConfigError(
            f"config.allow_schedule_change: resuming {where} with another step count or schedule "
            f"({'; '.join(sched)}) changes the learning rate of the remaining steps; pass "
            f"--config.allow_schedule_change=True to accept it (it is recorded in events.jsonl), or use a new --workdir")
    return sched


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built from the experiment config."""

    exp: Any
    workdir: pathlib.Path
    cfg: ModelConfig
    tokenizer: Any
    mesh: Mesh
    schedule: Callable
    optimizer: Any
    graphdef: nnx.GraphDef
    state: TrainState  # placed on the mesh (restored when resuming)
    state_sharding: TrainState
    batch_sharding: NamedSharding
    train_iter: Any
    checkpointer: Checkpointer
    start: int  # steps already taken
    data_kw: dict  # make_dataset keywords shared by the train and validation splits
    local_batch: int  # rows of each data.batch_size global batch that this process holds (data_kw["rows"])
    record: dict = dataclasses.field(default_factory=dict)  # run_record(exp, cfg): saved in every checkpoint's meta
    restored_meta: dict = dataclasses.field(default_factory=dict)  # meta of the checkpoint resumed from ({} if none)

    def global_batch(self, batch: dict) -> dict:
        """A host batch as a global array on the mesh: each process passes the rows `mesh.process_rows` gave it
        (the pipeline's `rows`), so the global batch is the same whatever the process count."""
        if jax.process_count() == 1:
            return {k: jax.device_put(np.asarray(v), self.batch_sharding) for k, v in batch.items()}
        shape = (self.exp.data.batch_size, self.exp.data.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v), shape)
                for k, v in batch.items()}


def setup_run(exp, workdir: str | os.PathLike) -> Run:
    check_config(exp)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = model_config_from(exp).replace(precision=exp.precision)
    tokenizer = make_tokenizer(exp.data.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"config.model vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; set config.model.overrides.vocab_size")
    mesh = mesh_lib.make_mesh(dict(exp.mesh))

    schedule = wsd_schedule(exp.optim.lr, exp.steps, exp.optim.warmup_steps, exp.optim.decay_fraction,
                            exp.optim.min_lr_ratio, exp.optim.decay_shape)
    optimizer = make_optimizer(schedule, b1=exp.optim.b1, b2=exp.optim.b2, weight_decay=exp.optim.weight_decay,
                               clip_norm=exp.optim.clip_norm)
    with jax.set_mesh(mesh):
        model = M.init_model(cfg, seed=exp.seed)
    graphdef, state = init_train_state(model, optimizer, exp.seed)
    del model
    rules = rules_of(cfg)
    p_sh = shardings(state.params, mesh, rules)
    r_sh = shardings(state.rest, mesh, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    state_sh = TrainState(rep, p_sh, r_sh, mesh_lib.opt_state_shardings(optimizer, state.opt_state, p_sh, mesh), rep)
    state = jax.device_put(state, state_sh)

    # every process packs the same global batches and keeps the rows its devices hold (data/pipeline.py)
    b_sh = batch_sharding(mesh, rules)
    rows = mesh_lib.process_rows(b_sh, (exp.data.batch_size, exp.data.seq_len))
    local_bs = len(rows)
    data_kw = dict(source=exp.data.source, tokenizer=tokenizer, seq_len=exp.data.seq_len,
                   validation_fraction=exp.data.validation_fraction, rows=rows)
    train_iter = iter(make_dataset(split="train", batch_size=exp.data.batch_size, seed=exp.seed,
                                   worker_count=exp.data.worker_count, **data_kw))

    kill_at = exp.get("debug_kill_in_save_at_step", -1)
    ckpt = Checkpointer(workdir / "checkpoints", every=exp.ckpt_every, keep=exp.ckpt_keep,
                        debug_kill_in_save_at_step=kill_at if kill_at is not None and kill_at >= 0 else None)
    record = run_record(exp, cfg)
    legacy = _record_from_config_json(workdir / "config.json") if (workdir / "config.json").exists() else None
    changes: list[str] = []

    def check_meta(step: int, meta: dict) -> None:  # before the checkpoint's arrays are read; writes nothing
        saved = meta if "model_config" in meta else (legacy or {})
        changes[:] = check_resume(saved, record, allow_schedule_change=bool(exp.get("allow_schedule_change", False)),
                                  where=f"checkpoint step {step} in {workdir / 'checkpoints'}")

    start, meta = 0, {}
    restored = ckpt.restore_latest(state, check_meta=check_meta)
    if restored is not None:
        start, state, data_state, meta = restored
        state = jax.device_put(state, state_sh)
        if data_state:
            train_iter.set_state(data_state)
        print(f"resumed from step {start} ({workdir / 'checkpoints'})", flush=True)
        if changes:
            print(f"WARNING: schedule changed on resume at step {start}: {'; '.join(changes)}", flush=True)
            if jax.process_index() == 0:
                EventLog(workdir / "events.jsonl").write(step=start, event="schedule_change", changes=changes)
    if jax.process_index() == 0:  # multi-process: one writer; only after a successful restore (or a fresh start)
        (workdir / "config.json").write_text(exp.to_json_best_effort(indent=1))
    return Run(exp, workdir, cfg, tokenizer, mesh, schedule, optimizer, graphdef, state, state_sh,
               b_sh, train_iter, ckpt, start, data_kw, local_bs, record=record, restored_meta=meta)
