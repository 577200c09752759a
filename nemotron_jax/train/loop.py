"""The training run: config checks, mesh placement, the jitted step, validation, checkpoints, metrics, plot, sample.

`train(exp, workdir)` takes an ml-collections experiment config (configs/*.py) and a work directory; it
resumes from the newest good checkpoint in `workdir/checkpoints` when there is one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nemotron_jax import model as M
from nemotron_jax.config import PRECISIONS, ConfigError
from nemotron_jax.data import make_dataset, make_tokenizer, unigram_baseline
from nemotron_jax.experiment import model_config_from
from nemotron_jax.inference.detokenize import safe_decode
from nemotron_jax.inference.engine import generate
from nemotron_jax.train import mesh as mesh_lib
from nemotron_jax.train.checkpoint import Checkpointer
from nemotron_jax.train.optim import make_optimizer, wsd_schedule
from nemotron_jax.train.step import TrainState, init_train_state, make_eval_step, make_train_step

METRIC_FIELDS = ("step", "loss", "loss_main", "aux_loss", "loss_mtp_1", "loss_mtp_2", "grad_norm", "lr",
                 "tokens_per_s", "expert_max_over_mean", "val_loss", "nvfp4_ftz_fraction")


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


class MetricsLog:
    """CSV metrics (truncated to the resumed step, so a resumed run's file reads like an uninterrupted one)."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.rows = rows
        self.tb = None
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in METRIC_FIELDS}
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v != "":
                    self.tb.add_scalar(k, float(v), int(row["step"]))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def plot_losses(rows: list[dict], baseline: float, path: pathlib.Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tr = [(int(r["step"]), float(r["loss_main"])) for r in rows if r.get("loss_main") not in ("", None)]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (next-token CE)", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5)
    ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _ftz_fraction(params, nvfp4_linears: list[str]) -> float:
    """Mean flush-to-zero fraction of the weights the precision policy runs in NVFP4, quantized as the forward
    pass does (16x16 tiles; zero padding to whole tiles adds no non-zero values, so it changes nothing)."""
    from nemotron_jax.quant.diagnostics import quant_stats  # noqa: PLC0415

    fr = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if x.ndim >= 2 and any(name.startswith(p + ".") for p in nvfp4_linears):
            pad = [(0, 0)] * (x.ndim - 2) + [(0, (-s) % 16) for s in x.shape[-2:]]
            fr.append(quant_stats(jnp.pad(jnp.asarray(x), pad), fmt="nvfp4", block=(16, 16))["ftz"])
    return float(np.mean(fr)) if fr else 0.0


def train(exp, workdir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
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
    nvfp4_linears = []
    if cfg.precision == "nvfp4":
        from nemotron_jax.layers.precision import apply_precision_policy  # noqa: PLC0415
        nvfp4_linears = [name for name, fmt in apply_precision_policy(model) if fmt == "nvfp4"]
    graphdef, state = init_train_state(model, optimizer, exp.seed)
    del model
    p_sh = mesh_lib.state_shardings(state.params, mesh)
    r_sh = mesh_lib.state_shardings(state.rest, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    state_sh = TrainState(rep, p_sh, r_sh, mesh_lib.opt_state_shardings(optimizer, state.opt_state, p_sh, mesh), rep)
    state = jax.device_put(state, state_sh)
    b_sh = mesh_lib.batch_sharding(mesh)

    local_bs = exp.data.batch_size // jax.process_count()
    data_kw = dict(source=exp.data.source, tokenizer=tokenizer, seq_len=exp.data.seq_len,
                   validation_fraction=exp.data.validation_fraction)
    train_iter = iter(make_dataset(split="train", batch_size=local_bs, seed=exp.seed, worker_count=exp.data.worker_count,
                                   **data_kw))

    ckpt = Checkpointer(workdir / "checkpoints", every=exp.ckpt_every, keep=exp.ckpt_keep)
    start = 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        start, state, data_state, _ = restored
        state = jax.device_put(state, state_sh)
        if data_state:
            train_iter.set_state(data_state)
        print(f"resumed from step {start} ({workdir / 'checkpoints'})", flush=True)
    log = MetricsLog(workdir / "metrics.csv", start)

    step_fn = jax.jit(make_train_step(cfg, graphdef, optimizer, schedule), in_shardings=(state_sh, b_sh),
                      out_shardings=(state_sh, rep), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(cfg, graphdef), in_shardings=(state_sh, b_sh), out_shardings=rep)

    def validate() -> float:
        it = iter(make_dataset(split="validation", batch_size=local_bs, seed=0, shuffle=False, **data_kw))
        losses = []
        for _ in range(exp.eval_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            with jax.set_mesh(mesh):
                losses.append(float(eval_fn(state, _global_batch(b, b_sh))["loss_main"]))
        return float(np.mean(losses)) if losses else float("nan")

    baseline = unigram_baseline("validation", tokenizer, exp.data.source,
                                validation_fraction=exp.data.validation_fraction)
    print(f"model {exp.model.preset} ({cfg.precision}), mesh {dict(mesh.shape)}, {exp.steps} steps of "
          f"{exp.data.batch_size}x{exp.data.seq_len} tokens; unigram baseline {baseline:.4f} nats/token", flush=True)

    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=exp.steps, initial=start, desc="train", dynamic_ncols=True)
    tokens_per_step = exp.data.batch_size * exp.data.seq_len
    t_last, steps_since = time.perf_counter(), 0
    val_loss = float("nan")
    first_loss = None
    for step in range(start + 1, exp.steps + 1):
        batch = _global_batch(next(train_iter), b_sh)
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, batch)
        steps_since += 1
        row = None
        if step % exp.log_every == 0 or step == exp.steps or step == start + 1:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            row = {k: float(v) for k, v in metrics.items() if k in METRIC_FIELDS}
            row.update(step=step, tokens_per_s=tokens_per_step * steps_since / (now - t_last))
            t_last, steps_since = now, 0
            if first_loss is None:
                first_loss = row["loss_main"]
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss is {row['loss']} at step {step}; lower config.optim.lr")
        if exp.eval_every and (step % exp.eval_every == 0 or step == exp.steps):
            val_loss = validate()
            row = row or {"step": step}
            row["val_loss"] = val_loss
            if cfg.precision == "nvfp4":
                row["nvfp4_ftz_fraction"] = _ftz_fraction(jax.device_get(state.params), nvfp4_linears)
        if row is not None:
            log.write(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row.get('loss_main', float('nan')):.3f}", val=f"{val_loss:.3f}",
                                tok_s=f"{row.get('tokens_per_s', 0):,.0f}")
        if ckpt.should_save(step) or step == exp.steps:
            ckpt.save(step, state, train_iter.get_state())
        if bar is not None:
            bar.update(1)
        if exp.debug_kill_after_step == step:  # tests: die like a crashed or pre-empted job
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    log.close()
    ckpt.close()

    if not math.isfinite(val_loss):
        val_loss = validate()
    plot_losses(log.rows, baseline, workdir / "loss.png", f"{exp.model.preset} ({cfg.precision})")
    prompt = tokenizer.encode(exp.sample.prompt)
    out = generate((graphdef, (state.params, state.rest)), [prompt], max_new_tokens=exp.sample.length,
                   temperature=exp.sample.temperature, top_k=exp.sample.get("top_k"), top_p=exp.sample.get("top_p", 1.0),
                   seed=exp.seed)
    text = exp.sample.prompt + safe_decode(tokenizer, out.tokens[0])  # ids past the tokenizer's end show as U+FFFD
    (workdir / "sample.txt").write_text(text)
    summary = {"steps": exp.steps, "val_loss": val_loss, "unigram_baseline": baseline, "first_train_loss": first_loss,
               "precision": cfg.precision, "sample": text}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
