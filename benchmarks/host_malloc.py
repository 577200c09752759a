"""The train step on glibc's malloc vs tcmalloc (what scripts/setup.sh preloads), processes taking turns.

    python benchmarks/host_malloc.py                       # tiny (the main job's step) and bench, 3 rounds each
    python benchmarks/host_malloc.py --presets tiny --rounds 5 --steps 100

XLA's CPU runtime mallocs each call's scratch buffer and frees it at the end of the call; glibc serves blocks that
large with fresh mmaps, which the step then faults in page by page. The allocator is chosen when a process starts
(LD_PRELOAD), so the two sides cannot share a process: each round starts one worker per allocator, in turn (the
order alternates), each compiling the full train step of benchmarks/train_step.py (`Ours`, state donated) and
timing --steps calls after a warm-up. Reported per allocator: the median step, compile time, the worker's user and
system CPU time and minor page faults per step, and its peak RSS; and the median of the per-round step ratios.
Needs tcmalloc where scripts/setup.sh finds it (.venv/lib/tcmalloc or the system's); writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANT_OF = {"tiny": "bf16", "bench": "fp32"}  # the main job computes in bf16; the bench table leads with fp32


def _tcmalloc() -> str | None:
    cands = [REPO / ".venv" / "lib" / "tcmalloc" / "libtcmalloc_minimal.so.4"]
    cands += [pathlib.Path(p) for p in os.environ.get("LD_PRELOAD", "").split(":") if "tcmalloc" in p]
    return next((str(p) for p in cands if p.exists()), None)


def worker(preset: str, steps: int) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np  # noqa: PLC0415
    import train_step as ts  # noqa: PLC0415

    from nemotron_jax.platform import host_allocator  # noqa: PLC0415

    base, overrides, seq, batch = ts.preset_model(preset)
    tokens = np.random.default_rng(0).integers(0, overrides["vocab_size"], (batch, seq)).astype(np.int32)
    t0 = time.perf_counter()
    ours = ts.Ours(base, overrides, VARIANT_OF[preset], tokens, ("step",))
    setup_s = time.perf_counter() - t0
    for _ in range(3):
        ours.call("step")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    times = [ours.call("step") for _ in range(steps)]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({
        "malloc": host_allocator(), "step_s": statistics.median(times), "setup_s": setup_s,
        "compile_s": ours.info["step"]["trace_lower_s"] + ours.info["step"]["compile_s"],
        "user_s_per_step": (r1.ru_utime - r0.ru_utime) / steps, "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
        "minflt_per_step": (r1.ru_minflt - r0.ru_minflt) / steps, "max_rss_mb": r1.ru_maxrss / 1024}), flush=True)


def run_one(preset: str, steps: int, lib: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    if lib:
        env["LD_PRELOAD"] = lib
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    out = subprocess.run([sys.executable, __file__, "--_worker", preset, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"worker failed ({preset}, {'tcmalloc' if lib else 'system'}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per worker (default: tiny 100, bench 5)")
    ap.add_argument("--out", default="runs/bench/host_malloc.json")
    ap.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.steps)
    lib = _tcmalloc()
    if lib is None:
        raise SystemExit("no tcmalloc found: run scripts/setup.sh (it fetches one into .venv/lib/tcmalloc)")
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    for p in presets:
        if p not in VARIANT_OF:
            raise SystemExit(f"unknown preset {p!r}: choose from {sorted(VARIANT_OF)}")
    report = {"tcmalloc": lib, "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "presets": {}}
    for p in presets:
        steps = a.steps or (100 if p == "tiny" else 5)
        rows = {"system": [], "tcmalloc": []}
        for r in range(a.rounds):
            order = [("system", None), ("tcmalloc", lib)]
            for name, l in (order if r % 2 == 0 else order[::-1]):
                res = run_one(p, steps, l)
                rows[name].append(res)
                print(f"{p} round {r + 1}/{a.rounds} {name:8s}: step {res['step_s'] * 1e3:7.1f} ms, "
                      f"sys {res['sys_s_per_step'] * 1e3:6.1f} ms/step, {res['minflt_per_step']:,.0f} faults/step",
                      flush=True)
        ratios = [s["step_s"] / t["step_s"] for s, t in zip(rows["system"], rows["tcmalloc"])]
        report["presets"][p] = {"variant": VARIANT_OF[p], "steps": steps, "rows": rows,
                                "speedup_median": statistics.median(ratios)}
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")

    def med(rows, k):
        return statistics.median(x[k] for x in rows)

    print(f"\ntrain step, glibc malloc vs tcmalloc ({report['cpu_count']} CPUs; medians of {a.rounds} rounds, "
          f"workers taking turns)\n")
    print("| preset (compute) | malloc | step ms | compile s | user ms/step | sys ms/step | page faults/step "
          "| peak RSS MB | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, rep in report["presets"].items():
        for name in ("system", "tcmalloc"):
            rows = rep["rows"][name]
            sp = f"{rep['speedup_median']:.2f}x" if name == "tcmalloc" else ""
            print(f"| {p} ({rep['variant']}) | {name} | {med(rows, 'step_s') * 1e3:,.1f} "
                  f"| {med(rows, 'compile_s'):.1f} "
                  f"| {med(rows, 'user_s_per_step') * 1e3:,.1f} | {med(rows, 'sys_s_per_step') * 1e3:,.1f} "
                  f"| {med(rows, 'minflt_per_step'):,.0f} | {med(rows, 'max_rss_mb'):,.0f} | {sp} |")
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
