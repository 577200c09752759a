"""CPU grouped GEMM for MoE experts: jax.lax.ragged_dot vs tokamax (XLA path) vs our tiled blocked_ragged_dot,
forward + backward, timed interleaved in one run. Also a dense GEMM of the same size as the floor.

    python benchmarks/grouped_gemm.py [--rows 512 --k 256 --n 256 --groups 16 --iters 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import tokamax

from nemotron_jax.ops.grouped_gemm import blocked_ragged_dot


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    x = jax.random.normal(jax.random.key(0), (a.rows, a.k))
    w = jax.random.normal(jax.random.key(1), (a.groups, a.k, a.n))
    gs = jnp.asarray(np.random.default_rng(0).multinomial(a.rows, np.ones(a.groups) / a.groups), jnp.int32)
    impls = {
        "lax.ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, gs),
        "tokamax (xla)": lambda x, w: tokamax.ragged_dot(x, w, gs, implementation="xla"),
        "blocked (ours)": lambda x, w: blocked_ragged_dot(x, w, gs),
        "dense x @ w[0]": lambda x, w: x @ w[0],
    }
    fns = {k: jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1))) for k, f in impls.items()}
    for f in fns.values():
        jax.block_until_ready(f(x, w))
    times = {k: [] for k in fns}
    for _ in range(a.iters):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(x, w))
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["lax.ragged_dot"])
    print(f"backend={jax.default_backend()} rows={a.rows} k={a.k} n={a.n} groups={a.groups} (fwd+bwd, median)")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:16s} {med * 1e3:8.2f} ms   lax.ragged_dot / this = {base / med:5.2f}x")


if __name__ == "__main__":
    main()
