"""Shared inputs and checks for the SSD tests (tests/test_ssd*.py); holds no tests itself."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.ops.ssd import ssd


@functools.lru_cache(maxsize=None)
def make_inputs(seed=0, b=2, t=37, h=4, p=8, g=2, n=6, dtype=jnp.float32, a_scale=1.0):
    """Random SSD inputs with realistic ranges: dt = softplus(.) in ~(0.05, 2), A in ~(-3, -0.1).
    numpy RNG: eager jax.random ops would each compile, which costs seconds on this machine."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    x = jnp.asarray(normal(b, t, h, p), dtype)
    dt = jnp.asarray(np.logaddexp(0.0, normal(b, t, h) - 1.0))          # softplus
    A = jnp.asarray(-a_scale * np.exp(0.5 * normal(h)))
    B = jnp.asarray(normal(b, t, g, n), dtype)
    C = jnp.asarray(normal(b, t, g, n), dtype)
    S0 = jnp.asarray(normal(b, h, p, n))
    return x, dt, A, B, C, S0


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref|: the error relative to the tensor's scale (fp32 checks)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def assert_close(a, ref, tol, what=""):
    assert np.all(np.isfinite(np.asarray(a, np.float64))), f"{what}: non-finite values"
    err = rel_err(a, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def loss_fn(impl, chunk_size, segment_ids=None, seed=123):
    """fn(x, dt, A, B, C, S0) -> scalar loss, linear in (y, final_state) with fixed random weights:
    its gradient is a VJP with a generic cotangent for both outputs."""

    def f(x, dt, A, B, C, S0):
        y, S = ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_state=S0, return_final_state=True,
                   segment_ids=segment_ids, impl=impl)
        rng = np.random.default_rng(seed)
        wy = rng.standard_normal(y.shape).astype(np.float32)
        wS = rng.standard_normal(S.shape).astype(np.float32)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(S * wS)

    return f


GRAD_NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def grads(impl, chunk_size, inputs, segment_ids=None):
    return jax.jit(jax.grad(loss_fn(impl, chunk_size, segment_ids), argnums=tuple(range(6))))(*inputs)


def packed_case(p=16, n=16, h=4, g=2, dtype=jnp.float32):
    """Two packed rows of three documents each (lengths 12 and 13 only: two compiles per impl).

    Row 0 ids [3]*12 + [1]*13 + [3]*12: the id 3 comes back, which is a *new* document (a reset
    happens wherever the id differs from the previous token's). Row 1: [0]*12 + [1]*12 + [2]*13.
    Returns (inputs, segment_ids, docs) where docs lists (row, start, length).
    """
    x, dt, A, B, C, S0 = make_inputs(seed=7, b=2, t=37, h=h, p=p, g=g, n=n, dtype=dtype)
    seg = jnp.array([[3] * 12 + [1] * 13 + [3] * 12, [0] * 12 + [1] * 12 + [2] * 13], jnp.int32)
    docs = [(0, 0, 12), (0, 12, 13), (0, 25, 12), (1, 0, 12), (1, 12, 12), (1, 24, 13)]
    return (x, dt, A, B, C, S0), seg, docs


def check_packed_equals_separate(impl, chunk_size, tol=1e-5, **case):
    """Packed rows through `impl` equal each document run on its own through `impl` (the row's
    initial state going to the row's first document, zero state to the others); the final state
    equals the last document's. ``case``: `packed_case`'s shape/dtype options."""
    (x, dt, A, B, C, S0), seg, docs = packed_case(**case)
    y, S = jax.jit(lambda *a: ssd(*a[:5], chunk_size=chunk_size, initial_state=a[5], segment_ids=a[6],
                                  return_final_state=True, impl=impl))(x, dt, A, B, C, S0, seg)
    run = jax.jit(lambda *a: ssd(*a[:5], chunk_size=chunk_size, initial_state=a[5],
                                 return_final_state=True, impl=impl))
    by_len: dict[int, list] = {}
    for d in docs:
        by_len.setdefault(d[2], []).append(d)
    for length, group in by_len.items():   # one batched call per document length
        sl = lambda a, r, s: a[r, s:s + length]
        xs = [jnp.stack([sl(a, r, s) for r, s, _ in group]) for a in (x, dt, B, C)]
        s0 = jnp.stack([S0[r] if s == 0 else jnp.zeros_like(S0[r]) for r, s, _ in group])
        y_sep, S_sep = run(xs[0], xs[1], A, xs[2], xs[3], s0)
        for i, (r, s, _) in enumerate(group):
            assert_close(y[r, s:s + length].astype(jnp.float32), y_sep[i].astype(jnp.float32), tol,
                         f"{impl}: y of document ({r}, {s})")
            if s + length == x.shape[1]:
                assert_close(S[r], S_sep[i], tol, f"{impl}: final state of row {r}")
