"""Setting up a training run from its experiment config: checks, model config, tokenizer, mesh, optimizer, the
placed train state and its shardings, data iterators, and the checkpoint restore.

`check_config(exp)` fails before any compile on what a config can get wrong; `setup_run(exp, workdir)` builds
everything the loop needs (`Run`), resuming from the newest good checkpoint when there is one.
"""

from __future__ import annotations

import dataclasses
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
from nemotron_jax.train.checkpoint import Checkpointer
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
    model_config_from(exp)  # validates the model fields


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
    local_batch: int  # this process's share of data.batch_size

    def global_batch(self, batch: dict) -> dict:
        """A host batch as a global array on the mesh (each process holds its own rows)."""
        if jax.process_count() == 1:
            return {k: jax.device_put(np.asarray(v), self.batch_sharding) for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
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
    (workdir / "config.json").write_text(exp.to_json_best_effort(indent=1))

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

    local_bs = exp.data.batch_size // jax.process_count()
    data_kw = dict(source=exp.data.source, tokenizer=tokenizer, seq_len=exp.data.seq_len,
                   validation_fraction=exp.data.validation_fraction)
    train_iter = iter(make_dataset(split="train", batch_size=local_bs, seed=exp.seed,
                                   worker_count=exp.data.worker_count, **data_kw))

    ckpt = Checkpointer(workdir / "checkpoints", every=exp.ckpt_every, keep=exp.ckpt_keep)
    start = 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        start, state, data_state, _ = restored
        state = jax.device_put(state, state_sh)
        if data_state:
            train_iter.set_state(data_state)
        print(f"resumed from step {start} ({workdir / 'checkpoints'})", flush=True)
    return Run(exp, workdir, cfg, tokenizer, mesh, schedule, optimizer, graphdef, state, state_sh,
               batch_sharding(mesh, rules), train_iter, ckpt, start, data_kw, local_bs)
