"""CPU grouped GEMM for MoE experts: our capacity path (capacity_ragged_dot, what the MoE takes from 64 rows per
expert) and the tiles alone (blocked_ragged_dot) against the dense GEMM of the same FLOPs (the floor; issue 14
asks for 1.5x of it), forward and forward + backward, fp32 and bf16, all jitted and timed interleaved in one
process. Default shape: the bench MoE's up GEMM (4 x 512 tokens, top-4 of 16 experts -> 8192 rows, 512 -> 256);
`--mlp` adds the whole expert MLP (up, relu^2, down) against the dense MLP; `--compare` adds jax.lax.ragged_dot
and tokamax's XLA path (slow: ~20x); `--skew s` routes expert i a share ~ exp(-s i / 4) of the rows instead of
uniformly at random (s = 1: the largest group 3.6x the mean), where the capacity windows lose their edge.

    python benchmarks/grouped_gemm.py [--rows 8192 --k 512 --n 256 --groups 16 --topk 4 --iters 9 --mlp --skew 0]

Wall time is the median over rounds (min beside it); cpu is the process CPU time, steadier than wall on a
shared machine (it does not count time the process waits for a core).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.ops.activations import relu2
from nemotron_jax.ops.grouped_gemm import blocked_ragged_dot, capacity_ragged_dot


def routed_group_sizes(rows: int, groups: int, topk: int, seed: int = 0) -> jax.Array:
    """Rows per group of uniform random top-k routing of rows // topk tokens (dropless: sums to rows)."""
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((rows // topk, groups)), axis=1)[:, :topk]
    return jnp.asarray(np.bincount(picks.reshape(-1), minlength=groups), jnp.int32)


def skewed_group_sizes(rows: int, groups: int, skew: float) -> jax.Array:
    """Group i gets a share ~ exp(-skew * i / 4) of the rows (the remainder to group 0; sums to rows)."""
    p = np.exp(-skew * np.arange(groups) / 4)
    sizes = np.floor(p / p.sum() * rows).astype(np.int64)
    sizes[0] += rows - sizes.sum()
    return jnp.asarray(sizes, jnp.int32)


def time_interleaved(fns: dict, args: tuple, rounds: int) -> dict[str, tuple[float, float, float]]:
    """{name: (median wall s, min wall s, median cpu s)}, every fn called once per round in turn."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*args))
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), min(wall[k]), statistics.median(cpu[k])) for k in fns}


def report(title: str, res: dict, base: str = "dense") -> None:
    bw, _, bc = res[base]
    print(f"  {title}")
    for k, (med, lo, c) in res.items():
        print(f"    {k:16s} wall {med * 1e3:8.2f} ms (min {lo * 1e3:8.2f})  /dense {med / bw:5.2f}x"
              f"   cpu {c * 1e3:8.2f} ms  /dense {c / bc:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--mlp", action="store_true", help="also the expert MLP: up [k, n], relu^2, down [n, k]")
    ap.add_argument("--compare", action="store_true", help="also lax.ragged_dot and tokamax (xla)")
    ap.add_argument("--skew", type=float, default=None, help="skewed group sizes (see the docstring)")
    a = ap.parse_args()
    gs = (routed_group_sizes(a.rows, a.groups, a.topk) if a.skew is None
          else skewed_group_sizes(a.rows, a.groups, a.skew))
    print(f"backend={jax.default_backend()} rows={a.rows} k={a.k} n={a.n} groups={a.groups} "
          f"group sizes {min(gs.tolist())}..{max(gs.tolist())}; rounds={a.iters}")
    for dtype in a.dtypes.split(","):
        dt = jnp.dtype(dtype)
        x = jax.random.normal(jax.random.key(0), (a.rows, a.k)).astype(dt)
        w = jax.random.normal(jax.random.key(1), (a.groups, a.k, a.n)).astype(dt)
        w2 = jax.random.normal(jax.random.key(2), (a.groups, a.n, a.k)).astype(dt)
        gemms = {"dense": lambda x, w, w2: x @ w[0], "capacity (ours)": lambda x, w, w2: capacity_ragged_dot(x, w, gs),
                 "tiles (ours)": lambda x, w, w2: blocked_ragged_dot(x, w, gs)}
        if a.compare:
            import tokamax  # noqa: PLC0415

            gemms["lax.ragged_dot"] = lambda x, w, w2: jax.lax.ragged_dot(x, w, gs)
            gemms["tokamax (xla)"] = lambda x, w, w2: tokamax.ragged_dot(x, w, gs, implementation="xla")
        cases = {"GEMM": gemms}
        if a.mlp:
            cases["expert MLP"] = {
                "dense": lambda x, w, w2: relu2(x @ w[0]) @ w2[0],
                "capacity (ours)": lambda x, w, w2: capacity_ragged_dot(relu2(capacity_ragged_dot(x, w, gs)), w2, gs),
                "tiles (ours)": lambda x, w, w2: blocked_ragged_dot(relu2(blocked_ragged_dot(x, w, gs)), w2, gs),
            }
        for case, impls in cases.items():
            fwd = {k: jax.jit(f) for k, f in impls.items()}
            grad = {k: jax.jit(jax.grad(lambda x, w, w2, f=f: jnp.sum(f(x, w, w2).astype(jnp.float32) ** 2),
                                        (0, 1, 2))) for k, f in impls.items()}
            print(f"{case} {dtype}")
            report("forward", time_interleaved(fwd, (x, w, w2), a.iters))
            report("forward + backward", time_interleaved(grad, (x, w, w2), a.iters))


if __name__ == "__main__":
    main()
