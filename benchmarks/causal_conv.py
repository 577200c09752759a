"""The Mamba causal conv, forward + backward: the hand-written VJP (ops/causal_conv.py) against autodiff of the
same shifted multiply-adds (`custom_vjp=False`: what the model ran before, and still runs for fp32 inputs) and
against `lax.conv_general_dilated` (the test oracle), timed interleaved in one process. Default shape: the bench model's conv ([4, 512, 1280], k = 4).

    python benchmarks/causal_conv.py [--shape 4,512,1280 --k 4 --rounds 15 --segments]

Wall time is the median over rounds; cpu is the process CPU time (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from nemotron_jax.ops.causal_conv import causal_conv1d, causal_conv1d_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4,512,1280", help="b,t,c")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--segments", action="store_true", help="with packed-document segment ids (4 per row)")
    a = ap.parse_args()
    b, t, c = (int(v) for v in a.shape.split(","))
    print(f"# causal conv forward + backward, [{b}, {t}, {c}], k={a.k}, segments={a.segments}; "
          f"jax {jax.__version__} on {jax.default_backend()}, median of {a.rounds} interleaved rounds")
    seg = (jnp.arange(t)[None, :] * 4 // t).repeat(b, 0) if a.segments else None
    for dtype in (jnp.float32, jnp.bfloat16):
        ks = jax.random.split(jax.random.PRNGKey(0), 4)
        x = jax.random.normal(ks[0], (b, t, c)).astype(dtype)
        w = jax.random.normal(ks[1], (a.k, c))
        bias = jax.random.normal(ks[2], (c,))

        def grad_of(fn):
            # a silu after the conv, as in the layer, so the backward sees a real cotangent
            loss = lambda x, w, bias: jnp.sum(jax.nn.silu(fn(x, w, bias, seg).astype(jnp.float32)))  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

        fns = {"custom VJP (ours)": grad_of(functools.partial(causal_conv1d, custom_vjp=True)),
               "autodiff of the taps": grad_of(functools.partial(causal_conv1d, custom_vjp=False)),
               "lax conv (oracle)": grad_of(causal_conv1d_reference)}
        for f in fns.values():
            jax.block_until_ready(f(x, w, bias))
        wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():
                c0, w0 = time.process_time(), time.perf_counter()
                jax.block_until_ready(f(x, w, bias))
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
        base = statistics.median(wall["custom VJP (ours)"])
        print(jnp.dtype(dtype).name)
        for k in fns:
            mw, mc = statistics.median(wall[k]), statistics.median(cpu[k])
            print(f"  {k:22s} wall {mw * 1e3:8.2f} ms ({mw / base:4.2f}x ours)   cpu {mc * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
