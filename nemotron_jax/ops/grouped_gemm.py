"""A grouped GEMM for the CPU: a loop over each group's rows where they lie, dense GEMMs on row tiles.

`jax.lax.ragged_dot` and tokamax's XLA path lower on CPU to work proportional to (rows x groups), which makes
MoE layers ~20x slower than the dense GEMM of the same size. Here the rows stay in place (grouped contiguously
by `group_sizes`): for each group, a while loop with a data-dependent trip count multiplies `block`-row slices
by that group's weight, and the rest of the group (rounded up to `min_block` rows) takes one tile per binary
digit, each under a `lax.cond`. No padded copy of the rows and no per-tile weight copy (the previous version
scattered rows into per-group tiles and gathered a [tiles, K, N] weight copy: 3.0x dense, fwd+bwd), so the
work is the dense GEMM's plus under `min_block` rows per group. Rows past sum(group_sizes) give zeros, as
ragged_dot does. The backward is a custom VJP over the same tiles: dx with the transposed weights, dW as
per-tile X^T dY summed per group in fp32 (autodiff through a while loop with a dynamic trip count is
impossible, and through the old scatter/gather was slow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


MIN_BLOCK = 16  # rows a group is rounded up to; measured: 16 and 32 within noise on the bench MoE


def default_block(m: int, g: int) -> int:
    """Full tile rows: the power of two at or under the mean group size, in [16, 512]. With tiles covering a
    group by the binary digits of its size, a larger cap means fewer GEMMs per group; measured on the bench
    MoE (8192 rows, 16 experts, 512 x 256): 256 and 512 within noise of each other (issue 14)."""
    mean = max(1, m // max(g, 1))
    return int(min(512, max(16, 1 << (mean.bit_length() - 1))))


def _walk(group_sizes, m: int, g: int, block: int, min_block: int, tile, carry, *, group_init=None,
          group_done=None):
    """Fold `tile(j, row0, rows, keep, carry)` over every row of every group j. Each group's rows, rounded up
    to a multiple of `min_block`, are covered by `block`-row tiles then one tile per binary digit of the rest
    (so few, large GEMMs); keep [rows] marks the tile's rows inside the group (the last tile may run past the
    group's end, or start earlier when it would run past m). `rows` is static; row0 + rows <= m.
    group_init(j, carry) / group_done(j, group_carry, carry) wrap each group (e.g. a per-group accumulator)."""
    block = max(1, min(block, m))
    min_block = max(1, min(min_block, block))
    gs = group_sizes.astype(jnp.int32)
    cum = jnp.cumsum(gs)
    ends = jnp.minimum(cum, m)  # rows past m do not exist
    starts = jnp.minimum(cum - gs, m)
    halves = []
    c = block // 2
    while c >= min_block:
        halves.append(c)
        c //= 2

    def at(j, pos, e, rows, cc):
        r0 = jnp.minimum(pos, m - rows)
        r = r0 + jnp.arange(rows)
        return tile(j, r0, rows, (r >= pos) & (r < e), cc)

    def group_body(j, outer):
        s, e = starts[j], ends[j]
        gc = group_init(j, outer) if group_init else outer
        padded = (e - s + min_block - 1) // min_block * min_block
        nf = padded // block
        gc = jax.lax.fori_loop(0, nf, lambda i, cc: at(j, s + i * block, e, block, cc), gc)
        pos = s + nf * block
        for c in halves:  # binary digits of the rest: at most one tile of each size
            take = (s + padded - pos) >= c
            # cond, not a 0/1-trip loop: XLA hoists a loop-invariant tile out of the loop and always runs it
            gc = jax.lax.cond(take, lambda cc, c=c, pos=pos: at(j, pos, e, c, cc), lambda cc: cc, gc)
            pos = pos + jnp.where(take, c, 0)
        return group_done(j, gc, outer) if group_done else gc

    return jax.lax.fori_loop(0, g, group_body, carry)


def _varying_axes(a) -> frozenset:
    t = jax.typeof(a)
    mat = getattr(t, "mat", None)  # jax 0.12: aval.mat.varying; earlier: aval.vma
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _zeros(shape, dtype, *like):
    """Zeros varying over the manual mesh axes any of `like` varies over (inside shard_map a loop carry must
    keep its type, and the tiles written into it vary with the inputs)."""
    z = jnp.zeros(shape, dtype)
    vma = frozenset().union(*(_varying_axes(a) for a in like))
    return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _rows(a, r0, rows):
    return jax.lax.dynamic_slice_in_dim(a, r0, rows, 0)


def _grouped_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype, transpose_w=False):
    """y[r] = x[r] @ w[group of r] (w[group]^T with transpose_w), fp32 accumulation, zeros past the groups."""
    m = x_mk.shape[0]
    g = w_gkn.shape[0]
    n = w_gkn.shape[1] if transpose_w else w_gkn.shape[2]
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))

    def tile(j, r0, rows, keep, y):
        yt = jax.lax.dot_general(_rows(x_mk, r0, rows), w_gkn[j], dims,
                                 preferred_element_type=jnp.float32).astype(out_dtype)
        yt = jnp.where(keep[:, None], yt, _rows(y, r0, rows))
        return jax.lax.dynamic_update_slice_in_dim(y, yt, r0, 0)

    return _walk(group_sizes, m, g, block, min_block, tile,
                 _zeros((m, n), out_dtype, x_mk, w_gkn, group_sizes))


def _grouped_outer(x_mk, y_mn, group_sizes, g, block, min_block, out_dtype):
    """dW[j] = sum over the rows r of group j of x[r]^T y[r]; each group's tile loop carries only its own
    fp32 [k, n] accumulator (not dW)."""
    m, k = x_mk.shape
    n = y_mn.shape[1]

    def tile(j, r0, rows, keep, acc):
        xt = _rows(x_mk, r0, rows)
        xt = jnp.where(keep[:, None], xt, jnp.zeros((), xt.dtype))
        return acc + jax.lax.dot_general(xt, _rows(y_mn, r0, rows), (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    like = (x_mk, y_mn, group_sizes)
    return _walk(group_sizes, m, g, block, min_block, tile, _zeros((g, k, n), out_dtype, *like),
                 group_init=lambda j, dw: _zeros((k, n), jnp.float32, *like),
                 group_done=lambda j, acc, dw: dw.at[j].set(acc.astype(out_dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled_ragged_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype):
    return _grouped_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype)


def _tiled_fwd(x_mk, w_gkn, group_sizes, block, min_block, out_dtype):
    return _grouped_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype), (x_mk, w_gkn, group_sizes)


def _tiled_bwd(block, min_block, out_dtype, res, dy):
    x_mk, w_gkn, group_sizes = res
    dx = _grouped_dot(dy, w_gkn, group_sizes, block, min_block, x_mk.dtype, transpose_w=True)
    dw = _grouped_outer(x_mk, dy, group_sizes, w_gkn.shape[0], block, min_block, w_gkn.dtype)
    return dx, dw, None


_tiled_ragged_dot.defvjp(_tiled_fwd, _tiled_bwd)


def blocked_ragged_dot(x_mk: jax.Array, w_gkn: jax.Array, group_sizes: jax.Array, *, block: int | None = None,
                       min_block: int = MIN_BLOCK, preferred_element_type=None) -> jax.Array:
    """y[r] = x[r] @ w[group of r] for rows grouped contiguously by `group_sizes` ([g] ints); [m, n] in
    `preferred_element_type` (default x's dtype), accumulated in fp32. Differentiable in x and w."""
    m, g = x_mk.shape[0], w_gkn.shape[0]
    block = default_block(m, g) if block is None else block
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_mk, w_gkn))
    return _tiled_ragged_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype)


def blocked_group_outer(x_mk: jax.Array, y_mn: jax.Array, group_sizes: jax.Array, num_groups: int, *,
                        block: int | None = None, min_block: int = MIN_BLOCK,
                        preferred_element_type=None) -> jax.Array:
    """dW[j] = sum over the rows r of group j of x[r]^T y[r]: [g, k, n] (the weight gradient of a grouped
    GEMM, what ragged_dot_general computes with the ragged dimension contracted), fp32-accumulated."""
    m = x_mk.shape[0]
    block = default_block(m, num_groups) if block is None else block
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_mk, y_mn))
    return _grouped_outer(x_mk, y_mn, group_sizes, num_groups, block, min_block, out_dtype)


SMALL_ROWS = 16  # at most this many rows (decode, a short verify): gather each row's weight, not tiles


def gathered_ragged_dot(x_mk: jax.Array, w_gkn: jax.Array, group_sizes: jax.Array, *,
                        preferred_element_type=None) -> jax.Array:
    """y[r] = x[r] @ w[group of r] with each row's own weight gathered ([m, k, n]) and one batched
    matrix-vector product: for the few rows of a decode step it reads only the experts in use, where the tile
    loop pays a GEMM call per used group. Measured forward on this CPU (16 experts 256x256 / Nano's 128 of
    2688x1856): 8 rows 0.47 vs 0.71 ms / 54 vs 247 ms, 16 rows 0.52 vs 1.23 / 100 vs 262 ms, 32 rows 0.99 vs
    0.92 / 206 vs 183 ms: the tiles win from about 32 rows (`SMALL_ROWS`). Rows past sum(group_sizes) give
    zeros. Differentiable by autodiff (the gather's transpose is a scatter-add of m weight slices)."""
    m, g = x_mk.shape[0], w_gkn.shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    r = jnp.arange(m)
    gid = jnp.minimum(jnp.searchsorted(ends, r, side="right"), g - 1)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_mk, w_gkn))
    y = jnp.einsum("mk,mkn->mn", x_mk, w_gkn[gid], preferred_element_type=jnp.float32).astype(out_dtype)
    return jnp.where((r < ends[-1])[:, None], y, jnp.zeros((), out_dtype))


def cpu_ragged_dot(x_mk: jax.Array, w_gkn: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=None) -> jax.Array | None:
    """The CPU grouped GEMM for (m rows, g groups): gathered weights for a handful of rows, the tile loop
    otherwise; None where neither fits memory (the caller falls back to ragged_dot). One place for the
    choice, shared by the MoE dispatch and the NVFP4 recipe's expert GEMMs."""
    (m, k), (g, _, n) = x_mk.shape, w_gkn.shape
    if m <= SMALL_ROWS:
        return gathered_ragged_dot(x_mk, w_gkn, group_sizes, preferred_element_type=preferred_element_type)
    if blocked_fits(m, g, k, n, jnp.dtype(w_gkn.dtype).itemsize):
        return blocked_ragged_dot(x_mk, w_gkn, group_sizes, preferred_element_type=preferred_element_type)
    return None


def blocked_fits(m: int, g: int, k: int, n: int, itemsize: int, *, block: int | None = None,
                 budget_bytes: int = 256 << 20) -> bool:
    """Whether the tiled path's extra memory (one weight slice and one tile, beside the output) stays within
    `budget_bytes` (else use ragged_dot). No per-tile weight copy any more, so this holds for any real MoE."""
    block = default_block(m, g) if block is None else block
    return (k * n + block * (k + n)) * max(itemsize, 4) <= budget_bytes
