"""The pure, jittable train step: loss (main + MTP + MoE aux), AdamW update, router-bias update, metrics.

A step whose loss or gradients are not finite is skipped inside the step: the update of the whole state
(parameters, optimizer state, router biases and the step counter) is one branch of a `lax.cond` whose other
branch returns the old state, so a skipped step leaves the state bit for bit as it was and the step stays one
compile. `TrainState.step` counts *applied* updates: it is what the schedule and AdamW's bias correction read
(optax's own count lives in the optimizer state and is held with it), so k skipped steps leave the schedule k
steps behind the data (optax.apply_if_finite's convention). The batch of a skipped step is consumed, not
retried. The loop counts the skips from `metrics["skipped"]` (`train.loop`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.losses import total_loss
from nemotron_jax.ops.moe_dispatch import load_stats


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied (skipped non-finite steps do not count)
    params: Any  # nnx.State of nnx.Param (fp32 masters)
    rest: Any  # nnx.State of everything else (router correction biases)
    opt_state: Any
    rng: jax.Array  # raw uint32[2] base key (checkpointable); step keys are fold_in(rng, step)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, optimizer.init(params), jax.random.PRNGKey(seed))
    return graphdef, state


def make_train_step(cfg: ModelConfig, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], *, debug_nan_at_steps: Sequence[int] = ()):
    """Returns train_step(state, batch, data_step=None) -> (state, metrics); batch holds tokens, segment_ids,
    loss_mask [b, t]. `data_step` is the loop's 1-based step number (a replicated int32 scalar); it only matters
    with `debug_nan_at_steps` (tests): at those steps the loss, and so every gradient, is multiplied by NaN.
    metrics["skipped"] is 1 where the step was skipped (non-finite loss or gradients), else 0."""
    nan_steps = tuple(int(s) for s in debug_nan_at_steps)

    def loss_fn(params, rest, batch, key, poison):
        out = M.apply(graphdef, (params, rest), batch["tokens"], segment_ids=batch.get("segment_ids"), quant_key=key)
        loss, metrics = total_loss(cfg, out, batch["tokens"], batch.get("segment_ids"), batch.get("loss_mask"))
        if poison is not None:
            loss = loss * poison
            metrics = dict(metrics, loss=metrics["loss"] * poison)
        return loss, (metrics, out.expert_loads, out)

    def train_step(state: TrainState, batch: dict, data_step=None) -> tuple[TrainState, dict]:
        # the arrays of the incoming state, taken before anything runs: merging a module can write its Variables in
        # place (the forward sets the quant key, the router-bias update the biases), so the skip branch returns
        # these arrays rather than whatever `state`'s Variables hold after tracing
        old_leaves = jax.tree.leaves(state)
        key = jax.random.fold_in(state.rng, state.step)
        poison = None
        if nan_steps and data_step is not None:
            hit = jnp.any(jnp.asarray(data_step) == jnp.asarray(nan_steps, jnp.int32))
            poison = jnp.where(hit, jnp.float32(jnp.nan), jnp.float32(1.0))
        (loss, (metrics, counts, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, batch, key, poison)
        # One scalar test instead of a pass over every gradient: a NaN or inf anywhere makes the global norm
        # non-finite (and so does a finite norm that overflows fp32, which clipping could not rescue either).
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        norm_arg = {"global_norm": grad_norm} if isinstance(optimizer, optax.GradientTransformationExtraArgs) else {}

        def apply(grads, st: TrainState) -> TrainState:
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params, **norm_arg)
            params = optax.apply_updates(st.params, updates)
            rest = M.updated_router_biases(graphdef, params, st.rest, counts) if counts else st.rest
            return TrainState(st.step + 1, params, rest, opt_state, st.rng)

        # skip: a cond, not a select of every leaf: the skipped branch returns the old state as it was, and the
        # applied one writes the update without a second pass over parameters and moments (bench model fp32 step
        # 3% faster than the select, docs/benchmarks.md). The clipping inside (optim.clip_by_global_norm) takes
        # the norm as an operand: XLA would not share its own recomputation across the cond boundary.
        old = jax.tree.unflatten(jax.tree.structure(state), old_leaves)
        new = jax.lax.cond(finite, apply, lambda grads, st: st, grads, old)
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = schedule(state.step)
        if counts:
            total = sum(counts.values())
            stats = load_stats(total)
            metrics["expert_max_over_mean"] = stats["max_over_mean"]
        metrics["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
        return new, metrics

    return train_step


def make_eval_step(cfg: ModelConfig, graphdef: nnx.GraphDef):
    def eval_step(state: TrainState, batch: dict) -> dict:
        out = M.apply(graphdef, (state.params, state.rest), batch["tokens"], segment_ids=batch.get("segment_ids"))
        _, metrics = total_loss(cfg, out, batch["tokens"], batch.get("segment_ids"), batch.get("loss_mask"))
        return metrics

    return eval_step
