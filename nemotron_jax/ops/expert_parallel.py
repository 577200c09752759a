"""Expert-parallel routed experts: jax.shard_map + lax.all_to_all at a fixed capacity per (source shard, expert).

Tokens (flattened to n) are sharded over the batch mesh axes; expert weights [e, ...] over the "expert" mesh
axis (ep shards, e_loc = e / ep experts each). Inside one shard, with t_loc local tokens:

    local copies (t_loc*k) --stable sort by expert, rank within expert--> keep rank < C (the rest are dropped)
      -> send buffer [ep, e_loc, C, i]   (row (s, j, c): c-th kept copy of this shard for expert s*e_loc + j)
      -> all_to_all over "expert"  -> [ep (source shard), e_loc, C, i]
      -> regroup [e_loc, ep*C, i]  -> ragged_dot up, relu^2, ragged_dot down over the e_loc local experts
                                      (group_sizes = ep*C each; padding rows are zero and masked)
      -> all_to_all back            -> [ep, e_loc, C, i] = [e, C, i] in the send layout
      -> gather each kept copy's row, weight by its gate, sum over k   (dropped copies add 0)

C = min(t_loc, ceil(capacity_factor * t_loc * k / e)); capacity_factor=None means C = t_loc, which never drops
(a token picks each expert at most once, so one shard sends at most t_loc copies to any expert).
With ep == 1 (a mesh with batch axes but no expert axis) each shard runs the dropless dispatch locally.
When "expert_mlp" is sharded (over "tensor"), each shard computes a slice of m and the down GEMM is psummed.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nemotron_jax.ops import moe_dispatch as md
from nemotron_jax.sharding import DEFAULT_RULES, logical_to_spec

EXPERT_AXIS = "expert"


def mesh_axis_sizes(mesh) -> dict[str, int]:
    if mesh is None or getattr(mesh, "empty", False):
        return {}
    return dict(mesh.shape)


def capacity(tokens_per_shard: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Rows per (source shard, expert) in the all-to-all buffers; None -> dropless (t_loc)."""
    if capacity_factor is None:
        return tokens_per_shard
    return max(1, min(tokens_per_shard, math.ceil(capacity_factor * tokens_per_shard * k / num_experts)))


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _rank_within_expert(ids_c: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """For each copy, its 0-based rank among this shard's copies of the same expert (in copy order); counts [e]."""
    order = jnp.argsort(ids_c, stable=True)
    counts = jnp.bincount(ids_c, length=num_experts).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(ids_c.shape[0], dtype=jnp.int32) - starts[ids_c[order]]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    return rank, counts


def sharded_experts(x_nd: jax.Array, idx_nk: jax.Array, gates_nk: jax.Array, w_up_eim: jax.Array,
                    w_down_emi: jax.Array, *, mesh, capacity_factor: float | None,
                    ragged_dot: md.RaggedDot = md.default_ragged_dot, gemm_state=None,
                    rules: Sequence[tuple[str, object]] = DEFAULT_RULES
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Routed-expert output y_nd, global per-expert copy counts [e] int32, dropped copies (int32 scalar).

    `mesh`: a Mesh or AbstractMesh (e.g. jax.sharding.get_abstract_mesh() under jax.set_mesh). Token axis n is
    sharded over the mesh axes the "batch" rule names; expert weights follow the "expert"/"expert_mlp" rules.
    `gemm_state`: arrays a stateful grouped GEMM needs (opaque here, e.g. a rounding key); when given, each
    shard calls `ragged_dot(..., state=gemm_state, shard=i)` with i its index along the token axes. It enters
    the shard_map as a replicated argument, since a shard_map body cannot close over arrays.
    """
    sizes = mesh_axis_sizes(mesh)
    names = tuple(sizes)
    batch_axes = _axes_of(logical_to_spec(("batch",), rules, names)[0])
    up_spec = logical_to_spec(("expert", "expert_in", "expert_mlp"), rules, names)
    down_spec = logical_to_spec(("expert", "expert_mlp", "expert_in"), rules, names)
    ep_axes = _axes_of(up_spec[0])
    mlp_axes = _axes_of(up_spec[2])
    if ep_axes not in ((), (EXPERT_AXIS,)):
        raise ValueError(f"expert weights must shard over at most the {EXPERT_AXIS!r} mesh axis, got {ep_axes}")
    ep = sizes.get(EXPERT_AXIS, 1) if ep_axes else 1
    if ep > 1 and EXPERT_AXIS not in batch_axes:
        raise ValueError(f"the 'batch' rule must include the {EXPERT_AXIS!r} mesh axis for expert parallelism "
                         f"(tokens are exchanged over it); got batch axes {batch_axes}")

    n, k = idx_nk.shape
    num_experts = w_up_eim.shape[0]
    n_shards = math.prod(sizes[a] for a in batch_axes)
    if n % n_shards:
        raise ValueError(f"{n} tokens (batch x seq) do not split over the {n_shards} batch shards "
                         f"{batch_axes}; use a batch size divisible by the data-parallel degree")
    if num_experts % ep:
        raise ValueError(f"n_routed_experts={num_experts} is not divisible by the expert-parallel degree {ep}")
    t_loc = n // n_shards
    cap = capacity(t_loc, k, num_experts, capacity_factor)
    e_loc = num_experts // ep
    tok = P(batch_axes or None)

    # A custom-VJP GEMM (NVFP4's) returns dW varying over every axis the tokens vary over and dx
    # varying over every axis the weights vary over, and its outputs must match its inputs' types:
    # so each operand enters already varying over the other's axes, and autodiff sums dW over the
    # token shards and dx over the m-slices (what it does implicitly for plain GEMMs).
    w_missing = tuple(a for a in batch_axes if a not in ep_axes + mlp_axes)
    x_missing = tuple(a for a in mlp_axes if a not in batch_axes)

    def body(state, x, idx, gates, w_up, w_down):
        if w_missing:
            w_up, w_down = (jax.lax.pcast(w, w_missing, to="varying") for w in (w_up, w_down))
        if x_missing:
            x = jax.lax.pcast(x, x_missing, to="varying")
        gemm = ragged_dot
        if state is not None:  # shards holding other tokens get another index; m-slices of one token shard share it
            shard = jax.lax.axis_index(batch_axes) if batch_axes else None
            gemm = functools.partial(ragged_dot, state=state, shard=shard)
        return shard_body(x, idx, gates, w_up, w_down, gemm)

    def shard_body(x, idx, gates, w_up, w_down, ragged_dot):
        w_up, w_down = w_up.astype(x.dtype), w_down.astype(x.dtype)
        if ep == 1:
            y, counts = md.dropless_experts(x, idx, gates, w_up, w_down, ragged_dot)
            dropped = jnp.zeros((), jnp.int32)
        else:
            ids = idx.reshape(-1)  # [t_loc*k]
            rank, counts = _rank_within_expert(ids, num_experts)
            keep = rank < cap
            slot = jnp.where(keep, ids * cap + rank, num_experts * cap)  # out of range -> dropped
            x_copies = x[jnp.arange(ids.shape[0]) // k]
            send = jnp.zeros((num_experts * cap, x.shape[-1]), x.dtype).at[slot].set(x_copies, mode="drop")
            valid = jnp.zeros((num_experts * cap,), x.dtype).at[slot].set(1, mode="drop")
            send = send.reshape(ep, e_loc, cap, -1)
            valid = valid.reshape(ep, e_loc, cap)
            recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # dim 0: source shard
            rvalid = jax.lax.all_to_all(valid, EXPERT_AXIS, 0, 0, tiled=True)
            rows = recv.transpose(1, 0, 2, 3).reshape(e_loc * ep * cap, -1)  # grouped by local expert
            sizes_g = jnp.full((e_loc,), ep * cap, jnp.int32)
            y_rows = md.expert_mlp(rows, w_up, w_down, sizes_g, ragged_dot)
            y_rows = y_rows.reshape(e_loc, ep, cap, -1) * rvalid.transpose(1, 0, 2)[..., None]
            back = jax.lax.all_to_all(y_rows.transpose(1, 0, 2, 3), EXPERT_AXIS, 0, 0, tiled=True)
            back = back.reshape(num_experts * cap, -1)
            y_copies = jnp.take(back, slot, axis=0, mode="fill", fill_value=0).reshape(-1, k, back.shape[-1])
            y = md.combine(y_copies, gates, x.dtype)
            dropped = jnp.sum(~keep).astype(jnp.int32)
        if mlp_axes:  # each shard holds a slice of m: the partial outputs add up (everything after is linear)
            y = jax.lax.psum(y, mlp_axes)
        if batch_axes:
            counts = jax.lax.psum(counts, batch_axes)
            dropped = jax.lax.psum(dropped, batch_axes)
        return y, counts, dropped

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), tok, tok, tok, up_spec, down_spec),
                       out_specs=(tok, P(), P()))
    return fn(gemm_state, x_nd, idx_nk, gates_nk, w_up_eim, w_down_emi)
