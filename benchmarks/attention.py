"""The causal attention core on CPU: our blocked op (ops/blocked_attention.py, the CPU default past one query
block) against tokamax's XLA attention (the full masked square), forward and forward + backward, fp32 and bf16,
at T 512 to 4k; jitted and timed interleaved in one process. Heads are the bench model's (8 query / 2 KV heads
x 64); the batch holds about --tokens tokens (at least one row).

    python benchmarks/attention.py [--t 512,1024,2048,4096 --tokens 2048 --rounds 5 --block N]

Prints, per shape and dtype: median wall time (min), the ratio tokamax / ours, XLA's scratch memory (temp) of
each compiled program and its compile time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from nemotron_jax.layers.attention import causal_attention
from nemotron_jax.ops.blocked_attention import blocked_causal_attention, default_block


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="512,1024,2048,4096", help="sequence lengths")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per call: batch = max(1, tokens // t)")
    ap.add_argument("--heads", default="8,2,64", help="query heads, KV heads, head dim")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--block", type=int, default=None, help="query rows per block (default: the op's choice)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    n, kv, h = (int(x) for x in a.heads.split(","))
    print(f"# causal attention, {n} query / {kv} KV heads x {h}; jax {jax.__version__} on {jax.default_backend()}, "
          f"median (min) of {a.rounds} interleaved rounds; block {a.block or 'default'}\n")
    print("| T | block | batch | dtype | pass | tokamax xla ms | blocked ms | tokamax / blocked "
          "| temp MiB xla / blocked | compile s xla / blocked |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in (int(x) for x in a.t.split(",")):
        b = max(1, a.tokens // t)
        for dtype in a.dtypes.split(","):
            ks = jax.random.split(jax.random.PRNGKey(0), 4)
            q = jax.random.normal(ks[0], (b, t, n, h)).astype(dtype)
            k = jax.random.normal(ks[1], (b, t, kv, h)).astype(dtype)
            v = jax.random.normal(ks[2], (b, t, kv, h)).astype(dtype)
            ct = jax.random.normal(ks[3], (b, t, n, h)).astype(dtype)
            impls = {"xla": lambda q, k, v: causal_attention(q, k, v, implementation="xla"),
                     "blocked": lambda q, k, v: blocked_causal_attention(q, k, v, block=a.block)}
            for kind in ("forward", "forward + backward"):
                fns, temp, comp = {}, {}, {}
                for name, f in impls.items():
                    if kind == "forward":
                        fn = jax.jit(f)
                    else:
                        def loss(q, k, v, f=f):
                            return jnp.sum(f(q, k, v).astype(jnp.float32) * ct)
                        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                    t0 = time.perf_counter()
                    compiled = fn.lower(q, k, v).compile()
                    comp[name] = time.perf_counter() - t0
                    temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
                    jax.block_until_ready(compiled(q, k, v))
                    fns[name] = compiled
                wall = {name: [] for name in fns}
                for _ in range(a.rounds):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(q, k, v))
                        wall[name].append(time.perf_counter() - t0)
                med = {name: statistics.median(w) * 1e3 for name, w in wall.items()}
                lo = {name: min(w) * 1e3 for name, w in wall.items()}
                print(f"| {t} | {a.block or default_block(t)} | {b} | {dtype} | {kind} | "
                      f"{med['xla']:,.1f} ({lo['xla']:,.1f}) | {med['blocked']:,.1f} ({lo['blocked']:,.1f}) | "
                      f"{med['xla'] / med['blocked']:.2f}x | "
                      f"{temp['xla']:,.0f} / {temp['blocked']:,.0f} | {comp['xla']:.1f} / {comp['blocked']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
