"""One NVFP4 QDQ entry point that picks the implementation: the Pallas kernel or the jnp reference.

The op owns the dispatch, as `nemotron_jax.ops.ssd` does: it asks the kernel's ``supports`` once per
call (the kernel does not check again), fails closed for a named kernel impl, and decides from
`nemotron_jax.platform` whether the kernel runs interpreted (the kernel is told, never asks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax import platform
from nemotron_jax.quant import nvfp4
from pallas_kernels import nvfp4 as nvfp4_kernel

IMPLS = ("auto", "reference", "pallas", "pallas_interpret")
# The names a model config may choose (ModelConfig.nvfp4_impl is checked against this tuple, imported inside
# its validation, as ssd_impl is checked against nemotron_jax.ops.ssd.IMPLS). "pallas_interpret" is a testing
# switch, not a config choice: "pallas" already runs interpreted off GPU.
CONFIG_IMPLS = ("auto", "reference", "pallas")


def resolve(impl: str, shape, dtype, block=(1, 16)) -> str:
    """The impl that runs for an input of ``shape``/``dtype``: "reference", "pallas" or "pallas_interpret".
    Only "auto" falls back (to the reference, off GPU or where the kernel's ``supports`` says no); a named
    kernel impl fails closed with a ValueError naming the shape, dtype and block."""
    return _resolve(impl, jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)), tuple(block))


def _resolve(impl: str, x: jax.Array, block) -> str:
    """The impl that runs: "reference", "pallas" or "pallas_interpret". Only "auto" falls back."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: use one of {IMPLS}")
    if impl == "reference":
        return impl
    if impl == "auto":
        return "pallas" if platform.on_gpu() and nvfp4_kernel.supports(x.shape, x.dtype, block) else "reference"
    if not nvfp4_kernel.supports(x.shape, x.dtype, block):
        raise ValueError(f"the NVFP4 Pallas kernel does not support shape {x.shape}, dtype {x.dtype}, "
                         f"block {block}; use impl='reference' or 'auto' (ModelConfig.nvfp4_impl)")
    return impl


def _interpret(impl: str) -> bool:
    return impl == "pallas_interpret" or platform.interpret_default()


def qdq_unscaled(x: jax.Array, *, block=(1, 16), rounding: str = "nearest", key: jax.Array | None = None,
                 bits: jax.Array | None = None, hadamard: bool = False, amax: jax.Array | None = None,
                 impl: str = "auto", dtype=jnp.bfloat16, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """(codes * s_b in ``dtype``, S_dec): the GEMM operand as the tensor core sees it. codes * s_b is exact in
    bf16, so a bf16 GEMM with fp32 accumulation times S_dec,A * S_dec,B reproduces NVFP4 GEMM numerics.
    axis=0 (2-D x): blocks along rows, = qdq_unscaled(x.T).T (see ``nvfp4.qdq_unscaled``)."""
    block = tuple(block)
    impl = _resolve(impl, jax.ShapeDtypeStruct(x.shape[::-1], x.dtype) if axis == 0 else x, block)
    if impl == "reference":
        return nvfp4.qdq_unscaled(x, block=block, rounding=rounding, key=key, bits=bits, hadamard=hadamard,
                                  amax=amax, axis=axis, dtype=dtype)
    if axis == 0:  # the kernel blocks along the last axis
        y, s_dec = qdq_unscaled(x.T, block=block, rounding=rounding, key=key, bits=None if bits is None else bits.T,
                                hadamard=hadamard, amax=amax, impl=impl, dtype=dtype)
        return y.T, s_dec
    bits, seed, s_enc, s_dec = _kernel_inputs(x, rounding, key, bits, hadamard, amax)
    y, _ = nvfp4_kernel.qdq_kernel(x, jnp.stack([s_enc, s_dec]), block=block, rounding=rounding, bits=bits,
                                   seed=seed, hadamard=hadamard, out_dtype=dtype, apply_tensor_scale=False,
                                   interpret=_interpret(impl))
    return y, s_dec


def _kernel_inputs(x, rounding, key, bits, hadamard, amax):
    """(bits, seed, S_enc, S_dec): with a key, the kernel hashes the bits itself from ``nvfp4.key_seed(key)``
    (the same bits as ``nvfp4.random_bits(key, x.shape)``, none written to memory)."""
    seed = None
    if rounding == "stochastic" and bits is None:
        if key is None:
            raise ValueError("rounding='stochastic' needs key= or bits=")
        seed = nvfp4.key_seed(key)
    if amax is None:
        amax = jnp.max(jnp.abs(nvfp4.rht(x) if hadamard else x.astype(jnp.float32)))
    s_enc, s_dec = nvfp4.tensor_scales(amax)
    return bits, seed, s_enc, s_dec


def qdq(x: jax.Array, *, block=(1, 16), rounding: str = "nearest", key: jax.Array | None = None,
        bits: jax.Array | None = None, hadamard: bool = False, amax: jax.Array | None = None,
        impl: str = "auto") -> jax.Array:
    """NVFP4 quantize-dequantize of x (same shape and dtype; rotated basis when hadamard=True).

    impl: "reference" (jnp), "pallas" (the fused kernel; interpreted when not on GPU),
    "pallas_interpret" (force interpret mode), or "auto": the kernel on GPU when ``supports`` says so, the
    reference elsewhere. All give identical values for the same inputs (and the same bits: ``nvfp4.random_bits``
    of ``key``, which the kernel hashes in-kernel from ``nvfp4.key_seed(key)``).
    """
    block = tuple(block)
    impl = _resolve(impl, x, block)
    if impl == "reference":
        return nvfp4.qdq(x, block=block, rounding=rounding, key=key, bits=bits, hadamard=hadamard, amax=amax)
    bits, seed, s_enc, s_dec = _kernel_inputs(x, rounding, key, bits, hadamard, amax)
    y, _ = nvfp4_kernel.qdq_kernel(x, jnp.stack([s_enc, s_dec]), block=block, rounding=rounding, bits=bits,
                                   seed=seed, hadamard=hadamard, interpret=_interpret(impl))
    return y
