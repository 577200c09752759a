"""The training loop: the jitted step over the data, validation, checkpoints, metrics, and the end-of-run plot
and sample. `train(exp, workdir)` takes an ml-collections experiment config (configs/*.py) and a work
directory; it resumes from the newest good checkpoint in `workdir/checkpoints` when there is one
(`train.run_setup`). Metrics and the plot: `train.metrics`.
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
from nemotron_jax.quant.diagnostics import weight_ftz_fraction
from nemotron_jax.train.metrics import METRIC_FIELDS, MetricsLog, plot_losses
from nemotron_jax.train.run_setup import check_config, setup_run
from nemotron_jax.train.step import make_eval_step, make_train_step

__all__ = ["check_config", "train"]


def train(exp, workdir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    run = setup_run(exp, workdir)
    cfg, mesh, state, start, workdir = run.cfg, run.mesh, run.state, run.start, run.workdir
    state_sh, b_sh, train_iter, ckpt, tokenizer = (run.state_sharding, run.batch_sharding, run.train_iter,
                                                   run.checkpointer, run.tokenizer)
    graphdef, local_bs, data_kw = run.graphdef, run.local_batch, run.data_kw
    rep = NamedSharding(mesh, PartitionSpec())
    log = MetricsLog(workdir / "metrics.csv", start)

    step_fn = jax.jit(make_train_step(cfg, graphdef, run.optimizer, run.schedule), in_shardings=(state_sh, b_sh),
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
                losses.append(float(eval_fn(state, run.global_batch(b))["loss_main"]))
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
        batch = run.global_batch(next(train_iter))
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
                row["nvfp4_ftz_fraction"] = weight_ftz_fraction(jax.device_get(state.params))
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
