"""The pure, jittable train step: loss (main + MTP + MoE aux), AdamW update, router-bias update, metrics."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.losses import total_loss
from nemotron_jax.ops.moe_dispatch import load_stats


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of nnx.Param (fp32 masters)
    rest: Any  # nnx.State of everything else (router correction biases)
    opt_state: Any
    rng: jax.Array  # raw uint32[2] base key (checkpointable); step keys are fold_in(rng, step)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, optimizer.init(params), jax.random.PRNGKey(seed))
    return graphdef, state


def make_train_step(cfg: ModelConfig, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array]):
    """Returns train_step(state, batch) -> (state, metrics); batch holds tokens, segment_ids, loss_mask [b, t]."""

    def loss_fn(params, rest, batch, key):
        out = M.apply(graphdef, (params, rest), batch["tokens"], segment_ids=batch.get("segment_ids"), quant_key=key)
        loss, metrics = total_loss(cfg, out, batch["tokens"], batch.get("segment_ids"), batch.get("loss_mask"))
        return loss, (metrics, out.expert_loads, out)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        (_, (metrics, counts, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = M.updated_router_biases(graphdef, params, state.rest, counts) if counts else state.rest
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        if counts:
            total = sum(counts.values())
            stats = load_stats(total)
            metrics["expert_max_over_mean"] = stats["max_over_mean"]
        return TrainState(state.step + 1, params, rest, opt_state, state.rng), metrics

    return train_step


def make_eval_step(cfg: ModelConfig, graphdef: nnx.GraphDef):
    def eval_step(state: TrainState, batch: dict) -> dict:
        out = M.apply(graphdef, (state.params, state.rest), batch["tokens"], segment_ids=batch.get("segment_ids"))
        _, metrics = total_loss(cfg, out, batch["tokens"], batch.get("segment_ids"), batch.get("loss_mask"))
        return metrics

    return eval_step
