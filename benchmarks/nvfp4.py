"""NVFP4 benchmarks.

CPU (default): step time of the emulated NVFP4 linear (forward + backward, full recipe: 16x16 weight tiles,
SR, RHT) against the bf16 linear on the same shapes, both jitted, measured side by side in one run.

    python benchmarks/nvfp4.py [--tokens 512 --k 512 --n 512 --iters 10]

GPU (--qdq-bandwidth): fused Pallas QDQ kernel bandwidth (bytes read + written / time) against a plain copy
of the same array; used by benchmarks/gpu_nvfp4.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp


def quant_without_model() -> None:
    """Make ``nemotron_jax.quant`` importable on a bare device image (jax only). The package's __init__
    imports the model (flax, tokamax); the quantizer, the recipe and the config need neither, so when that
    import fails the package is registered as a plain namespace and its subpackages load on their own."""
    try:
        import nemotron_jax  # noqa: F401, PLC0415
    except ImportError as e:
        print(f"note: import nemotron_jax failed ({e}); loading nemotron_jax.quant without the model", flush=True)
        for name in [m for m in sys.modules if m == "nemotron_jax" or m.startswith("nemotron_jax.")]:
            del sys.modules[name]
        pkg = types.ModuleType("nemotron_jax")
        pkg.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nemotron_jax")]
        sys.modules["nemotron_jax"] = pkg


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _time_pair(f, g, args, iters: int) -> tuple[float, float]:
    """Median times of f and g, interleaved call by call so that load from other processes hits both alike."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(g(*args))
    tf, tg = [], []
    for _ in range(iters):
        for fn, ts in ((f, tf), (g, tg)):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t)
    return statistics.median(tf), statistics.median(tg)


def linear_ratio(tokens: int, k: int, n: int, iters: int, impl: str = "reference") -> dict:
    from nemotron_jax.quant.recipe import NVFP4Recipe, nvfp4_matmul

    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (tokens, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
    dy = jax.random.normal(kd, (tokens, n), jnp.bfloat16)

    def step(matmul):
        def f(x, w, dy, key):
            y, pull = jax.vjp(lambda a, b: matmul(a, b.astype(jnp.bfloat16), key), x, w)
            return y, *pull(dy)
        return jax.jit(f)

    bf16 = step(lambda a, b, key: jnp.einsum("tk,kn->tn", a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    recipe = NVFP4Recipe(impl=impl)
    nv = step(lambda a, b, key: nvfp4_matmul(a, b, key, recipe))
    key = jax.random.key(1)
    t_bf16, t_nv = _time_pair(bf16, nv, (x, w, dy, key), iters=iters)
    return dict(tokens=tokens, k=k, n=n, impl=impl, backend=jax.default_backend(), bf16_ms=1e3 * t_bf16,
                nvfp4_ms=1e3 * t_nv, ratio=t_nv / t_bf16)


def qdq_bandwidth(rows: int, cols: int, iters: int, block, rounding: str, hadamard: bool) -> dict:
    from nemotron_jax import platform
    from nemotron_jax.quant import nvfp4
    from pallas_kernels import nvfp4 as K

    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.bfloat16)
    s = jnp.stack(nvfp4.tensor_scales(jnp.max(jnp.abs(nvfp4.rht(x) if hadamard else x.astype(jnp.float32)))))
    bits = nvfp4.random_bits(jax.random.key(1), x.shape) if rounding == "stochastic" else None
    interpret = platform.interpret_default()
    kern = jax.jit(lambda x, s, b: K.qdq_kernel(x, s, block=block, rounding=rounding, bits=b, hadamard=hadamard,
                                                interpret=interpret)[0])
    copy = jax.jit(lambda x: x + jnp.asarray(0, x.dtype))  # one read + one write, not elided
    ref = jax.jit(lambda x, b: nvfp4.qdq(x, block=block, rounding=rounding, bits=b, hadamard=hadamard))
    t_k = _time(kern, x, s, bits, iters=iters)
    t_c = _time(copy, x, iters=iters)
    t_r = _time(ref, x, bits, iters=iters)
    nbytes = 2 * x.size * x.dtype.itemsize + (x.size * 4 if bits is not None else 0)
    same = bool(jnp.array_equal(kern(x, s, bits), ref(x, bits)))
    return dict(shape=(rows, cols), block=block, rounding=rounding, hadamard=hadamard,
                kernel_GBps=nbytes / t_k / 1e9, copy_GBps=2 * x.size * x.dtype.itemsize / t_c / 1e9,
                xla_reference_GBps=nbytes / t_r / 1e9, kernel_vs_copy=(nbytes / t_k) / (2 * x.size * 2 / t_c),
                bit_identical_to_reference=same)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--qdq-bandwidth", action="store_true")
    p.add_argument("--impl", default="reference", choices=("reference", "pallas", "auto"),
                   help="NVFP4Recipe.impl of the emulated linear (ModelConfig.nvfp4_impl)")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=8192)
    a = p.parse_args()
    quant_without_model()
    if a.qdq_bandwidth:
        for block in ((1, 16), (16, 16)):
            for rounding, had in (("nearest", False), ("stochastic", False), ("stochastic", True)):
                try:
                    print(qdq_bandwidth(a.rows, a.cols, a.iters, block, rounding, had), flush=True)
                except Exception as e:  # keep measuring the other configurations
                    print(f"FAILED block={block} rounding={rounding} hadamard={had}: {type(e).__name__}: {e}"[:2000],
                          flush=True)
    else:
        r = linear_ratio(a.tokens, a.k, a.n, a.iters, a.impl)
        print(f"backend={r['backend']} impl={r['impl']} x[{r['tokens']},{r['k']}] @ w[{r['k']},{r['n']}] fwd+bwd: "
              f"bf16 {r['bf16_ms']:.2f} ms, nvfp4 (emulated, full recipe) {r['nvfp4_ms']:.2f} ms, "
              f"ratio {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
