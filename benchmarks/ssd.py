"""SSD scan benchmark: token-by-token `lax.scan` vs the chunked jnp op (and the Pallas kernel on GPU).

For each sequence length T it jit-compiles each implementation once, reads the compiled
program's memory analysis (XLA's temp/scratch bytes, plus argument and output bytes), and times
the best of a few runs (min: least sensitive to other load on a shared machine). It prints one table whose ratios all come from this one run:

  * per-impl time and time per 1k tokens (flat = linear cost in T),
  * growth of each impl's time relative to the first T, next to T's own growth,
  * reference / chunked speed-up.

CPU default (finishes in a few minutes on 2 cores): h=8, p=32, n=32, g=1, chunk 128, b=1,
T = 1k..16k. Usage:

    python benchmarks/ssd.py                        # forward
    python benchmarks/ssd.py --mode fwdbwd          # forward + backward (grad of a sum)
    python benchmarks/ssd.py --json out.json        # also write the rows as JSON
    python benchmarks/ssd.py --bench-shape --impls chunked --mode fwdbwd --segments
        # the bench model's layer shape (b=4, T=512, h=16, p=64, g=2, n=64, chunk 128), with resets

On a GPU the Pallas kernel is added automatically (``--impls`` to choose).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax import platform
from nemotron_jax.ops.ssd import ssd


def make_inputs(b, t, h, p, g, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    return (jnp.asarray(normal(b, t, h, p), dtype),
            jnp.asarray(np.logaddexp(0.0, normal(b, t, h) - 2.0)),       # softplus: dt ~ 0.1
            jnp.asarray(-np.exp(rng.uniform(0.0, np.log(16.0), h)).astype(np.float32)),   # A ~ -U-ish[1, 16]
            jnp.asarray(normal(b, t, g, n), dtype),
            jnp.asarray(normal(b, t, g, n), dtype))


BENCH_SHAPE = dict(b=4, t="512", h=16, p=64, g=2, n=64, chunk=128)   # the bench config's Mamba-2 layers


def make_segments(b, t, seed=0):
    """Four documents per row at random cut points (int32 [b, t])."""
    rng = np.random.default_rng(seed)
    cuts = [np.sort(rng.choice(np.arange(1, t), 3, replace=False)) for _ in range(b)]
    return jnp.asarray(np.stack([np.searchsorted(c, np.arange(t), side="right") for c in cuts]), jnp.int32)


def build(impl, chunk, mode, segment_ids=None):
    def fwd(x, dt, A, B, C):
        return ssd(x, dt, A, B, C, chunk_size=chunk, impl=impl, segment_ids=segment_ids)

    if mode == "fwd":
        return jax.jit(fwd)
    return jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3, 4)))


def measure(fn, args, repeats):
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    total = temp + sum(getattr(mem, k, 0) for k in ("argument_size_in_bytes", "output_size_in_bytes")) if mem else 0
    jax.block_until_ready(compiled(*args))          # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return min(times), temp, total   # best of `repeats`: the machine is shared, min is the least noisy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--h", type=int, default=8)
    ap.add_argument("--p", type=int, default=32)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--g", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mode", default="fwd", choices=["fwd", "fwdbwd"])
    ap.add_argument("--impls", default=None, help="default: reference,chunked (+pallas on GPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--bench-shape", action="store_true",
                    help=f"use the bench model's shape {BENCH_SHAPE} (overrides --b --t --h --p --g --n --chunk)")
    ap.add_argument("--segments", action="store_true", help="packed documents: 4 per row (segment resets)")
    a = ap.parse_args(argv)
    if a.bench_shape:
        for k, v in BENCH_SHAPE.items():
            setattr(a, k, v)

    on_gpu = platform.on_gpu()
    impls = a.impls.split(",") if a.impls else ["reference", "chunked"] + (["pallas"] if on_gpu else [])
    ts = [int(v) for v in a.t.split(",")]
    dtype = jnp.dtype(a.dtype)
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"b={a.b} h={a.h} p={a.p} n={a.n} g={a.g} chunk={a.chunk} dtype={a.dtype} mode={a.mode} "
          f"segments={a.segments}")

    rows = []
    for t in ts:
        args = make_inputs(a.b, t, a.h, a.p, a.g, a.n, dtype)
        seg = make_segments(a.b, t) if a.segments else None
        for impl in impls:
            sec, temp, total = measure(build(impl, a.chunk, a.mode, seg), args, a.repeats)
            rows.append(dict(T=t, impl=impl, ms=sec * 1e3, temp_mib=temp / 2**20, total_mib=total / 2**20))
            print(f"  T={t:6d} {impl:9s} {sec * 1e3:9.2f} ms  temp {temp / 2**20:8.1f} MiB", flush=True)

    t0 = ts[0]
    base = {r["impl"]: r for r in rows if r["T"] == t0}
    print()
    head = f"{'T':>6} {'T/T0':>5} | " + " | ".join(
        f"{i + ' ms':>14} {'ms/1k tok':>9} {'x T0':>6} {'temp MiB':>9}" for i in impls)
    if "reference" in impls and "chunked" in impls:
        head += f" | {'ref/chunked':>11}"
    print(head)
    for t in ts:
        by = {r["impl"]: r for r in rows if r["T"] == t}
        line = f"{t:6d} {t / t0:5.0f} | " + " | ".join(
            f"{by[i]['ms']:14.2f} {by[i]['ms'] * 1e3 / t:9.3f} {by[i]['ms'] / base[i]['ms']:6.1f} "
            f"{by[i]['temp_mib']:9.1f}" for i in impls)
        if "reference" in impls and "chunked" in impls:
            line += f" | {by['reference']['ms'] / by['chunked']['ms']:11.1f}"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(config=vars(a), jax=jax.__version__, device=jax.devices()[0].device_kind,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
