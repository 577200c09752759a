"""16-bit GEMM operands on CPU: through the fp32 GEMM where that is the faster of the two.

The product of two bf16 (or fp16) numbers is exact in fp32, so a 16-bit GEMM that accumulates in fp32 and the
fp32 GEMM of the same values upcast sum the same products; only the order of the fp32 sums may differ. On a CPU
without AMX tiles XLA's bf16 GEMM is the slower one for training-size GEMMs (this machine, avx512_bf16: a bf16
GEMM 217-274 GFLOP/s against 300-350 in fp32), and the upcast copies pay for themselves: bf16 forward +
backward of one Linear 0.83-0.96x the time from 256 rows up (bench in_proj 0.88x, a Nano-size 2688 -> 4096
0.92x), the bench model's bf16 forward + backward 4-9% faster (benchmarks/matmul.py, docs/benchmarks.md).
Below 256 rows (decode) the upcast of the weight costs more than it saves (8 rows 1.4-2.4x), and the batched
expert and attention GEMMs measured no faster (1.03-1.04x), so those stay 16-bit. With AMX the bf16 GEMM is
several times the fp32 one, so nothing is widened there; GPUs and TPUs are never touched. Callers cast the
result to the dtype the 16-bit GEMM would have returned.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from nemotron_jax import platform

_NARROW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_DIM = 256  # the GEMM's rows, columns and contraction each at least this for the widening to pay


@functools.lru_cache(maxsize=None)
def _host_has_amx() -> bool:
    """Whether the host CPU has AMX tiles for bf16 (Linux /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def widens() -> bool:
    """Whether 16-bit GEMM operands may go through the fp32 GEMM here: on a CPU without AMX."""
    return platform.on_cpu() and not _host_has_amx()


def pays(m: int, k: int, n: int) -> bool:
    """Whether an [m, k] x [k, n] GEMM is large enough for the widening to pay (every side at least MIN_DIM)."""
    return min(m, k, n) >= MIN_DIM


def operands(a: jax.Array, b: jax.Array, contract: tuple[Sequence[int], Sequence[int]]) -> tuple[jax.Array, jax.Array]:
    """(a, b) as the GEMM contracting a's dims contract[0] with b's contract[1] (no batch dims) should take
    them: both as fp32 where `widens()`, one of them is 16-bit, neither is narrower (fp8 keeps its own GEMM)
    and rows, columns and contraction are all at least MIN_DIM; else unchanged."""
    dts = {jnp.dtype(a.dtype), jnp.dtype(b.dtype)}
    if not widens() or not dts & set(_NARROW) or not dts <= {*_NARROW, jnp.dtype(jnp.float32)}:
        return a, b
    k = math.prod(a.shape[i] for i in contract[0])
    if not pays(a.size // max(k, 1), k, b.size // max(k, 1)):
        return a, b
    return a.astype(jnp.float32), b.astype(jnp.float32)


def dense(x_bk: jax.Array, w_kn: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] as one 2-D GEMM over the flattened leading dims, in x's and w's result dtype (the
    plain `Linear`'s GEMM and the packed NVFP4 reference's). Flattened because XLA's CPU backward of a batched
    "...k,kn" contraction is slow in bf16 (in_proj forward + backward 210 ms against 31 ms flattened on the
    bench config, issue 14)."""
    out = jnp.result_type(x_bk, w_kn)
    y = jnp.dot(*operands(x_bk.reshape(-1, x_bk.shape[-1]), w_kn, ((1,), (0,)))).astype(out)
    return y.reshape(*x_bk.shape[:-1], w_kn.shape[-1])
