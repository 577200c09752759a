"""Packed NVFP4 (from_hf(..., dequantize=False)) benchmarks, CPU.

1. Time of the dequantize-in-GEMM linear (nemotron_jax.quant.packed.dequant_matmul, jnp reference: codes and
   block scales dequantized inside jit, then the BF16 GEMM) against the BF16 linear (bf16 kernel [K, N],
   the same flattened jnp.dot), both jitted, called alternately in one run (so load from other processes hits
   both alike); median of --iters calls each. The weight is a real NVFP4 quantization of a random matrix.
2. --memory: actual bytes of the `small` preset (configs/small.py) quantized with
   to_hf(..., quantize="nvfp4") and loaded back with from_hf(..., dequantize=False), against the same
   checkpoint loaded in BF16, for the released exclusion policy and for every linear but the LM head.

    python benchmarks/packed_linear.py [--tokens 1 16 512 --k 2688 --n 1856 --iters 11] [--memory]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def _interleaved(fns: dict, args: dict, iters: int) -> dict[str, float]:
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))  # compile + warm up
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in ts.items()}


def bench_linear(tokens: list[int], shapes: list[tuple[int, int]], iters: int) -> None:
    from nemotron_jax.convert.modelopt import nvfp4_dequantize, nvfp4_quantize  # noqa: PLC0415
    from nemotron_jax.quant import packed  # noqa: PLC0415

    bf16 = jax.jit(lambda x, w: jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1]))
    pk = jax.jit(lambda x, p: packed.dequant_matmul(x, p, dtype=jnp.bfloat16, impl="reference"))
    deq = jax.jit(lambda p: packed.dequantize_kn(p, jnp.float32).astype(jnp.bfloat16))
    print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s); "
          f"median of {iters} interleaved calls; bf16 compute\n")
    print("| tokens x K -> N | BF16 linear (ms) | packed NVFP4, dequantize in GEMM (ms) | ratio | "
          "dequantize alone (ms) | weight bytes BF16 / packed |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for k, n in shapes:
        w_nk = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        p = packed.PackedNVFP4.from_arrays(*nvfp4_quantize(w_nk))
        w_kn = jnp.asarray(nvfp4_dequantize(p.codes, p.scales, p.scale_2).T, jnp.bfloat16)
        for t in tokens:
            x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(bf16(x, w_kn), np.float32), np.asarray(pk(x, p), np.float32))
            r = _interleaved({"bf16": bf16, "packed": pk, "deq": deq},
                             {"bf16": (x, w_kn), "packed": (x, p), "deq": (p,)}, iters)
            print(f"| {t} x {k} -> {n} | {r['bf16'] * 1e3:.3f} | {r['packed'] * 1e3:.3f} | "
                  f"{r['packed'] / r['bf16']:.2f}x | {r['deq'] * 1e3:.3f} | "
                  f"{w_kn.nbytes / 2**20:.2f} / {p.nbytes / 2**20:.2f} MiB |", flush=True)


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def bench_memory() -> None:
    from flax import nnx  # noqa: PLC0415

    from nemotron_jax import model as M  # noqa: PLC0415
    from nemotron_jax.config import ModelConfig  # noqa: PLC0415
    from nemotron_jax.convert import from_hf, to_hf  # noqa: PLC0415
    from nemotron_jax.quant import packed  # noqa: PLC0415

    cfg = ModelConfig.small()
    model = M.init_model(cfg, seed=0)
    print("\n| small preset (MTP included) | total state | NVFP4 weights | their BF16 size | "
          "bits / quantized weight | quantized weights |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for label, excl in (("released exclusions", None), ("all linears but lm_head", ["lm_head"])):
            path = f"{d}/{len(label)}"
            to_hf(model, path, dtype=jnp.bfloat16, quantize="nvfp4", exclude_modules=excl)
            pk = from_hf(path, dtype=jnp.bfloat16, dequantize=False)
            bf = from_hf(path, dtype=jnp.bfloat16)
            found = packed.packed_weights(pk)
            n_w = sum(int(np.prod(p.shape)) for p in found.values())
            b_pk = sum(p.nbytes for p in found.values())
            total_pk, total_bf = _bytes(nnx.state(pk)), _bytes(nnx.state(bf))
            print(f"| BF16 | {total_bf / 2**20:.2f} MiB | - | - | 16 | - |")
            print(f"| packed NVFP4, {label} | {total_pk / 2**20:.2f} MiB ({total_pk / total_bf:.1%}) | "
                  f"{b_pk / 2**20:.2f} MiB | {2 * n_w / 2**20:.2f} MiB | {8 * b_pk / n_w:.3f} | "
                  f"{n_w / 1e6:.2f}M of {sum(x.size for x in jax.tree.leaves(nnx.state(bf))) / 1e6:.2f}M |",
                  flush=True)
            del pk, bf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    ap.add_argument("--k", type=int, default=2688)
    ap.add_argument("--n", type=int, default=1856)
    ap.add_argument("--iters", type=int, default=11)
    ap.add_argument("--memory", action="store_true", help="also the small preset's bytes, packed vs BF16")
    ap.add_argument("--no-linear", action="store_true")
    a = ap.parse_args()
    if a.iters < 5:
        ap.error("--iters must be >= 5")
    if not a.no_linear:
        bench_linear(a.tokens, [(a.k, a.n), (a.n, a.k)], a.iters)
    if a.memory:
        bench_memory()


if __name__ == "__main__":
    main()
