"""The training loop: the jitted step over the data, validation, checkpoints, metrics, and the end-of-run plot
and sample. `train(exp, workdir)` takes an ml-collections experiment config (configs/*.py) and a work
directory; it resumes from the newest good checkpoint in `workdir/checkpoints` when there is one
(`train.run_setup`). Metrics and the plot: `train.metrics`.

Non-finite steps: the step itself skips an update whose loss or gradients are not finite (`train.step`); the loop
reads the step's `skipped` flag every step (one scalar), prints a warning, writes that step's metrics row (with the
cumulative `skipped_steps` column) and an `events.jsonl` line. After `config.max_consecutive_skips` skipped steps in
a row (0: never stop) it saves a checkpoint of the current state, which is the last good one since skipped steps
change nothing, and raises `NonFiniteError`. Test switches: `config.debug_nan_at_steps` (NaN loss and gradients at
those 1-based steps), `config.debug_kill_after_step`, `config.debug_kill_in_save_at_step`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from nemotron_jax.data import make_dataset, unigram_baseline
from nemotron_jax.inference.detokenize import safe_decode
from nemotron_jax.inference.engine import generate
from nemotron_jax.platform import host_allocator, on_cpu
from nemotron_jax.quant.diagnostics import weight_ftz_fraction
from nemotron_jax.train.metrics import METRIC_FIELDS, EventLog, MetricsLog, plot_losses
from nemotron_jax.train.run_setup import check_config, setup_run
from nemotron_jax.train.step import make_eval_step, make_train_step

__all__ = ["NonFiniteError", "check_config", "train"]


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient; the last good state is checkpointed."""


def train(exp, workdir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    run = setup_run(exp, workdir)
    cfg, mesh, state, start, workdir = run.cfg, run.mesh, run.state, run.start, run.workdir
    state_sh, b_sh, train_iter, ckpt, tokenizer = (run.state_sharding, run.batch_sharding, run.train_iter,
                                                   run.checkpointer, run.tokenizer)
    graphdef, local_bs, data_kw = run.graphdef, run.local_batch, run.data_kw
    rep = NamedSharding(mesh, PartitionSpec())
    primary = jax.process_index() == 0  # multi-process: every process computes, process 0 writes the files
    log = MetricsLog(workdir / "metrics.csv", start, write=primary)
    events = EventLog(workdir / "events.jsonl", write=primary)
    nan_steps = tuple(int(s) for s in (exp.get("debug_nan_at_steps") or ()))  # tests: inject a non-finite step
    max_skips = int(exp.get("max_consecutive_skips", 10))
    step_fn = jax.jit(make_train_step(cfg, graphdef, run.optimizer, run.schedule, debug_nan_at_steps=nan_steps),
                      in_shardings=(state_sh, b_sh, rep) if nan_steps else (state_sh, b_sh),
                      out_shardings=(state_sh, rep), donate_argnums=0)
    step_extra = (lambda s: (np.int32(s),)) if nan_steps else (lambda s: ())
    skipped_total = int(run.restored_meta.get("skipped_steps", 0))
    consecutive, skip_run_start = 0, None

    def save(step: int) -> None:
        ckpt.save(step, state, train_iter.get_state(), extra=dict(run.record, skipped_steps=skipped_total))

    eval_fn = jax.jit(make_eval_step(cfg, graphdef), in_shardings=(state_sh, b_sh), out_shardings=rep)

    def validate() -> float:
        it = iter(make_dataset(split="validation", batch_size=exp.data.batch_size, seed=0, shuffle=False, **data_kw))
        losses = []
        for _ in range(exp.eval_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            with jax.set_mesh(mesh):
                losses.append(float(eval_fn(state, run.global_batch(b))["loss_main"]))
        return float(np.mean(losses)) if losses else float("nan")

    baseline = unigram_baseline("validation", tokenizer, exp.data.source,
                                validation_fraction=exp.data.validation_fraction)
    print(f"model {exp.model.preset} ({cfg.precision}), mesh {dict(mesh.shape)}, {exp.steps} steps of "
          f"{exp.data.batch_size}x{exp.data.seq_len} tokens; unigram baseline {baseline:.4f} nats/token"
          + (f"; host malloc {host_allocator()}" if on_cpu() else ""), flush=True)

    bar = None
    if progress and primary:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=exp.steps, initial=start, desc="train", dynamic_ncols=True)
    tokens_per_step = exp.data.batch_size * exp.data.seq_len
    t_last, steps_since = time.perf_counter(), 0
    val_loss = float("nan")
    first_loss = None
    for step in range(start + 1, exp.steps + 1):
        batch = run.global_batch(next(train_iter))
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, batch, *step_extra(step))
        steps_since += 1
        row = None
        skipped = bool(jax.device_get(metrics["skipped"]))
        if skipped:
            skipped_total += 1
            consecutive += 1
            skip_run_start = step if consecutive == 1 else skip_run_start
            loss_now = float(jax.device_get(metrics["loss"]))
            print(f"WARNING: step {step}: non-finite loss ({loss_now}) or gradients; the step is skipped (no update "
                  f"to parameters, optimizer state or router biases); {consecutive} in a row, {skipped_total} in all",
                  flush=True)
            events.write(step=step, event="skipped_nonfinite", loss=str(loss_now), consecutive=consecutive)
        else:
            consecutive = 0
        if skipped or step % exp.log_every == 0 or step == exp.steps or step == start + 1:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            row = {k: float(v) for k, v in metrics.items() if k in METRIC_FIELDS}
            row.update(step=step, tokens_per_s=tokens_per_step * steps_since / (now - t_last))
            t_last, steps_since = now, 0
            row["skipped_steps"] = skipped_total
            if first_loss is None:
                first_loss = row["loss_main"]
        if exp.eval_every and (step % exp.eval_every == 0 or step == exp.steps):
            val_loss = validate()
            row = row or {"step": step}
            row["val_loss"] = val_loss
            if cfg.precision == "nvfp4":
                row["nvfp4_ftz_fraction"] = weight_ftz_fraction(jax.device_get(state.params))
        if row is not None:
            log.write(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row.get('loss_main', float('nan')):.3f}", val=f"{val_loss:.3f}",
                                tok_s=f"{row.get('tokens_per_s', 0):,.0f}")
        stop = bool(max_skips) and consecutive >= max_skips
        if ckpt.should_save(step) or step == exp.steps or stop:
            save(step)
        if stop:
            msg = (f"stopped at step {step}: {consecutive} consecutive steps ({skip_run_start}..{step}) had a "
                   f"non-finite loss or gradients (config.max_consecutive_skips={max_skips}); {skipped_total} skipped "
                   f"in all. The last good state is saved as checkpoint {step} in {workdir / 'checkpoints'} (skipped "
                   f"steps change nothing). Lower config.optim.lr (resuming with another schedule needs "
                   f"--config.allow_schedule_change=True), check the data, or raise config.max_consecutive_skips")
            events.write(step=step, event="stopped_nonfinite", consecutive=consecutive, skipped_total=skipped_total)
            if bar is not None:
                bar.close()
            log.close()
            ckpt.close()
            raise NonFiniteError(msg)
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
    if primary:
        plot_losses(log.rows, baseline, workdir / "loss.png", f"{exp.model.preset} ({cfg.precision})")
    text = None
    if exp.sample.length > 0:  # 0 skips the sample (and its prefill / decode compiles)
        prompt = tokenizer.encode(exp.sample.prompt)
        out = generate((graphdef, (state.params, state.rest)), [prompt], max_new_tokens=exp.sample.length,
                       temperature=exp.sample.temperature, top_k=exp.sample.get("top_k"),
                       top_p=exp.sample.get("top_p", 1.0), seed=exp.seed)
        text = exp.sample.prompt + safe_decode(tokenizer, out.tokens[0])  # ids past the tokenizer's end: U+FFFD
        if primary:
            (workdir / "sample.txt").write_text(text)
    summary = {"steps": exp.steps, "val_loss": val_loss, "unigram_baseline": baseline, "first_train_loss": first_loss,
               "precision": cfg.precision, "sample": text}
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
