"""NVFP4 weights kept packed in memory (ModelOpt's unified layout) and dequantized inside the GEMM.

`from_hf(path, dequantize=False)` (nemotron_jax/convert/hf.py) gives every NVFP4 weight of the checkpoint as
a `PackedNVFP4` in an `NVFP4Weight` variable, in the checkpoint's own layout (no transpose copy at load):

    codes    uint8         [..., N, K/2]  two E2M1 codes per byte, element 2j in the LOW nibble, 2j+1 HIGH
    scales   float8_e4m3fn [..., N, K/16] one block scale per 16 inputs
    scale_2  float32       [...]          the per-matrix (per-expert) scale

for an HF weight [N, K] (out x in), so 4.5 bits per weight plus 4 bytes per matrix. Value of element (n, k):
E2M1(code) * (float32(scales[n, k // 16]) * scale_2) in fp32 (code 8, negative zero, is +0), exactly
`nemotron_jax.convert.modelopt.nvfp4_dequantize`; then cast to the compute dtype. Leading axes [...] are the
stacked routed experts ([E, N, K/2], scale_2 [E]).

`NVFP4Weight` is an nnx.Variable but not an nnx.Param: optimizers built on nnx.Param never see it, and the
packed GEMMs refuse a backward pass (`PackedWeightError`): a packed model is for inference; load with
`dequantize=True` to train or fine-tune.

The GEMM (`dequant_matmul`): y[..., n] = sum_k x[..., k] W[n, k], contracted on K against the [N, K] layout.
"reference" dequantizes the whole matrix in jnp inside jit (fp32 values, cast to the compute dtype, written
straight into the [K, N] operand in one elementwise pass, `dequantize_kn`) and runs the same GEMM as the
BF16 `Linear` (`ops.matmul.dense`), so the logits equal the dequantize-at-load model's exactly; the full
compute-dtype matrix exists only as a temporary of that GEMM. "pallas" is
pallas_kernels/nvfp4_matmul.py (tiles of codes and scales dequantized in registers, fp32 accumulation;
agrees with the reference within the accumulation-order bound stated there). The dispatch follows
`nemotron_jax.quant.dispatch`: the kernel's `supports` is asked once per call, "auto" falls back to the
reference (off GPU or on unsupported shapes), a named kernel impl fails closed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax import platform
from nemotron_jax.ops import matmul
from pallas_kernels import nvfp4_matmul as kernel

GROUP = 16
IMPLS = ("auto", "reference", "pallas", "pallas_interpret")
# The impl a packed model runs unless told otherwise (from_hf(..., packed_impl=...)): the reference until
# the compiled kernel has been checked on a GPU (as ModelConfig.nvfp4_impl and ssd_impl wait for theirs).
DEFAULT_IMPL = "reference"

# E2M1 code -> value: sign bit 3, magnitude index into (0, 0.5, 1, 1.5, 2, 3, 4, 6); code 8 (-0) is +0.
# Built here from the format, not imported from convert/ (the layer above); tests compare it with ModelOpt's.
_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_TABLE = np.concatenate([_MAG, np.where(_MAG == 0, np.float32(0.0), -_MAG)]).astype(np.float32)


class PackedWeightError(RuntimeError):
    """A packed (inference-only) NVFP4 weight was used where a trainable one is needed."""


_NOT_TRAINABLE = ("packed NVFP4 weights (from_hf(..., dequantize=False)) are inference-only: the backward "
                  "pass through a packed GEMM is refused. Load with from_hf(path, dequantize=True) to train "
                  "or fine-tune (the same values, dequantized once at load)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedNVFP4:
    """One NVFP4 matrix [N, K] (or a stack [..., N, K]) in ModelOpt's layout; see the module docstring."""

    codes: Any    # uint8 [..., N, K/2]
    scales: Any   # float8_e4m3fn [..., N, K/16]
    scale_2: Any  # float32 [...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized shape [..., N, K] (HF's out x in)."""
        *lead, n, half = self.codes.shape
        return (*lead, n, 2 * half)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scales, self.scale_2))

    @classmethod
    def from_arrays(cls, codes, scales, scale_2) -> "PackedNVFP4":
        """Validated host arrays -> device arrays (scales given as float8_e4m3fn or their uint8 bytes)."""
        codes = np.asarray(codes)
        scales = np.asarray(scales)
        scale_2 = np.asarray(scale_2, np.float32)
        if codes.dtype != np.uint8:
            raise ValueError(f"NVFP4 codes must be uint8, got {codes.dtype}")
        if scales.dtype == np.uint8:
            scales = scales.view(jnp.float8_e4m3fn)
        if scales.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"NVFP4 block scales must be float8_e4m3fn, got {scales.dtype}")
        if codes.ndim < 2 or scales.shape != (*codes.shape[:-1], 2 * codes.shape[-1] // GROUP) \
                or (2 * codes.shape[-1]) % GROUP:
            raise ValueError(f"NVFP4 codes {codes.shape} and block scales {scales.shape} do not match: a "
                             f"[..., N, K] weight needs codes [..., N, K/2] and scales [..., N, K/{GROUP}]")
        if scale_2.shape != codes.shape[:-2]:
            raise ValueError(f"NVFP4 scale_2 of shape {scale_2.shape}; codes {codes.shape} need {codes.shape[:-2]}")
        return cls(jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(scale_2))


class NVFP4Weight(nnx.Variable):
    """A packed NVFP4 weight (value: `PackedNVFP4`). Not an nnx.Param: the optimizer never sees it.

    Metadata: `impl`, the dequantize-GEMM implementation ("reference", "auto", "pallas")."""


def is_packed(v) -> bool:
    return isinstance(v, NVFP4Weight)


def packed_weights(model) -> dict[str, PackedNVFP4]:
    """{path: PackedNVFP4} of every packed weight under `model` (an nnx module or its state)."""
    state = nnx.state(model, NVFP4Weight) if isinstance(model, nnx.Module) else model
    flat = nnx.to_flat_state(state)
    return {".".join(map(str, p)): v.get_value() for p, v in flat if isinstance(v, NVFP4Weight)}


def check_trainable(model) -> None:
    """Raise PackedWeightError when `model` holds packed NVFP4 weights (a training entry point may call this
    before building its optimizer; the packed GEMMs refuse a backward pass in any case)."""
    found = packed_weights(model)
    if found:
        names = sorted(found)
        raise PackedWeightError(f"{_NOT_TRAINABLE}. Packed: {', '.join(names[:4])}"
                                + (f" and {len(names) - 4} more" if len(names) > 4 else ""))


# ----------------------------------------------------------------------------- jnp reference
def dequantize(p: PackedNVFP4, dtype=jnp.float32) -> jax.Array:
    """[..., N, K] in `dtype`: E2M1(code) * (f32(scale) * scale_2), computed in fp32 (ModelOpt's order), then
    cast once. Bit-identical to convert.modelopt.nvfp4_dequantize (tests/quant/test_packed.py)."""
    codes = p.codes
    *lead, n, half = codes.shape
    k = 2 * half
    idx = jnp.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*lead, n, k)  # element 2j low, 2j+1 high
    vals = jnp.asarray(E2M1_TABLE)[idx]
    block = p.scales.astype(jnp.float32) * jnp.asarray(p.scale_2, jnp.float32)[..., None, None]
    w = (vals.reshape(*lead, n, k // GROUP, GROUP) * block[..., None]).reshape(*lead, n, k)
    return w.astype(dtype)


def dequantize_kn(p: PackedNVFP4, dtype=jnp.float32) -> jax.Array:
    """The same values as `dequantize`, produced directly in our [..., K, N] (in x out) GEMM layout: the codes
    and scales are read transposed inside the one elementwise pass, so no transpose op reaches the GEMM.
    (A transposed operand would let XLA fold the transpose into the dot, and XLA:CPU then runs a different
    GEMM, e.g. an fp32-upcast one for bf16, whose rounding differs from the BF16 Linear's for some shapes.)"""
    codes = jnp.swapaxes(p.codes, -1, -2)  # [..., K/2, N]
    *lead, half, n = codes.shape
    k = 2 * half
    idx = jnp.stack([codes & 0x0F, codes >> 4], axis=-2).reshape(*lead, k, n)  # row 2j low, 2j+1 high
    vals = jnp.asarray(E2M1_TABLE)[idx]
    block = (jnp.swapaxes(p.scales, -1, -2).astype(jnp.float32)
             * jnp.asarray(p.scale_2, jnp.float32)[..., None, None])  # [..., K/16, N]
    w = (vals.reshape(*lead, k // GROUP, GROUP, n) * block[..., :, None, :]).reshape(*lead, k, n)
    return w.astype(dtype)


@jax.custom_vjp
def _inference_only(y):
    return y


def _inference_only_fwd(y):
    return y, None


def _inference_only_bwd(_, g):
    raise PackedWeightError(_NOT_TRAINABLE)


_inference_only.defvjp(_inference_only_fwd, _inference_only_bwd)


def inference_only(y: jax.Array) -> jax.Array:
    """Identity whose backward raises PackedWeightError (at trace time of jax.grad / nnx.grad)."""
    return _inference_only(y)


def dequant_matmul_reference(x: jax.Array, p: PackedNVFP4, dtype=None) -> jax.Array:
    """y [..., N] = x [..., K] @ dequantize(p).T in `dtype` (default x's): the BF16 Linear's GEMM
    (`ops.matmul.dense`), with the weight dequantized in fp32 and cast to `dtype` first."""
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    n, k = p.shape[-2:]
    if x.shape[-1] != k:
        raise ValueError(f"dequant_matmul: x has {x.shape[-1]} inputs, the packed weight [{n}, {k}] needs {k}")
    w_kn = dequantize_kn(p, jnp.float32).astype(dtype)  # [K, N], as the Linear's kernel
    return matmul.dense(x.astype(dtype), w_kn)


# ----------------------------------------------------------------------------- dispatch
def resolve(impl: str, x_shape, n: int, k: int, dtype) -> str:
    """The impl that runs: "reference", "pallas" or "pallas_interpret". Only "auto" falls back (to the
    reference off GPU, or where the kernel's `supports` says no); a named kernel impl fails closed."""
    if impl not in IMPLS:
        raise ValueError(f"packed NVFP4 impl={impl!r}: use one of {IMPLS}")
    if impl == "reference":
        return impl
    m = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
    ok = kernel.supports((m, k), n, dtype)
    if impl == "auto":
        return "pallas" if platform.on_gpu() and ok else "reference"
    if not ok:
        raise ValueError(f"the NVFP4 dequantize-matmul kernel does not support x {tuple(x_shape)} ({jnp.dtype(dtype)}) "
                         f"against a packed [{n}, {k}] weight; use impl='reference' or 'auto'")
    return impl


def dequant_matmul(x: jax.Array, p: PackedNVFP4, *, dtype=None, impl: str = DEFAULT_IMPL) -> jax.Array:
    """y [..., N] = x [..., K] @ W.T for a packed NVFP4 W [N, K], in `dtype` (default x's); inference only
    (a backward pass raises PackedWeightError). impl: "reference" | "auto" | "pallas" | "pallas_interpret"."""
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    if p.codes.ndim != 2:
        raise ValueError(f"dequant_matmul takes one packed matrix; got codes {p.codes.shape}")
    n, k = p.shape
    which = resolve(impl, x.shape, n, k, dtype)
    return _packed_gemm(jnp.dtype(dtype).name, which, x, p)


def _packed_gemm_impl(dtype: str, which: str, x, p):
    if which == "reference":
        return dequant_matmul_reference(x, p, dtype)
    n, k = p.shape
    y2 = kernel.nvfp4_matmul(x.astype(dtype).reshape(-1, k), p.codes,
                             jax.lax.bitcast_convert_type(p.scales, jnp.uint8),
                             jnp.asarray(p.scale_2, jnp.float32).reshape(1), out_dtype=jnp.dtype(dtype),
                             interpret=which == "pallas_interpret" or platform.interpret_default())
    return y2.reshape(*x.shape[:-1], n)


# the whole packed GEMM is one custom_vjp whose backward refuses (the Pallas call has no JVP of its own, so a
# guard after it would never be reached: JAX's linearization would fail first with a less helpful message)
_packed_gemm = jax.custom_vjp(_packed_gemm_impl, nondiff_argnums=(0, 1))
_packed_gemm.defvjp(lambda dtype, which, x, p: (_packed_gemm_impl(dtype, which, x, p), None),
                    lambda dtype, which, res, g: _inference_only_bwd(res, g))


def dequantize_stacked(p: PackedNVFP4, dtype) -> jax.Array:
    """Stacked expert weights [E, N, K] packed -> [E, K, N] (our [expert, in, out] layout) in `dtype`, for the
    grouped GEMM. Dequantized in fp32 then cast, so the values equal the dequantize-at-load model's."""
    return dequantize_kn(p, jnp.float32).astype(dtype)
