"""Grouped GEMMs for the CPU: a loop over each group's rows where they lie, dense GEMMs on row tiles; and the
capacity path on top of it (one batched GEMM over a mean-sized window of rows per group, the tiles for the rows
past it: see "the capacity path" below), which the MoE takes from 64 rows per group on average.

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


def _bounds(group_sizes, m: int):
    """(starts, ends) [g] int32 of each group's rows, clipped to the m rows that exist."""
    gs = group_sizes.astype(jnp.int32)
    cum = jnp.cumsum(gs)
    return jnp.minimum(cum - gs, m), jnp.minimum(cum, m)


def _walk(bounds, m: int, g: int, block: int, min_block: int, tile, carry, *, group_init=None,
          group_done=None):
    """Fold `tile(j, row0, rows, keep, carry)` over every row of every range j of `bounds` (starts, ends [g]:
    each group's rows, or the part of them a caller left over). Each range, rounded up to a multiple of
    `min_block`, is covered by `block`-row tiles then one tile per binary digit of the rest (so few, large
    GEMMs); keep [rows] marks the tile's rows inside the range (the last tile may run past the range's end, or
    start earlier when it would run past m). `rows` is static; row0 + rows <= m.
    group_init(j, carry) / group_done(j, group_carry, carry) wrap each group (e.g. a per-group accumulator)."""
    block = max(1, min(block, m))
    min_block = max(1, min(min_block, block))
    starts, ends = bounds
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

    def maybe_group(j, outer):  # an empty range (most of them, after the capacity path's windows) costs nothing
        return jax.lax.cond(ends[j] > starts[j], group_body, lambda j, outer: outer, j, outer)

    return jax.lax.fori_loop(0, g, maybe_group, carry)


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


def _grouped_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype, transpose_w=False, *, bounds=None,
                 init=None):
    """y[r] = x[r] @ w[group of r] (w[group]^T with transpose_w), fp32 accumulation, zeros past the groups.
    With `bounds` / `init`: only the rows of those ranges, written into `init` (the rest of it kept)."""
    m = x_mk.shape[0]
    g = w_gkn.shape[0]
    n = w_gkn.shape[1] if transpose_w else w_gkn.shape[2]
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))

    def tile(j, r0, rows, keep, y):
        yt = jax.lax.dot_general(_rows(x_mk, r0, rows), w_gkn[j], dims,
                                 preferred_element_type=jnp.float32).astype(out_dtype)
        yt = jnp.where(keep[:, None], yt, _rows(y, r0, rows))
        return jax.lax.dynamic_update_slice_in_dim(y, yt, r0, 0)

    return _walk(_bounds(group_sizes, m) if bounds is None else bounds, m, g, block, min_block, tile,
                 _zeros((m, n), out_dtype, x_mk, w_gkn, group_sizes) if init is None else init)


def _grouped_outer(x_mk, y_mn, group_sizes, g, block, min_block, out_dtype, *, bounds=None, init=None):
    """dW[j] = sum over the rows r of group j of x[r]^T y[r]; each group's tile loop carries only its own
    fp32 [k, n] accumulator (not dW). With `bounds` / `init`: the rows of those ranges, added to init[j]."""
    m, k = x_mk.shape
    n = y_mn.shape[1]

    def tile(j, r0, rows, keep, acc):
        xt = _rows(x_mk, r0, rows)
        xt = jnp.where(keep[:, None], xt, jnp.zeros((), xt.dtype))
        return acc + jax.lax.dot_general(xt, _rows(y_mn, r0, rows), (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    like = (x_mk, y_mn, group_sizes)
    if init is None:
        init, start = _zeros((g, k, n), out_dtype, *like), lambda j, dw: _zeros((k, n), jnp.float32, *like)
    else:
        start = lambda j, dw: dw[j].astype(jnp.float32)  # noqa: E731
    return _walk(_bounds(group_sizes, m) if bounds is None else bounds, m, g, block, min_block, tile, init,
                 group_init=start, group_done=lambda j, acc, dw: dw.at[j].set(acc.astype(out_dtype)))


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


# -- the capacity path: one batched GEMM over a fixed-size window of rows per group, tiles for the rest
#
# With balanced routing (what the aux-loss-free bias steers to) every group holds about m / g rows. Each group
# j gets a window of `cap` rows starting at its first row (clamped so it fits inside m): the windows are
# gathered into [g, cap, k] and multiplied by their weights in ONE batched GEMM; a row takes its output from
# its own group's window when it lies inside it. Rows of a group past its window (groups above the mean) go
# through the tile loop above, restricted to them; rows of a window past its group's end are computed and
# dropped. Bench MoE (8192 rows, 16 experts, 512 -> 256): forward 1.2x the dense GEMM, against 2.0x for the
# tiles alone (docs/benchmarks.md). The windows pay off while routing is near balanced: with the largest group
# 2.2x the mean still 1.2x faster than the tiles alone, even with them at 3.6x, 17% slower at 6.3x (then most
# rows go through the tiles after a batched GEMM mostly spent on rows of the wrong groups).

CAPACITY_MIN_MEAN = 64  # rows per group on average from which the capacity path is taken


def _takes_capacity(m: int, g: int) -> bool:
    """Whether m rows in g groups go through the capacity windows (else the tiles alone)."""
    return m >= CAPACITY_MIN_MEAN * g


def capacity(m: int, g: int) -> int:
    """Window rows per group: the mean group size rounded up to a multiple of 16, at most m."""
    mean = -(-m // max(g, 1))
    return min(m, -(-mean // 16) * 16)


def _windows(a_mk, win, cap):
    """[g, cap, k]: the `cap` rows of a from each window start."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(a_mk, s, cap, 0))(win)


def _cap_layout(group_sizes, m: int, cap: int):
    """Group bounds, window starts [g], and the part of each group its window leaves to the tiles."""
    starts, ends = _bounds(group_sizes, m)
    win = jnp.clip(starts, 0, m - cap)
    return (starts, ends), win, (jnp.minimum(ends, win + cap), ends)


def _cap_dot(x_mk, w_gkn, group_sizes, cap, block, min_block, out_dtype, transpose_w=False):
    m = x_mk.shape[0]
    g = w_gkn.shape[0]
    n = w_gkn.shape[1] if transpose_w else w_gkn.shape[2]
    (_, ends), win, rest = _cap_layout(group_sizes, m, cap)
    spec = "gck,gnk->gcn" if transpose_w else "gck,gkn->gcn"
    yw = jnp.einsum(spec, _windows(x_mk, win, cap), w_gkn, preferred_element_type=jnp.float32).astype(out_dtype)
    r = jnp.arange(m)
    gid = jnp.minimum(jnp.searchsorted(ends, r, side="right"), g - 1)  # the group of row r (empty ones skipped)
    pos = r - win[gid]
    y = jnp.take(yw.reshape(g * cap, n), gid * cap + jnp.minimum(pos, cap - 1), axis=0)
    y = jnp.where(((pos < cap) & (r < ends[-1]))[:, None], y, jnp.zeros((), out_dtype))
    return _grouped_dot(x_mk, w_gkn, group_sizes, block, min_block, out_dtype, transpose_w, bounds=rest, init=y)


def _cap_outer(x_mk, y_mn, group_sizes, g, cap, block, min_block, out_dtype):
    m = x_mk.shape[0]
    (starts, ends), win, rest = _cap_layout(group_sizes, m, cap)
    i = win[:, None] + jnp.arange(cap)
    mine = (i >= starts[:, None]) & (i < ends[:, None])  # [g, cap]: window rows that are the group's own
    yw = jnp.where(mine[..., None], _windows(y_mn, win, cap), jnp.zeros((), y_mn.dtype))
    # contracts the window rows (a transposed-lhs GEMM, ~1.4x the forward's time in fp32; a swapped copy first, or
    # the dense x^T dy of the same size, measured no faster)
    dw = jnp.einsum("gck,gcn->gkn", _windows(x_mk, win, cap), yw, preferred_element_type=jnp.float32)
    return _grouped_outer(x_mk, y_mn, group_sizes, g, block, min_block, out_dtype, bounds=rest,
                          init=dw.astype(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _capacity_ragged_dot(x_mk, w_gkn, group_sizes, cap, block, min_block, out_dtype):
    return _cap_dot(x_mk, w_gkn, group_sizes, cap, block, min_block, out_dtype)


def _capacity_fwd(x_mk, w_gkn, group_sizes, cap, block, min_block, out_dtype):
    return _cap_dot(x_mk, w_gkn, group_sizes, cap, block, min_block, out_dtype), (x_mk, w_gkn, group_sizes)


def _capacity_bwd(cap, block, min_block, out_dtype, res, dy):
    x_mk, w_gkn, group_sizes = res
    dx = _cap_dot(dy, w_gkn, group_sizes, cap, block, min_block, x_mk.dtype, transpose_w=True)
    dw = _cap_outer(x_mk, dy, group_sizes, w_gkn.shape[0], cap, block, min_block, w_gkn.dtype)
    return dx, dw, None


_capacity_ragged_dot.defvjp(_capacity_fwd, _capacity_bwd)


def capacity_ragged_dot(x_mk: jax.Array, w_gkn: jax.Array, group_sizes: jax.Array, *, cap: int | None = None,
                        block: int | None = None, min_block: int = MIN_BLOCK,
                        preferred_element_type=None) -> jax.Array:
    """`blocked_ragged_dot`'s result (same rows, same fp32 accumulation, zeros past the groups) with each
    group's first `cap` rows (default `capacity(m, g)`) in one batched GEMM; differentiable in x and w."""
    m, g = x_mk.shape[0], w_gkn.shape[0]
    cap = capacity(m, g) if cap is None else min(cap, m)
    block = default_block(m, g) if block is None else block
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_mk, w_gkn))
    return _capacity_ragged_dot(x_mk, w_gkn, group_sizes, cap, block, min_block, out_dtype)


def capacity_group_outer(x_mk: jax.Array, y_mn: jax.Array, group_sizes: jax.Array, num_groups: int, *,
                         cap: int | None = None, block: int | None = None, min_block: int = MIN_BLOCK,
                         preferred_element_type=None) -> jax.Array:
    """`blocked_group_outer`'s result with each group's first `cap` rows in one batched GEMM."""
    m = x_mk.shape[0]
    cap = capacity(m, num_groups) if cap is None else min(cap, m)
    block = default_block(m, num_groups) if block is None else block
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_mk, y_mn))
    return _cap_outer(x_mk, y_mn, group_sizes, num_groups, cap, block, min_block, out_dtype)


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
    """The CPU grouped GEMM for (m rows, g groups): gathered weights for a handful of rows, the capacity
    windows from CAPACITY_MIN_MEAN rows per group on average (their gathered copies of the rows and outputs are
    about the size of x and y), the tile loop in between; None where the tiles do not fit memory (the caller
    falls back to ragged_dot). One place for the choice, shared by the MoE dispatch and the NVFP4 recipe's
    expert GEMMs."""
    (m, k), (g, _, n) = x_mk.shape, w_gkn.shape
    if m <= SMALL_ROWS:
        return gathered_ragged_dot(x_mk, w_gkn, group_sizes, preferred_element_type=preferred_element_type)
    if blocked_fits(m, g, k, n, jnp.dtype(w_gkn.dtype).itemsize):
        fn = capacity_ragged_dot if _takes_capacity(m, g) else blocked_ragged_dot
        return fn(x_mk, w_gkn, group_sizes, preferred_element_type=preferred_element_type)
    return None


def cpu_group_outer(x_mk: jax.Array, y_mn: jax.Array, group_sizes: jax.Array, num_groups: int, *,
                    preferred_element_type=None) -> jax.Array | None:
    """The CPU weight gradient of a grouped GEMM, chosen as `cpu_ragged_dot` chooses; None where the tiles do
    not fit memory (the caller falls back to ragged_dot_general)."""
    (m, k), n = x_mk.shape, y_mn.shape[1]
    if not blocked_fits(m, num_groups, k, n, 4):
        return None
    fn = capacity_group_outer if _takes_capacity(m, num_groups) else blocked_group_outer
    return fn(x_mk, y_mn, group_sizes, num_groups, preferred_element_type=preferred_element_type)


def blocked_fits(m: int, g: int, k: int, n: int, itemsize: int, *, block: int | None = None,
                 budget_bytes: int = 256 << 20) -> bool:
    """Whether the tiled path's extra memory (one weight slice and one tile, beside the output) stays within
    `budget_bytes` (else use ragged_dot). No per-tile weight copy any more, so this holds for any real MoE."""
    block = default_block(m, g) if block is None else block
    return (k * n + block * (k + n)) * max(itemsize, 4) <= budget_bytes
