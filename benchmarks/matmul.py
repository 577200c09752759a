"""bf16 Linear GEMMs on CPU: widened to the fp32 GEMM (`ops.matmul`) against XLA's bf16 GEMM, side by side.

For each [rows, in, out] it compiles the plain bf16 `jnp.dot` and the same GEMM with both operands upcast to fp32
(what `ops.matmul.dense` does from MIN_DIM rows, columns and contraction on a CPU without AMX; here at every
size, to show where the threshold comes from), forward alone and forward + backward (the gradient of a sum of squares: the
dx and dW GEMMs), and times them in interleaved rounds so both see the same machine noise. Prints medians and
the median of the per-round ratios (widened / bf16; < 1 means the widening pays).

    python benchmarks/matmul.py                       # the bench model's Linear shapes, decode rows, a Nano-size one
    python benchmarks/matmul.py --shapes 2048x512x2320 --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from nemotron_jax.ops import matmul

DEFAULT_SHAPES = ("8x512x2320,128x512x2320,256x512x2320,2048x512x2320,2048x1024x512,2048x512x512,2048x512x768,"
                  "2048x512x256,2048x2688x4096")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated rows x in x out")
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    print(f"# bf16 GEMMs, widened to fp32 vs XLA's bf16 GEMM; jax {jax.__version__} on {jax.default_backend()}, "
          f"medians of {a.rounds} interleaved rounds; ops.matmul widens from {matmul.MIN_DIM} rows/cols/contraction "
          f"(on this host: {'yes' if matmul.widens() else 'no'})")

    def plain(x, w):
        return jnp.dot(x, w)

    def widened(x, w):
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)

    def loss(f):
        return jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))

    fns = {}
    for m, k, n in shapes:
        x = jax.random.normal(jax.random.PRNGKey(0), (m, k)).astype(jnp.bfloat16)
        w = (jax.random.normal(jax.random.PRNGKey(1), (k, n)) * 0.05).astype(jnp.bfloat16)
        for kind in ("fwd", "fwdbwd"):
            for name, f in (("bf16", plain), ("widened", widened)):
                g = f if kind == "fwd" else loss(f)
                fns[(m, k, n, kind, name)] = (jax.jit(g).lower(x, w).compile(), x, w)
    times = {key: [] for key in fns}
    for _ in range(a.rounds):
        for key, (c, x, w) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(x, w))
            times[key].append(time.perf_counter() - t0)
    print("| rows x in x out | kind | bf16 ms | widened ms | widened / bf16 | ops.matmul widens |")
    print("|---|---|---|---|---|---|")
    for m, k, n in shapes:
        for kind in ("fwd", "fwdbwd"):
            b, w = times[(m, k, n, kind, "bf16")], times[(m, k, n, kind, "widened")]
            ratio = statistics.median(x / y for x, y in zip(w, b))
            print(f"| {m} x {k} x {n} | {kind} | {statistics.median(b) * 1e3:.2f} | "
                  f"{statistics.median(w) * 1e3:.2f} | {ratio:.3f} | {'yes' if matmul.pays(m, k, n) else 'no'} |")


if __name__ == "__main__":
    main()
