import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.ops import grouped_gemm
from nemotron_jax.ops.grouped_gemm import (blocked_fits, blocked_group_outer, blocked_ragged_dot, capacity,
                                           capacity_group_outer, capacity_ragged_dot, gathered_ragged_dot)


def _loop(x, w, gs):
    """Plain numpy: row r uses the weight of the group it falls in; rows past the groups are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for gi, size in enumerate(np.asarray(gs)):
        y[start:start + size] = x[start:start + size] @ w[gi]
        start += size
    return y


@pytest.mark.parametrize("sizes, block, min_block", [
    ([5, 0, 17, 3, 40, 1], 8, 2),     # empty group, groups not multiples of the block, binary-digit tiles
    ([5, 0, 17, 3, 40, 1], 8, 8),     # tiles running past a group's end (masked)
    ([32, 32], 32, 16),               # exact tiles
    ([3, 4, 0, 2], 16, 16),           # rows past the groups (m = 12 > 9); tiles shifted back from m
    ([0, 0, 9], 4, 4),                # leading empty groups, last group ends before m
    ([0, 0, 0], 16, 16),              # no rows routed: all zeros
    ([40, 1, 0, 29, 70], 32, 16),     # groups longer than a block
])
def test_matches_loop_and_ragged_dot_forward_and_grads(sizes, block, min_block):
    m = max(sum(sizes), 12)
    gs = jnp.asarray(sizes, jnp.int32)
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, 24))
    w = jax.random.normal(kw, (len(sizes), 24, 20))
    y = blocked_ragged_dot(x, w, gs, block=block, min_block=min_block)
    # fp32 dots of 24 terms: measured max |err| 3.8e-6 on outputs up to ~20 (seeds 0-6), at most ~0.12 of the
    # allowance in every assertion here (8x margin or more): kept.
    np.testing.assert_allclose(y, _loop(x, w, gs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, w, gs), rtol=1e-5, atol=1e-5)
    f = lambda fn: jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), (0, 1))(x, w)  # noqa: E731
    gb = f(lambda a, b: blocked_ragged_dot(a, b, gs, block=block, min_block=min_block))
    gr = f(lambda a, b: jax.lax.ragged_dot(a, b, gs))
    for a, b in zip(gb, gr):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes, cap, block, min_block", [
    ([9, 7, 8, 8], 8, 8, 2),          # around the window: one row over (tiles), one under (a row of the next)
    ([5, 0, 17, 3, 40, 1], 12, 8, 2),  # empty group, windows running into later groups, long overflow
    ([3, 4, 0, 2], 4, 16, 16),        # rows past the groups (m = 12 > 9): the last windows clamped inside m
    ([0, 0, 30], 8, 4, 4),            # everything in the last group: two clamped windows, overflow of 22
    ([30, 0, 0], 8, 4, 4),            # everything in the first group
    ([0, 0, 0], 4, 16, 16),           # no rows routed: all zeros
    ([16, 16], 16, 16, 16),           # exact windows, no overflow
])
def test_capacity_matches_loop_and_ragged_dot_forward_and_grads(sizes, cap, block, min_block):
    m = max(sum(sizes), 12)
    gs = jnp.asarray(sizes, jnp.int32)
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (m, 24))
    w = jax.random.normal(kw, (len(sizes), 24, 20))
    run = lambda a, b: capacity_ragged_dot(a, b, gs, cap=cap, block=block, min_block=min_block)  # noqa: E731
    y = jax.jit(run)(x, w)
    # the same fp32 dots of 24 terms as the tiled test above, the same allowance
    np.testing.assert_allclose(y, _loop(x, w, gs), rtol=1e-5, atol=1e-5)
    f = lambda fn: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), (0, 1)))(x, w)  # noqa: E731
    for a, b in zip(f(run), f(lambda a, b: jax.lax.ragged_dot(a, b, gs))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the weight gradient alone (the NVFP4 recipe's CPU path): rows past the groups belong to no group
    yv = jax.random.normal(jax.random.key(8), (m, 20))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    xs, ys = np.asarray(x, np.float64), np.asarray(yv, np.float64)
    want = np.stack([xs[a:b].T @ ys[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(capacity_group_outer(x, yv, gs, len(sizes), cap=cap, block=block,
                                                    min_block=min_block), want, rtol=1e-5, atol=1e-5)


def test_capacity_window_size():
    assert capacity(8192, 16) == 512       # the bench MoE: the mean group size
    assert capacity(1000, 16) == 64        # mean 62.5 rounded up to a multiple of 16
    assert capacity(40, 2) == 32 and capacity(20, 1) == 20   # never more than m


def test_jit_and_bf16():
    gs = jnp.asarray([7, 9], jnp.int32)
    x = jax.random.normal(jax.random.key(1), (16, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (2, 32, 16)).astype(jnp.bfloat16)
    y = jax.jit(blocked_ragged_dot)(x, w, gs)
    assert y.dtype == jnp.bfloat16
    ref = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
    # One bf16 rounding of the fp32-accumulated sum: |bf16(v) - v| <= 2^-8 |v| (measured: y == bf16(ref) in every
    # element, max rel 3.8e-3 over seeds 0-6). atol covers a different fp32 summation order where a sum nearly
    # cancels: 32 products of N(0,1) pairs, ~2^-24 * sum|x w| each step, <= ~5e-5 in the worst case.
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-8, atol=1e-4)


def test_group_outer_matches_per_group_sum():
    sizes = [5, 0, 17, 3, 40, 1]
    gs = jnp.asarray(sizes, jnp.int32)
    x = jax.random.normal(jax.random.key(3), (70, 12))  # 4 rows past the groups: not in any dW
    y = jax.random.normal(jax.random.key(4), (70, 10))
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    want = np.stack([xs[a:b].T @ ys[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    # fp32-accumulated sums of <= 40 products of N(0,1) pairs: same allowance as the GEMM test above
    np.testing.assert_allclose(blocked_group_outer(x, y, gs, len(sizes), block=8, min_block=4), want,
                               rtol=1e-5, atol=1e-5)


def test_budget():
    assert blocked_fits(4096, 8, 64, 64, 4)
    assert blocked_fits(1 << 20, 128, 2688, 1856, 2)  # Nano-sized experts: no per-tile weight copy any more
    assert not blocked_fits(1 << 20, 128, 2688, 1856, 2, budget_bytes=1 << 20)


@pytest.mark.parametrize("sizes, m", [
    ([1, 0, 2, 0, 1], 4),       # decode at batch 1, top-4 (with empty experts)
    ([0, 3, 0, 0], 6),          # rows past the groups give zeros
    ([0, 0, 0], 5),             # nothing routed
    ([2, 2, 2, 2], 8),
    ([5, 3, 0, 8], 16),         # a verify of 4 tokens x top-4
])
def test_gathered_matches_loop_and_ragged_dot_forward_and_grads(sizes, m):
    gs = jnp.asarray(sizes, jnp.int32)
    kx, kw = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (m, 24))
    w = jax.random.normal(kw, (len(sizes), 24, 20))
    y = gathered_ragged_dot(x, w, gs)
    # fp32 dots of 24 terms, as in the tiled test above
    np.testing.assert_allclose(y, _loop(x, w, gs), rtol=1e-5, atol=1e-5)
    f = lambda fn: jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), (0, 1))(x, w)  # noqa: E731
    for a, b in zip(f(lambda a, b: gathered_ragged_dot(a, b, gs)), f(lambda a, b: jax.lax.ragged_dot(a, b, gs))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_dispatch_by_row_count(monkeypatch):
    """A handful of rows takes the gathered path, more rows the tiles, from CAPACITY_MIN_MEAN rows per group
    the capacity windows; all agree with ragged_dot."""
    calls = []
    names = ("gathered_ragged_dot", "blocked_ragged_dot", "capacity_ragged_dot", "blocked_group_outer",
             "capacity_group_outer")
    for name in names:
        fn = getattr(grouped_gemm, name)
        monkeypatch.setattr(grouped_gemm, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    w = jax.random.normal(jax.random.key(6), (4, 16, 8))
    for m in (grouped_gemm.SMALL_ROWS, grouped_gemm.SMALL_ROWS + 1, 4 * grouped_gemm.CAPACITY_MIN_MEAN):
        gs = jnp.asarray([m // 2, 0, m - m // 2, 0], jnp.int32)
        x = jax.random.normal(jax.random.key(m), (m, 16))
        np.testing.assert_allclose(grouped_gemm.cpu_ragged_dot(x, w, gs), jax.lax.ragged_dot(x, w, gs),
                                   rtol=1e-5, atol=1e-5)
        if m > grouped_gemm.SMALL_ROWS:
            grouped_gemm.cpu_group_outer(x, x[:, :8], gs, 4)
    assert calls == ["gathered_ragged_dot", "blocked_ragged_dot", "blocked_group_outer", "capacity_ragged_dot",
                     "capacity_group_outer"]
