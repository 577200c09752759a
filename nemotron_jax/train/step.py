"""The pure, jittable train step: loss (main + MTP + MoE aux), AdamW update, router-bias update, metrics."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.moe import update_router_biases
from nemotron_jax.losses import total_loss
from nemotron_jax.ops.moe_dispatch import load_stats


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of nnx.Param (fp32 masters)
    rest: Any  # nnx.State of everything else (router correction biases)
    opt_state: Any
    rng: jax.Array  # raw uint32[2] base key (checkpointable); step keys are fold_in(rng, step)


def moe_layer_indices(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """layer_idx of the main stack's MoE layers, and of the MTP block's MoE layers (numbered after the stack)."""
    main = [i for i, c in enumerate(cfg.hybrid_override_pattern) if c == "E"]
    n = cfg.num_hidden_layers
    mtp = [n + j for j, c in enumerate(cfg.mtp_hybrid_override_pattern) if c == "E"] if cfg.mtp_enabled else []
    return main, mtp


def counts_by_layer(cfg: ModelConfig, out: M.ModelOutput) -> dict[int, jax.Array]:
    """Expert token counts per MoE layer_idx; a shared MTP MoE layer sums its counts over the depths."""
    main, mtp = moe_layer_indices(cfg)
    counts = {i: a["expert_counts"] for i, a in zip(main, out.moe_aux)}
    if mtp and out.mtp_moe_aux:
        for j, a in enumerate(out.mtp_moe_aux):
            idx = mtp[j % len(mtp)]
            counts[idx] = counts.get(idx, 0) + a["expert_counts"]
    return counts


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
        return loss, (metrics, counts_by_layer(cfg, out), out)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        (_, (metrics, counts, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = state.rest
        if counts:
            model = nnx.merge(graphdef, params, state.rest)
            update_router_biases(model, counts)
            _, _, rest = nnx.split(model, nnx.Param, ...)
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
