"""MoE array functions: routing, dropless sort-by-expert dispatch with grouped GEMMs, combine, load balancing.

Shapes in names: n tokens (flattened batch x seq), k experts per token, e experts, d / i widths, m expert
intermediate, g groups (= experts) of a ragged GEMM. Everything here is a pure function of arrays; the NNX
module (nemotron_jax.layers.moe) owns the parameters and calls these.

Data path of the dropless single-device dispatch (`dropless_experts`):

    x_nd, idx_nk, gate_nk
      -> copies: token n appears k times, copy c = n*k + j goes to expert idx[n, j]
      -> order = stable argsort(expert id of each copy)          (copies grouped by expert)
      -> group_sizes_e = bincount(expert ids)                    (rows per expert, sums to n*k)
      -> up:   ragged_dot(x[order // k], W_up_eim, group_sizes)  -> relu(.)^2
      -> down: ragged_dot(h, W_down_emi, group_sizes)
      -> unsort (gather with the inverse permutation), weight by gates, sum over k -> y_nd
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from nemotron_jax import platform
from nemotron_jax.ops.activations import relu2
from nemotron_jax.ops.grouped_gemm import cpu_ragged_dot

RaggedDot = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_mk, w_gkn, group_sizes_g) -> y_mn


# ----------------------------------------------------------------------------- grouped GEMM
def reference_ragged_dot(x_mk: jax.Array, w_gkn: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The oracle: jax.lax.ragged_dot (rows of group j, taken in order, multiply w[j])."""
    return jax.lax.ragged_dot(x_mk, w_gkn, group_sizes.astype(jnp.int32))


def default_ragged_dot(x_mk: jax.Array, w_gkn: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The grouped GEMM of the routed experts, by backend.

    CPU: `grouped_gemm.cpu_ragged_dot`: each row's expert weight gathered for decode-size row counts; from 64
    rows per expert on average `capacity_ragged_dot` (one batched GEMM over a mean-sized window of rows per
    expert, tiles for the rows past it; 1.15-1.2x a dense GEMM of the same FLOPs fwd+bwd on the bench MoE in fp32),
    below that the tiled `blocked_ragged_dot` (ragged_dot's CPU lowering is ~20x); else tokamax's XLA path.
    GPU/TPU: `tokamax.ragged_dot` (Mosaic kernel on Hopper). Same signature as the NVFP4 replacement a
    precision policy may install on `RoutedExperts.ragged_dot`.
    """
    on_cpu = platform.on_cpu()
    if on_cpu and (y := cpu_ragged_dot(x_mk, w_gkn, group_sizes)) is not None:
        return y
    import tokamax  # noqa: PLC0415  (a hard dependency; imported here to keep module import light)

    return tokamax.ragged_dot(x_mk, w_gkn, group_sizes.astype(jnp.int32), implementation="xla" if on_cpu else None)


def expert_mlp(x_mi: jax.Array, w_up_eim: jax.Array, w_down_emi: jax.Array, group_sizes_e: jax.Array,
               ragged_dot: RaggedDot = default_ragged_dot) -> jax.Array:
    """Non-gated squared-ReLU MLP per expert on rows already grouped by expert (group j = expert j)."""
    h_mm = relu2(ragged_dot(x_mi, w_up_eim, group_sizes_e))
    return ragged_dot(h_mm, w_down_emi, group_sizes_e)


# ----------------------------------------------------------------------------- routing
def router_scores(h_nd: jax.Array, kernel_de: jax.Array) -> jax.Array:
    """s = sigmoid(h W) in fp32 whatever the compute dtype."""
    logits = jnp.einsum("...d,de->...e", h_nd.astype(jnp.float32), kernel_de.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return jax.nn.sigmoid(logits)


def select_experts(scores_ne: jax.Array, bias_e: jax.Array, k: int, n_group: int = 1,
                   topk_group: int = 1) -> jax.Array:
    """Expert ids [.., k] = topk(s + bias), group-limited as HF NemotronH (DeepseekV3 router) when n_group > 1.

    Group-limited (HF semantics, transformers 5.24 modeling_nemotron_h.py): on the biased scores, group score =
    sum of the top-2 scores in each of the n_group contiguous groups; keep the topk_group best groups; biased
    scores of experts in other groups are set to -inf (masked_fill), so a dropped group is never chosen even when
    the kept groups' biased scores are negative; then topk over all experts. Not differentiable (indices only).
    """
    biased = jax.lax.stop_gradient(scores_ne.astype(jnp.float32) + bias_e.astype(jnp.float32))
    e = biased.shape[-1]
    if n_group > 1:
        lead = biased.shape[:-1]
        grouped = biased.reshape(*lead, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, min(2, e // n_group))[0].sum(-1)  # [.., n_group]
        _, keep_groups = jax.lax.top_k(group_scores, topk_group)  # [.., topk_group]
        group_mask = jnp.any(keep_groups[..., :, None] == jnp.arange(n_group), axis=-2)  # [.., n_group]
        expert_mask = jnp.repeat(group_mask, e // n_group, axis=-1)
        biased = jnp.where(expert_mask, biased, -jnp.inf)
    _, idx = jax.lax.top_k(biased, k)
    return idx


def route(scores_ne: jax.Array, bias_e: jax.Array, *, k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(gates [.., k] fp32, idx [.., k] int32): the bias only selects; gates come from the unbiased scores."""
    idx = select_experts(scores_ne, bias_e, k, n_group, topk_group)
    gates = jnp.take_along_axis(scores_ne.astype(jnp.float32), idx, axis=-1)
    if norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    return gates * routed_scaling_factor, idx.astype(jnp.int32)


# ----------------------------------------------------------------------------- dispatch / combine
def sort_by_expert(idx_nk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(order [n*k], inverse [n*k], group_sizes [e]) for the flattened token copies (copy c = n*k + j)."""
    flat = idx_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, inverse, group_sizes


def combine(y_copies_nkd: jax.Array, gates_nk: jax.Array, out_dtype) -> jax.Array:
    """Gate-weighted sum over the k copies of each token, accumulated in fp32."""
    y = jnp.einsum("nkd,nk->nd", y_copies_nkd.astype(jnp.float32), gates_nk.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype)


def dropless_experts(x_nd: jax.Array, idx_nk: jax.Array, gates_nk: jax.Array, w_up_eim: jax.Array,
                     w_down_emi: jax.Array, ragged_dot: RaggedDot = default_ragged_dot
                     ) -> tuple[jax.Array, jax.Array]:
    """Routed-expert output y_nd (dtype of x) and the per-expert copy counts [e] int32; no token is dropped."""
    n, k = idx_nk.shape
    num_experts = w_up_eim.shape[0]
    order, inverse, group_sizes = sort_by_expert(idx_nk, num_experts)
    x_sorted = x_nd[order // k]  # [n*k, d]: copies grouped by expert
    y_sorted = expert_mlp(x_sorted, w_up_eim.astype(x_nd.dtype), w_down_emi.astype(x_nd.dtype), group_sizes,
                          ragged_dot)
    y_copies = y_sorted[inverse].reshape(n, k, -1)  # back to (token, slot) order
    return combine(y_copies, gates_nk, x_nd.dtype), group_sizes


# ----------------------------------------------------------------------------- load balancing
def expert_counts(idx: jax.Array, num_experts: int) -> jax.Array:
    """Token copies per expert [e] int32 over all leading dims of idx [..., k]."""
    return jnp.bincount(idx.reshape(-1), length=num_experts).astype(jnp.int32)


def sequence_aux_loss(scores_bte: jax.Array, k: int) -> jax.Array:
    """Sequence-level balance loss (without the coefficient): mean_b E * sum_i f_bi P_bi.

    f_bi = count_bi / (T k) with counts from top-k of the UNBIASED scores (no correction bias, no group limit);
    P_bi = mean_t s_bti / sum_e s_bte. Written as a gather of P at the chosen ids, which equals sum_i f_i P_i
    without an [b, t, k, e] one-hot. Gradient flows through P only.
    """
    b, t, e = scores_bte.shape
    s = scores_bte.astype(jnp.float32)
    _, top = jax.lax.top_k(jax.lax.stop_gradient(s), k)  # [b, t, k]
    p_be = jnp.mean(s / s.sum(-1, keepdims=True), axis=1)  # [b, e]
    p_at_choice = jnp.take_along_axis(p_be[:, None, :], top.reshape(b, 1, t * k), axis=-1)  # [b, 1, t*k]
    per_seq = e * p_at_choice.sum((1, 2)) / (t * k)
    return per_seq.mean()


def update_router_bias(bias_e: jax.Array, counts_e: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing step: b_i += rate * sign(mean_load - load_i) (fp32, outside the gradient)."""
    load = counts_e.astype(jnp.float32)
    return (bias_e.astype(jnp.float32) + rate * jnp.sign(load.mean() - load)).astype(bias_e.dtype)


def load_stats(counts_e: jax.Array) -> dict[str, jax.Array]:
    """Per-expert load summary for logging: max/mean and min/mean load ratios, coefficient of variation."""
    load = counts_e.astype(jnp.float32)
    mean = jnp.maximum(load.mean(), 1e-9)
    return {"max_over_mean": load.max() / mean, "min_over_mean": load.min() / mean, "cv": load.std() / mean}
