"""GPU check and timing of the SSD Pallas kernels (compiled, not interpreted) vs the chunked XLA path.

Prepared for the H200 machine (jax 0.11.2 preinstalled there; this repo's tree as cwd; no network).
Nano's Mamba-2 heads: h=64 heads x p=64, state n=128, g=8 groups, chunk 128, bf16 activations.

    python benchmarks/gpu_ssd.py                  # ~2-4 min: checks, then timings
    python benchmarks/gpu_ssd.py --t 8192 --b 1   # fewer timings

Two kernels: "mosaic_gpu" (pallas_kernels/ssd_mosaic.py, wgmma + TMA, bf16/f16; what
impl="auto" picks on a GPU) and "portable" (pallas_kernels/ssd.py, lowers through Pallas' Triton
backend). Steps (each config in its own try/except, so one failing compile is reported, not fatal):
  1. correctness on GPU: each kernel vs chunked (precision HIGHEST) at T=1000 (ragged last
     chunk), with an initial state, and again with packed segment_ids; the Mosaic kernel rounds
     its wgmma operands to bf16, so expect ~3e-3 there (its CPU-interpreted error), fp32 ~1e-5;
  2. forward time: chunked XLA (default precision = TF32 dots on Hopper, and HIGHEST) vs the
     Mosaic kernel vs portable launch configs (block_p, num_warps; precision HIGHEST and TF32);
  3. forward+backward time: kernels (custom_vjp, chunked backward) vs chunked.
Results print as a table and go to --out (default: $OUT/gpu_ssd.json on the device machine, else
runs/gpu_ssd.json, which git ignores; never the repository root) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
try:
    import nemotron_jax  # noqa: F401
except ImportError:
    # The GPU machine may lack the model's dependencies (e.g. tokamax). The SSD op needs only jax:
    # register bare package stubs so `nemotron_jax.ops.*` imports without the package __init__.
    for name in ("nemotron_jax", "nemotron_jax.ops"):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(ROOT, *name.split("."))]
        sys.modules[name] = mod

ssd_mod = importlib.import_module("nemotron_jax.ops.ssd")
platform = importlib.import_module("nemotron_jax.platform")
ssd, ssd_pallas = ssd_mod.ssd, ssd_mod.ssd_pallas   # ssd_pallas: one named kernel, with the op's custom VJP


def inputs(b, t, h, p, g, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    return (jnp.asarray(normal(b, t, h, p), dtype),
            jnp.asarray(np.maximum(np.logaddexp(0.0, normal(b, t, h) - 2.0), 1e-3)),
            jnp.asarray(-rng.uniform(1.0, 16.0, h).astype(np.float32)),
            jnp.asarray(normal(b, t, g, n), dtype),
            jnp.asarray(normal(b, t, g, n), dtype),
            jnp.asarray(0.1 * normal(b, h, p, n)))


def rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def timeit(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def default_out() -> str:
    """$OUT/gpu_ssd.json where $OUT is set (the device machine's results folder), else runs/gpu_ssd.json."""
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "gpu_ssd.json")
    return os.path.join(ROOT, "runs", "gpu_ssd.json")


def write_report(report: dict, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="4096,16384")
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU plumbing check: 2 heads, chunk 64, kernels interpreted")
    ap.add_argument("--out", default=None, help="where the JSON report goes (default: $OUT/gpu_ssd.json, else "
                                                "runs/gpu_ssd.json)")
    a = ap.parse_args(argv)
    h, p, g, n, L = 64, 64, 8, 128, 128
    interp, t_check, seg_lens = False, 1000, [300, 200, 257, 243]
    if a.smoke:
        h, p, g, n, L, interp, t_check, seg_lens = 2, 64, 1, 64, 64, True, 100, [30, 20, 27, 23]
    dev = jax.devices()[0]
    report = dict(jax=jax.__version__, device=dev.device_kind, backend=jax.default_backend(),
                  shape=dict(h=h, p=p, g=g, n=n, chunk=L, b=a.b), checks=[], fwd=[], fwdbwd=[])
    print(f"# jax {jax.__version__}, {dev.device_kind} ({jax.default_backend()})", flush=True)
    if not platform.on_gpu():
        print("# not on a GPU: the kernel would run interpreted; this script is for the H200 machine")
    HI, TF32 = lax.Precision.HIGHEST, lax.Precision.DEFAULT

    def run(label, fn):
        try:
            return fn()
        except Exception as e:  # report and continue
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {label}: FAILED {msg}", flush=True)
            traceback.print_exc(limit=3)
            return msg

    # 1. correctness (kernel compiled vs chunked XLA, both HIGHEST)
    for dtype, backend in ((jnp.float32, "portable"), (jnp.bfloat16, "portable"), (jnp.bfloat16, "mosaic_gpu")):
        for with_seg in (False, True):
            x, dt, A, B, C, S0 = inputs(1, t_check, h, p, g, n, dtype)
            seg = jnp.asarray(np.repeat(np.arange(4), seg_lens)[None]) if with_seg else None

            def check():
                with jax.default_matmul_precision("highest"):
                    yc, sc = jax.jit(lambda *z: ssd(*z[:5], chunk_size=L, initial_state=z[5], segment_ids=seg,
                                                    return_final_state=True, impl="chunked"))(x, dt, A, B, C, S0)
                yk, sk = jax.jit(lambda *z: ssd_pallas(
                    *z[:5], chunk_size=L, initial_state=z[5], interpret=interp, backend=backend,
                    **(dict(precision=HI) if backend == "portable" else {}),
                    run_ids=None if seg is None else ssd_mod.segment_runs(seg)))(x, dt, A, B, C, S0)
                return dict(y=rel(yk.astype(jnp.float32), yc.astype(jnp.float32)), state=rel(sk, sc))

            res = run(f"check {backend} {jnp.dtype(dtype).name} seg={with_seg}", check)
            report["checks"].append(dict(backend=backend, dtype=jnp.dtype(dtype).name, segments=with_seg,
                                         result=res))
            print(f"  check {backend:10s} {jnp.dtype(dtype).name:8s} segments={with_seg!s:5s} "
                  f"rel err vs chunked: {res}", flush=True)

    # 2. forward timings
    configs = [dict(block_p=64, num_warps=4, precision=HI), dict(block_p=64, num_warps=8, precision=HI),
               dict(block_p=32, num_warps=4, precision=HI), dict(block_p=32, num_warps=8, precision=HI),
               dict(block_p=32, num_warps=4, precision=TF32), dict(block_p=64, num_warps=8, precision=TF32)]
    if a.smoke:
        configs = [dict(block_p=32, num_warps=4, precision=HI), dict(block_p=16, num_warps=4, precision=TF32)]
    for t in [int(v) for v in a.t.split(",")]:
        x, dt, A, B, C, S0 = inputs(a.b, t, h, p, g, n, jnp.bfloat16)
        args = (x, dt, A, B, C)
        row = dict(T=t)
        for prec in ("default", "highest"):
            def chunked(*z):
                with jax.default_matmul_precision(prec):
                    return ssd(*z, chunk_size=L, impl="chunked")
            row[f"chunked_{prec}_ms"] = run(f"chunked {prec} T={t}", lambda: timeit(chunked, args, a.repeats))
        mosaic = lambda *z: ssd_pallas(*z, chunk_size=L, interpret=interp, backend="mosaic_gpu")[0]
        row["mosaic_ms"] = run(f"mosaic T={t}", lambda: timeit(mosaic, args, a.repeats))
        for cfg in configs:
            name = f"pallas_bp{cfg['block_p']}_w{cfg['num_warps']}_{'tf32' if cfg['precision'] == TF32 else 'fp32'}_ms"
            fn = lambda *z, cfg=cfg: ssd_pallas(*z, chunk_size=L, interpret=interp, backend="portable", **cfg)[0]
            row[name] = run(f"{name} T={t}", lambda: timeit(fn, args, a.repeats))
        report["fwd"].append(row)
        print(f"  fwd T={t}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items() if k != "T"), flush=True)

    # 3. forward + backward at the first T (kernel forward + chunked backward, vs chunked both ways)
    t = int(a.t.split(",")[0])
    x, dt, A, B, C, S0 = inputs(a.b, t, h, p, g, n, jnp.bfloat16)
    args = (x, dt, A, B, C)
    best = dict(block_p=32, num_warps=4, precision=HI)   # edit after reading the fwd table
    loss = {
        "chunked": lambda *z: jnp.sum(ssd(*z, chunk_size=L, impl="chunked").astype(jnp.float32) ** 2),
        "portable": lambda *z: jnp.sum(ssd_pallas(*z, chunk_size=L, interpret=interp, backend="portable",
                                                  **best)[0].astype(jnp.float32) ** 2),
        "mosaic": lambda *z: jnp.sum(ssd_pallas(*z, chunk_size=L, interpret=interp, backend="mosaic_gpu")[0]
                                     .astype(jnp.float32) ** 2),
    }
    row = dict(T=t)
    for name, f in loss.items():
        row[f"{name}_ms"] = run(f"fwdbwd {name}", lambda f=f: timeit(jax.grad(f, argnums=(0, 1, 2, 3, 4)), args,
                                                                     a.repeats))
    report["fwdbwd"].append(row)
    print(f"  fwd+bwd T={t}: {row}", flush=True)

    out = write_report(report, a.out or default_out())
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
