"""The Mosaic GPU SSD kernel (pallas_kernels/ssd_mosaic.py), run by Mosaic GPU's CPU interpreter.

Oracle: the token-by-token scan on the same (16-bit) input values upcast to fp32. The kernel
rounds three intermediates to the input dtype for its wgmma operands (the intra-block weights W,
the carried state for y, stw*B for the block state; see the module docstring), each a relative
error of at most 2^-9 (bf16) or 2^-12 (f16) per element. Summed over a block and normalised by
max |y| these stay within a few units of that: tolerances 4 * 2^-8 = 1.6e-2 (bf16) and
4 * 2^-11 = 2e-3 (f16). An indexing or masking bug gives O(1) errors. The interpreter runs with
its race detector on, so a missing barrier wait, SMEM commit or TMA wait fails the test.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from nemotron_jax.ops.ssd import backend_for, segment_runs, ssd, ssd_pallas, ssd_reference
from pallas_kernels import ssd_mosaic
from tests.helpers.ssd import GRAD_NAMES, assert_close, check_packed_equals_separate, grads, make_inputs, rel_err

TOL = {jnp.bfloat16: 4 * 2.0 ** -8, jnp.float16: 4 * 2.0 ** -11}
RACES = plgpu.InterpretGPUParams(detect_races=True)
SHAPE = dict(b=2, t=100, h=4, p=64, g=2, n=64)   # two 64-token blocks, ragged; groups > 1; batch > 1
SEG = jnp.array([[0] * 30 + [1] * 45 + [2] * 25, [4] * 70 + [9] * 30], jnp.int32)


def up(a):
    return a.astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _case(dtype, with_segments, **shape):
    x, dt, A, B, C, S0 = make_inputs(seed=1, **(shape or SHAPE), dtype=dtype, a_scale=0.3)
    B, C = B / 4, C / 4          # keeps |y| ~ 1 so that the f16 intermediates stay far from overflow
    run_ids = segment_runs(SEG) if with_segments else None
    y, S = jax.jit(lambda *a: ssd_pallas(*a[:5], chunk_size=128, initial_state=a[5], run_ids=run_ids,
                                         interpret=RACES, backend="mosaic_gpu"))(x, dt, A, B, C, S0)
    y_ref, S_ref = jax.jit(ssd_reference)(up(x), dt, A, up(B), up(C), S0, run_ids)
    return (x, y, S), (y_ref, S_ref)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("with_segments", [False, True])
def test_mosaic_forward_matches_token_reference(dtype, with_segments):
    (x, y, S), (y_ref, S_ref) = _case(dtype, with_segments)
    assert y.shape == x.shape and y.dtype == x.dtype and S.dtype == jnp.float32
    assert_close(up(y), y_ref, TOL[dtype], "y")
    assert_close(S, S_ref, TOL[dtype], "final state")


def test_mosaic_nano_state_size_single_group():
    """n = 128 (Nano's state), g = 1, one ragged block, batch 1."""
    (_, y, S), (y_ref, S_ref) = _case(jnp.bfloat16, False, b=1, t=50, h=2, p=64, g=1, n=128)
    assert_close(up(y), y_ref, TOL[jnp.bfloat16], "y")
    assert_close(S, S_ref, TOL[jnp.bfloat16], "final state")


def test_mosaic_error_shrinks_with_precision():
    """The kernel's error is rounding, not a wrong formula: f16 (3 more mantissa bits) must be
    clearly more accurate than bf16 on the same values (a formula bug would cost both alike)."""
    errs = []
    for dtype in (jnp.bfloat16, jnp.float16):
        (_, y, _), (y_ref, _) = _case(dtype, True)
        errs.append(rel_err(up(y), y_ref))
    assert errs[1] < errs[0] / 3, errs


def test_mosaic_gradients_are_the_chunked_vjp():
    """The backward is the chunked op's VJP: the kernel path's gradients equal it (up to XLA
    fusion order), and the chunked op's gradients are checked against the oracle in test_ssd.py."""
    inputs = make_inputs(seed=2, b=1, t=70, h=2, p=64, g=1, n=64, dtype=jnp.bfloat16)
    seg = jnp.array([[0] * 40 + [1] * 30], jnp.int32)
    g_kernel = grads("pallas", 64, inputs, seg)
    g_chunked = grads("chunked", 64, inputs, seg)
    for name, a, ref in zip(GRAD_NAMES, g_kernel, g_chunked):
        assert_close(up(a), up(ref), 1e-6, f"d loss / d {name}")


def test_mosaic_packed_documents():
    """Packed rows equal the documents run separately (both through the kernel)."""
    check_packed_equals_separate("pallas", chunk_size=64, tol=TOL[jnp.bfloat16], p=64, n=64,
                                 dtype=jnp.bfloat16)


@pytest.mark.parametrize("x_shape,B_shape,dtype,backend", [
    ((2, 1000, 64, 64), (2, 1000, 8, 128), jnp.bfloat16, "mosaic_gpu"),    # Nano's heads
    ((1, 37, 4, 64), (1, 37, 2, 64), jnp.float16, "mosaic_gpu"),
    ((1, 37, 4, 64), (1, 37, 2, 64), jnp.float32, "portable"),             # fp32: no 16-bit wgmma
    ((1, 37, 4, 32), (1, 37, 2, 64), jnp.bfloat16, "portable"),            # p != 64
    ((1, 37, 4, 64), (1, 37, 2, 256), jnp.bfloat16, "portable"),           # n = 256: SMEM budget
    ((1, 37, 4, 64), (1, 37, 3, 64), jnp.bfloat16, None),                  # h % g != 0
    ((1, 37, 4, 64), (1, 37, 2, 48), jnp.bfloat16, None),                  # n: neither kernel
])
def test_backend_choice(x_shape, B_shape, dtype, backend):
    assert backend_for(x_shape, B_shape, chunk_size=64, dtype=dtype) == backend
    assert ssd_mosaic.supports(x_shape, B_shape, 64, dtype) is (backend == "mosaic_gpu")


def test_named_backend_refuses_unsupported_shapes():
    x, dt, A, B, C, _ = make_inputs(b=1, t=8, h=2, p=16, g=1, n=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="'mosaic_gpu' does not support"):
        ssd_pallas(x, dt, A, B, C, chunk_size=16, backend="mosaic_gpu")
    # "auto" on CPU is the chunked op whatever the shapes
    y_auto = ssd(x, dt, A, B, C, chunk_size=16, impl="auto")
    y_chunked = ssd(x, dt, A, B, C, chunk_size=16, impl="chunked")
    np.testing.assert_array_equal(np.asarray(up(y_auto)), np.asarray(up(y_chunked)))


@pytest.mark.parametrize("with_segments", [False, True])
def test_mosaic_kernel_lowers_for_h200_without_a_gpu(with_segments):
    """Cross-lower (no GPU) at Nano's head shapes for an abstract H200: runs the Pallas -> Mosaic
    GPU lowering (layout inference, wgmma operand checks, SMEM allocation) and emits the Mosaic
    GPU custom call. PTX compilation and timing only happen in benchmarks/gpu_ssd.py on a GPU."""
    b, t, h, p, g, n = 1, 200, 64, 64, 8, 128
    sds = jax.ShapeDtypeStruct
    args = [sds((b, t, h, p), jnp.bfloat16), sds((b, t, h), jnp.float32), sds((h,), jnp.float32),
            sds((b, t, g, n), jnp.bfloat16), sds((b, t, g, n), jnp.bfloat16), sds((b, h, p, n), jnp.float32),
            sds((b, t), jnp.int32) if with_segments else None]

    def f(x, dt, A, B, C, S0, run_ids):
        return ssd_pallas(x, dt, A, B, C, chunk_size=128, initial_state=S0, run_ids=run_ids,
                          interpret=False, backend="mosaic_gpu")

    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("d",), abstract_device=h200)), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    assert "xla.gpu.triton" not in text
