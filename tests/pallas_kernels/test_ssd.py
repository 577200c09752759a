"""The portable SSD Pallas kernel (interpret mode on CPU) against the token-by-token reference: forward, final
state, gradients (the op's custom_vjp with the chunked backward), packed documents, the kernel's supports().

Same tolerance rationale as tests/ops/test_ssd.py: fp32, max|a - ref| / max|ref| <= 1e-5 for values
and states, 5e-5 for gradients. Interpreted grids are kept small (b * h * p/block_p <= 8 programs,
3 chunks each) because every interpreted grid step costs ~0.1 ms plus tracing.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.ops.ssd import ssd, ssd_pallas
from pallas_kernels import ssd as kernel
from tests.helpers.ssd import GRAD_NAMES, assert_close, check_packed_equals_separate, grads, make_inputs

TOL, GTOL = 1e-5, 5e-5
SHAPE = dict(b=2, t=37, h=4, p=16, g=2, n=16)   # T = 37 with chunk 16: 3 chunks, ragged last one
SEG = jnp.array([[0] * 10 + [1] * 20 + [0] * 7, [5] * 3 + [6] * 34], jnp.int32)


@functools.lru_cache(maxsize=None)
def _run(impl, with_segments=False, **shape):
    inputs = make_inputs(**(shape or SHAPE))
    seg = SEG if with_segments else None
    y, S = jax.jit(lambda *a: ssd(*a[:5], chunk_size=16, initial_state=a[5], return_final_state=True,
                                  segment_ids=seg, impl=impl))(*inputs)
    return y, S


@pytest.mark.parametrize("with_segments", [False, True])
def test_pallas_forward_matches_reference(with_segments):
    x = make_inputs(**SHAPE)[0]
    y, S = _run("pallas", with_segments)
    y_ref, S_ref = _run("reference", with_segments)
    assert y.shape == x.shape and y.dtype == x.dtype and S.dtype == jnp.float32
    assert_close(y, y_ref, TOL, "y")
    assert_close(S, S_ref, TOL, "final state")


def test_pallas_p_split_and_single_group():
    """block_p < p (grid over p-slices, state slice per program) and g = 1 (all heads share B/C)."""
    shape = dict(b=1, t=21, h=2, p=32, g=1, n=16)
    x, dt, A, B, C, S0 = make_inputs(**shape)
    y, S = jax.jit(lambda *a: ssd_pallas(*a[:5], chunk_size=16, initial_state=a[5], block_p=16))(
        x, dt, A, B, C, S0)
    y_ref, S_ref = _run("reference", **shape)
    assert_close(y, y_ref, TOL, "y")
    assert_close(S, S_ref, TOL, "final state")


def test_pallas_gradients_match_reference():
    inputs = make_inputs(**SHAPE)
    g = grads("pallas", 16, inputs, SEG)
    g_ref = grads("reference", 16, inputs, SEG)
    for name, a, ref in zip(GRAD_NAMES, g, g_ref):
        assert_close(a, ref, GTOL, f"d loss / d {name}")


def test_pallas_packed_documents():
    check_packed_equals_separate("pallas", chunk_size=16)


def test_pallas_bf16_inputs():
    x, dt, A, B, C, S0 = make_inputs(**SHAPE, dtype=jnp.bfloat16)
    y, S = jax.jit(lambda *a: ssd(*a[:5], chunk_size=16, initial_state=a[5], return_final_state=True,
                                  impl="pallas"))(x, dt, A, B, C, S0)
    y_ref, S_ref = jax.jit(lambda *a: ssd(*a[:5], chunk_size=16, initial_state=a[5], return_final_state=True,
                                          impl="chunked"))(x, dt, A, B, C, S0)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), 1e-2, "y (bf16 output rounding)")
    assert_close(S, S_ref, TOL, "final state")


@pytest.mark.parametrize("x_shape,B_shape,chunk,dtype,ok", [
    ((2, 1000, 64, 64), (2, 1000, 8, 128), 128, jnp.bfloat16, True),    # Nano's heads, any T
    ((1, 37, 4, 16), (1, 37, 2, 16), 16, jnp.float32, True),
    ((1, 37, 4, 16), (1, 37, 2, 16), 16, jnp.float16, True),
    ((1, 37, 4, 8), (1, 37, 2, 16), 16, jnp.float32, False),            # p < 16 (dot tile)
    ((1, 37, 4, 16), (1, 37, 2, 24), 16, jnp.float32, False),           # n not a power of two
    ((1, 37, 4, 16), (1, 37, 2, 16), 48, jnp.float32, False),           # chunk not a power of two
    ((1, 37, 4, 16), (1, 37, 2, 16), 512, jnp.float32, False),          # chunk too large
    ((1, 37, 4, 16), (1, 37, 3, 16), 16, jnp.float32, False),           # h % g != 0
    ((1, 37, 4, 16), (1, 37, 2, 16), 16, jnp.int32, False),             # dtype
])
def test_supports_portable(x_shape, B_shape, chunk, dtype, ok):
    assert kernel.supports(x_shape, B_shape, chunk, dtype) is ok


@pytest.mark.parametrize("dtype,with_segments,opts", [
    (jnp.bfloat16, True, dict(block_p=32, num_warps=8)),
    (jnp.float32, False, dict()),
])
def test_kernel_lowers_to_triton_for_h200_without_a_gpu(dtype, with_segments, opts):
    """Cross-lower (no compile, no GPU) at Nano's head shapes for an abstract H200: this runs the
    Pallas -> Triton IR lowering, which rejects unsupported primitives and non-power-of-two tiles.
    PTX compilation and resource limits are only checked by benchmarks/gpu_ssd.py on a GPU."""
    # Both exist in the jax this project pins (>= 0.11.2); if an upgrade removes them the test must fail, not skip.
    assert hasattr(jax.sharding, "AbstractDevice")
    from jax._src.pallas.triton import pallas_call_registration  # noqa: F401
    b, t, h, p, g, n = 1, 200, 64, 64, 8, 128
    sds = jax.ShapeDtypeStruct
    args = [sds((b, t, h, p), dtype), sds((b, t, h), jnp.float32), sds((h,), jnp.float32),
            sds((b, t, g, n), dtype), sds((b, t, g, n), dtype), sds((b, h, p, n), jnp.float32),
            sds((b, t), jnp.int32) if with_segments else None]

    def f(x, dt, A, B, C, S0, run_ids):
        return ssd_pallas(x, dt, A, B, C, chunk_size=128, initial_state=S0, run_ids=run_ids,
                          interpret=False, backend="portable", **opts)

    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("d",), abstract_device=h200)), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # the Pallas Triton backend's notice
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


def test_pallas_strong_decay_and_resets_stay_finite():
    x, dt, A, B, C, S0 = make_inputs(seed=3, b=1, t=40, h=2, p=16, g=1, n=16, a_scale=60.0)
    seg = jnp.asarray(np.repeat(np.arange(8), 5)[None])
    run = jax.jit(lambda *a, impl: ssd(*a[:5], chunk_size=32, initial_state=a[5], segment_ids=seg,
                                       return_final_state=True, impl=impl), static_argnames="impl")
    y, S = run(x, 4.0 * dt, A, B, C, S0, impl="pallas")
    y_ref, S_ref = run(x, 4.0 * dt, A, B, C, S0, impl="reference")
    assert_close(y, y_ref, TOL, "y")
    assert_close(S, S_ref, TOL, "final state")
