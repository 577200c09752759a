#!/usr/bin/env bash
# Every GPU check of the project in one run on a lent H200, in under 8 minutes (issue 14, part 4); prepared, not
# yet run. From the repo root on the device machine:
#
#   bash benchmarks/gpu_all.sh          # writes $OUT/gpu_all.json (+ the parts' own files and gpu_all.log)
#
# Parts, each under its own time limit so that one hang cannot eat the others' time (total at most ~7.5 min):
#   1. SSD Pallas kernels vs the chunked XLA op (benchmarks/gpu_ssd.py: correctness, fwd and fwd+bwd timings),
#      one sequence length (T = 8192, b = 2) to fit the budget                                  <= 130 s
#   2. NVFP4 Pallas QDQ kernel: bit-identity, bandwidth, emulated linear (benchmarks/gpu_nvfp4.sh)  <= 100 s
#   3. the train step of the ~1B model (benchmarks/train_step.py --preset 1b: 1.11B parameters, 8 Mamba-2,
#      8 MoE, 2 attention blocks, batch 4 x 4096, bf16 compute): tokens/s, MFU against the measured bf16
#      jnp.dot peak, XLA memory, compile time, the per-part profile breakdown (a JSON is
#      written after the compile and after the timed rounds, so a cut-short run still leaves figures) <= 210 s
#
# The machine's image has jax 0.11.2, flax, optax, chex, einops, orbax but (as last read) not tokamax (which the
# model's attention imports) and its dependencies; parts 1-2 need only jax. For part 3, carry them as wheels (see
# /work/.library/device/README.md, "a Python package missing there"): put them in .whl/ at the repo root (ignored
# by git) and name .whl in the run's `carry`; this script installs whatever is there into /tmp/site first. The
# list to download for Python 3.12 / manylinux x86-64 (--no-deps, one version each): tokamax==0.0.17, einshape,
# qwix, immutabledict, pydantic, pydantic-core, annotated-types, typing-inspection, tensorboardx, xprof (plus any
# that `import tokamax` still reports missing there). Without them part 3 is skipped and the JSON says why.
set -uo pipefail
OUT=${OUT:-$PWD/runs/gpu}
mkdir -p "$OUT"
export OUT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! command -v python >/dev/null 2>&1; then  # gpu_nvfp4.sh calls `python`; the image may have only python3
  mkdir -p /tmp/gpu_all_bin && ln -sf "$(command -v "$PY")" /tmp/gpu_all_bin/python && export PATH=/tmp/gpu_all_bin:$PATH
fi
LOG="$OUT/gpu_all.log"
START=$(date +%s)
: >"$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

run_part() {  # name, time limit (s), command...: runs it, logs it, records its exit status and seconds
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$OUT/parts.jsonl"
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s ===" | tee -a "$LOG"
}
: >"$OUT/parts.jsonl"

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,driver_version --format=csv
  "$PY" - <<'PY'
import importlib, jax
print("jax", jax.__version__, jax.devices())
for m in ("flax", "optax", "tokamax", "ml_collections", "chex", "einops"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m} MISSING ({type(e).__name__}: {e})")
PY
} 2>&1 | tee -a "$LOG" >"$OUT/env.txt"

# GPU_ALL_SMOKE=1: a CPU check of this script's plumbing (tiny shapes, interpreted kernels, the bench model)
if [ "${GPU_ALL_SMOKE:-0}" = 1 ]; then
  SSD_ARGS=(--smoke --t 128 --b 1 --repeats 1)
  STEP_ARGS=(--preset bench --batch 1 --seq-len 128 --rounds 1 --profile-calls 1 --peak-n 256)
  NVFP4_LIMIT=20
else
  SSD_ARGS=(--t 8192 --b 2 --repeats 5)
  STEP_ARGS=(--preset 1b --rounds 5 --profile-calls 2 --peak-n 8192)
  NVFP4_LIMIT=100
fi

run_part ssd 130 "$PY" benchmarks/gpu_ssd.py "${SSD_ARGS[@]}"
run_part nvfp4 "$NVFP4_LIMIT" bash benchmarks/gpu_nvfp4.sh

if "$PY" -c "import flax, optax, tokamax" >/dev/null 2>&1; then
  run_part train_step_1b 210 "$PY" benchmarks/train_step.py --variants bf16 --kinds step --no-hf "${STEP_ARGS[@]}" \
    --out "$OUT/train_step_1b.json"
else
  echo "train_step_1b: skipped, the model's dependencies do not import (carry tokamax & co. as wheels in .whl/)" \
    | tee -a "$LOG"
  echo '{"part": "train_step_1b", "rc": null, "skipped": "flax/optax/tokamax do not import: carry wheels in .whl/"}' \
    >>"$OUT/parts.jsonl"
fi

"$PY" - "$START" <<'PY'
import json, os, sys, time
out = os.environ["OUT"]

def load(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f) if name.endswith(".json") else f.read().splitlines()

parts = [json.loads(l) for l in open(os.path.join(out, "parts.jsonl")) if l.strip()]
report = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": time.time() - float(sys.argv[1]),
          "env": load("env.txt"), "parts": parts, "ssd": load("gpu_ssd.json"), "nvfp4": load("nvfp4_gpu.txt"),
          "train_step_1b": load("train_step_1b.json")}
with open(os.path.join(out, "gpu_all.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
print(f"wrote {os.path.join(out, 'gpu_all.json')} after {report['elapsed_s']:.0f} s; parts: "
      + ", ".join(f"{p['part']} rc={p['rc']}" for p in parts))
PY
