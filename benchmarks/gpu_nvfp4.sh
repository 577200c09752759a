#!/usr/bin/env bash
# One short H200 run (prepared, ~2-4 min): NVFP4 Pallas QDQ kernel on GPU (interpret=False).
#   1. bit-identity of the compiled kernel against the jnp reference (nearest, SR with shared bits, RHT)
#   2. QDQ kernel bandwidth vs a plain copy's bandwidth (8192x8192 bf16), and the emulated linear ratio.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_nvfp4.sh  (writes $OUT/nvfp4_gpu.txt)
set -uo pipefail
OUT=${OUT:-/tmp/nvfp4_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="$OUT/nvfp4_gpu.txt"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
  python - <<'PY'
import jax, jax.numpy as jnp, numpy as np
from nemotron_jax.quant import nvfp4
from pallas_kernels import nvfp4 as K
x = jax.random.normal(jax.random.key(0), (256, 1024), jnp.float32) * 3
for block in ((1, 16), (16, 16)):
    for rounding, had in (("nearest", False), ("nearest", True), ("stochastic", False), ("stochastic", True)):
        bits = nvfp4.random_bits(jax.random.key(1), x.shape) if rounding == "stochastic" else None
        amax = jnp.max(jnp.abs(nvfp4.rht(x) if had else x))
        s = jnp.stack(nvfp4.tensor_scales(amax))
        try:
            y, _ = K.qdq_kernel(x, s, block=block, rounding=rounding, bits=bits, hadamard=had, interpret=False)
            r = nvfp4.qdq(x, block=block, rounding=rounding, bits=bits, hadamard=had)
            d = np.asarray(y != r)
            print(f"bitident block={block} {rounding} rht={had}: mismatches={int(d.sum())}/{d.size}", flush=True)
        except Exception as e:
            print(f"FAILED block={block} {rounding} rht={had}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
PY
  timeout 240 python benchmarks/nvfp4.py --qdq-bandwidth --rows 8192 --cols 8192 --iters 20
  timeout 60 python benchmarks/nvfp4.py --tokens 8192 --k 4096 --n 4096 --iters 10
} 2>&1 | tee "$LOG"
