#!/usr/bin/env bash
# One short H200 run (prepared, ~3-5 min): the NVFP4 Pallas QDQ kernel compiled for the GPU (interpret=False).
#   1. TE goldens (tests/fixtures/nvfp4_te, from TransformerEngine's reference quantizer): the jnp reference
#      (jitted by XLA:GPU) and the compiled kernel give TE's E2M1 codes, E4M3 block scales and S_dec bit for bit
#      (fp32/bf16, 1x16/16x16, RHT off/on; the all-zero tensor's S_dec is the documented exception).
#   2. Compiled kernel vs jnp reference on GPU, bit for bit, on larger inputs: nearest, SR with shared bits,
#      seeded SR vs hash_bits, RHT, both block shapes, fp32 and bf16 inputs (part 1 covers unscaled outputs);
#      block scales on the E4M3 rounding boundary (TE's order survives XLA:GPU and the kernel).
#   3. The config path: ModelConfig(nvfp4_impl="auto") resolves to the kernel on the GPU, and the recipe's
#      forward + backward with impl="pallas" equals impl="reference" bit for bit.
#   4. QDQ kernel bandwidth vs a plain copy (8192x8192 bf16), and the emulated linear, reference vs kernel.
# The last line of part 1-3 reads "NVFP4_GPU_CHECK PASS" or "NVFP4_GPU_CHECK FAIL (<n> mismatching checks)".
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_nvfp4.sh  (writes $OUT/nvfp4_gpu.txt;
# $PYTHON picks the interpreter, default python3). Parts 1-3 come first and stop after 150 s; the benchmarks
# follow. Rehearse parts 1-3 on a CPU (kernel interpreted, smaller inputs):
#   sed -n '/^  timeout 150/,/^PY$/p' benchmarks/gpu_nvfp4.sh | sed '1d;$d' > /tmp/c.py && \
#   NVFP4_GPU_DRYRUN=1 JAX_PLATFORMS=cpu PYTHONPATH=. python /tmp/c.py
set -uo pipefail
OUT=${OUT:-/tmp/nvfp4_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
LOG="$OUT/nvfp4_gpu.txt"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  timeout 150 "$PY" - <<'PY'
import glob, os, sys
import jax, jax.numpy as jnp, ml_dtypes, numpy as np
sys.path.insert(0, "benchmarks")
from nvfp4 import quant_without_model  # noqa: E402 - nemotron_jax.quant without flax/tokamax if they are missing
quant_without_model()
from nemotron_jax import platform
from nemotron_jax.config import ModelConfig
from nemotron_jax.quant import dispatch, nvfp4
from nemotron_jax.quant.recipe import NVFP4Recipe, nvfp4_matmul, nvfp4_ragged_dot
from pallas_kernels import nvfp4 as K

# NVFP4_GPU_DRYRUN=1: a CPU rehearsal of this script (kernel interpreted, smaller inputs, no "auto" checks)
DRY = os.environ.get("NVFP4_GPU_DRYRUN") == "1"
assert DRY or platform.on_gpu(), f"not on a GPU: {jax.default_backend()}"
F = np.float32
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], F)
fails = 0


def check(ok, what):
    global fails
    if not ok:
        fails += 1
        print("MISMATCH", what, flush=True)
    return ok


def bits(a):
    return np.asarray(a, F).view(np.uint32)


def pack(codes):
    c = np.asarray(codes).view(np.uint8) & 0x0F
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack(p):
    c = np.empty((p.shape[0], p.shape[1] * 2), np.uint8)
    c[:, 0::2], c[:, 1::2] = p & 0x0F, p >> 4
    return c


def expand(s, block):
    return np.repeat(s, 16, -1) if block == (1, 16) else np.repeat(np.repeat(s, 16, 0), 16, 1)


def amax_of(x, had):
    return jnp.max(jnp.abs(nvfp4.rht(x) if had else x.astype(jnp.float32)))


def kernel(x, had, block, **kw):
    s = jnp.stack(nvfp4.tensor_scales(amax_of(x, had)))
    return K.qdq_kernel(x, s, block=block, hadamard=had, interpret=DRY, **kw)


# ---- 1. TE goldens
files = sorted(glob.glob("tests/fixtures/nvfp4_te/*.npz"))
assert len(files) == 18, files
n_te = 0
for f in files:
    z = np.load(f)
    bf16 = f.endswith("_bf16.npz")
    x = jnp.asarray(z["x"].view(ml_dtypes.bfloat16) if bf16 else z["x"])
    rot = z["rot"].view(ml_dtypes.bfloat16).astype(F) if bf16 else z["rot"]
    check(np.array_equal(np.asarray(nvfp4.rht(x)), rot), f"{f} rht")
    for block in ((1, 16), (16, 16)):
        for had in (False, True):
            p = f"b{block[0]}_r{int(had)}_"
            tag = f"{f.split('/')[-1]} block={block} rht={had}"
            q = nvfp4.quantize(x, block=block, hadamard=had)
            check(np.array_equal(pack(q.codes), z[p + "codes"]), f"reference codes {tag}")
            check(np.array_equal(np.asarray(q.block_scales).view(np.uint8), z[p + "scales"]), f"reference scales {tag}")
            if "all_zero" not in f:
                check(bits(q.tensor_scale) == bits(z[p + "s_dec"]), f"reference S_dec {tag}")
            check(bits(amax_of(x, had)) == bits(z[p + "amax"]), f"amax {tag}")
            v, s = kernel(x, had, block, out_dtype=jnp.float32, apply_tensor_scale=False)
            sb = z[p + "scales"].view(ml_dtypes.float8_e4m3fn).astype(F)
            want = E2M1[unpack(z[p + "codes"])] * expand(sb, block)
            check(np.array_equal(np.asarray(s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8), z[p + "scales"]),
                  f"kernel scales {tag}")
            check(np.array_equal(bits(v), bits(want)), f"kernel codes*s_b {tag} "
                  f"({int((bits(v) != bits(want)).sum())} of {want.size} differ)")
            n_te += 1
print(f"TE goldens: {n_te} variants checked, failures so far {fails}", flush=True)

# ---- 2. compiled kernel vs jnp reference on GPU, larger inputs
SHAPE = (64, 256) if DRY else (512, 2048)
for dt in (jnp.float32, jnp.bfloat16):
    kx, kt = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(kx, SHAPE, jnp.float32) * jnp.exp(jax.random.normal(kt, SHAPE) * 1.5)).astype(dt)
    x = x.at[3, :32].set(-0.0).at[17, 100].set(3e4)
    for block in ((1, 16), (16, 16)):
        for rounding, had in (("nearest", False), ("nearest", True), ("stochastic", False), ("stochastic", True)):
            tag = f"dtype={jnp.dtype(dt).name} block={block} {rounding} rht={had}"
            b = nvfp4.random_bits(jax.random.key(1), x.shape) if rounding == "stochastic" else None
            try:
                y, s = kernel(x, had, block, rounding=rounding, bits=b)
                q = nvfp4.quantize(x, block=block, rounding=rounding, bits=b, hadamard=had)
                r = nvfp4.dequantize(q, x.dtype)  # = nvfp4.qdq
                d = int((np.asarray(y, F).view(np.uint32) != np.asarray(r, F).view(np.uint32)).sum())
                check(d == 0, f"kernel vs reference {tag}: {d}/{y.size}")
                check(np.array_equal(np.asarray(s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8),
                                     np.asarray(q.block_scales).view(np.uint8)), f"kernel scales {tag}")
                print(f"bitident {tag}: mismatches={d}/{y.size}", flush=True)
            except Exception as e:
                check(False, f"{tag}: {type(e).__name__}: {str(e)[:1500]}")
    seed = jnp.uint32(1234)
    ys, _ = kernel(x, True, (1, 16), rounding="stochastic", seed=seed)
    rs = nvfp4.qdq(x, rounding="stochastic", bits=K.hash_bits(seed, x.shape), hadamard=True)
    check(np.array_equal(bits(ys), bits(rs)), f"seeded SR vs hash_bits dtype={jnp.dtype(dt).name}")

# block-scale boundary: TE's order amax_b * (S_enc * fp32(1/6)) on XLA:GPU and in the kernel
rng = np.random.default_rng(0)
g = F(4.375)
s_enc = F(2688) / g
cand = np.unique(rng.uniform(0.01, 4.3, 200000).astype(F).view(np.uint32) & 0xFFFF0000).view(F)
e4 = lambda v: np.minimum(v, F(448)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)  # noqa: E731
hard = cand[e4(cand * (s_enc * (F(1) / F(6)))) != e4((cand / F(6)) * s_enc)]
xb = np.zeros((64, 512), F)
amb = rng.choice(hard, (64, 32))
xb.reshape(64, 32, 16)[:, :, 0] = amb
xb.reshape(64, 32, 16)[:, :, 1:] = amb[..., None] * rng.uniform(-1, 1, (64, 32, 15)).astype(F)
xb[0, 0] = g
want = e4(np.abs(xb).reshape(64, 32, 16).max(-1) * (s_enc * (F(1) / F(6))))
q = nvfp4.quantize(jnp.asarray(xb))
check(np.array_equal(np.asarray(q.block_scales).view(np.uint8), want), "boundary: reference on GPU")
_, s = kernel(jnp.asarray(xb), False, (1, 16))
check(np.array_equal(np.asarray(s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8), want), "boundary: kernel")

# ---- 3. config path
cfg = ModelConfig.tiny(precision="nvfp4", nvfp4_impl="auto")
rec = NVFP4Recipe.from_config(cfg)
check(rec.impl == "auto" and (DRY or dispatch.resolve(rec.impl, (256, 512), jnp.bfloat16) == "pallas"),
      "auto -> pallas on GPU")
kx, kw, kd = jax.random.split(jax.random.key(2), 3)
X = jax.random.normal(kx, (40, 256), jnp.bfloat16)
W = jax.random.normal(kw, (256, 128), jnp.float32) * 0.05
DY = jax.random.normal(kd, (40, 128), jnp.bfloat16)
key = jax.random.key(3)


def fb(r, ragged=False):
    if ragged:
        gs = jnp.array([10, 0, 30], jnp.int32)
        w3 = jnp.stack([W, 2 * W, 3 * W])
        f = lambda a, b: nvfp4_ragged_dot(a, b, gs, key, r)  # noqa: E731
        y, pull = jax.vjp(f, X, w3)
    else:
        y, pull = jax.vjp(lambda a, b: nvfp4_matmul(a, b, key, r), X, W)
    return (y, *pull(DY))


for ragged in (False, True):
    for impl in ("pallas",) if DRY else ("pallas", "auto"):
        a = jax.jit(lambda: fb(NVFP4Recipe(impl="reference"), ragged))()
        b = jax.jit(lambda: fb(NVFP4Recipe(impl=impl), ragged))()
        same = all(np.array_equal(np.asarray(u, F).view(np.uint32), np.asarray(v, F).view(np.uint32))
                   for u, v in zip(a, b))
        check(same, f"recipe fwd+bwd impl={impl} ragged={ragged} vs reference")
print("NVFP4_GPU_CHECK", "PASS" if fails == 0 else f"FAIL ({fails} mismatching checks)", flush=True)
PY
  timeout 240 "$PY" benchmarks/nvfp4.py --qdq-bandwidth --rows 8192 --cols 8192 --iters 20
  timeout 60 "$PY" benchmarks/nvfp4.py --tokens 8192 --k 4096 --n 4096 --iters 10 --impl reference
  timeout 60 "$PY" benchmarks/nvfp4.py --tokens 8192 --k 4096 --n 4096 --iters 10 --impl pallas
} 2>&1 | tee "$LOG"
