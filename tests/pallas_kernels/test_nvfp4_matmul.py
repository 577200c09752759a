"""The NVFP4 dequantize-matmul Pallas kernel (pallas_kernels/nvfp4_matmul.py), interpreted on CPU, against the
jnp reference (nemotron_jax/quant/packed.py) and a float64 oracle; its Triton lowering for an abstract H200."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemotron_jax.convert import modelopt as mo
from nemotron_jax.quant import packed as P
from pallas_kernels import nvfp4_matmul as K


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def run(x, p, **kw):
    return K.nvfp4_matmul(x, p.codes, jax.lax.bitcast_convert_type(p.scales, jnp.uint8),
                          jnp.asarray(p.scale_2).reshape(1), interpret=True, **kw)


def test_in_kernel_decoders_are_exact():
    b = np.arange(256, dtype=np.uint8)
    want = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(K._e4m3(jnp.asarray(b, jnp.int32)))
    finite = ~np.isnan(want)
    assert np.flatnonzero(~finite).tolist() == [0x7F, 0xFF]  # the loader refuses these bytes
    np.testing.assert_array_equal(bits(got[finite]), bits(want[finite]))  # subnormals, +-0, 448 included
    np.testing.assert_array_equal(bits(K._e2m1(jnp.arange(16))), bits(mo.E2M1_VALUES))  # code 8 -> +0


def _exact_case(m, n, k, seed):
    """Operands whose every partial sum is exact in fp32 (and whose inputs are exact in bf16): integer x in
    [-3, 3], power-of-two block scales and scale_2, so any accumulation order gives the same bits."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scales = (2.0 ** rng.integers(-3, 4, (n, k // 16))).astype(ml_dtypes.float8_e4m3fn)
    p = P.PackedNVFP4.from_arrays(mo.pack_e2m1(codes), scales, np.float32(0.25))
    x = rng.integers(-3, 4, (m, k)).astype(np.float32)
    return x, p


@pytest.mark.parametrize("m,n,k,blocks", [(1, 64, 256, None), (37, 48, 96, None), (130, 128, 512, None),
                                          (20, 64, 256, (16, 32, 32))])  # last: 2 M tiles, 2 N, 8 K steps
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bit_identical_to_reference_when_sums_are_exact(m, n, k, blocks, dtype):
    x, p = _exact_case(m, n, k, seed=m + n + k)
    x = jnp.asarray(x, dtype)
    got = run(x, p, blocks=blocks)
    want = P.dequant_matmul_reference(x, p)
    assert got.dtype == dtype and got.shape == (m, n)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("m,n,k", [(1, 1856 // 8, 2688 // 8), (16, 96, 464), (70, 64, 1024)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_within_the_accumulation_order_bound(m, n, k, dtype):
    """Real-valued data: the dequantized weights (in the compute dtype) are the reference's bit for bit and
    their products with x are exact in fp32, so kernel and reference differ only in the order of the fp32
    accumulation; each is within gamma = 2 K 2^-24 of |x| @ |W|.T of the exact (float64) product of the same
    operands, plus, for a bf16 output, one bf16 rounding (2^-8 relative)."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(0.05)
    p = P.PackedNVFP4.from_arrays(*mo.nvfp4_quantize(w))
    x = jnp.asarray(rng.standard_normal((m, k)) * 3, dtype)
    got = np.asarray(run(x, p), np.float64)
    ref = np.asarray(P.dequant_matmul_reference(x, p), np.float64)
    # the GEMM's operand: the fp32 dequantized weight cast to the compute dtype (both paths do exactly this)
    wd = mo.nvfp4_dequantize(p.codes, p.scales, p.scale_2).astype(dtype).astype(np.float64)
    x64 = np.asarray(x, np.float64)
    exact = x64 @ wd.T
    gamma = 2 * k * 2.0 ** -24 * (np.abs(x64) @ np.abs(wd).T)
    out = 2.0 ** -8 * np.abs(exact) if dtype == jnp.bfloat16 else 0.0
    assert np.all(np.abs(got - exact) <= gamma + out)
    assert np.all(np.abs(ref - exact) <= gamma + out)
    assert np.all(np.abs(got - ref) <= 2 * gamma + 2 * out)
    if dtype == jnp.float32:  # not vacuous: the kernel's error is far below the bf16 rounding
        assert np.max(np.abs(got - exact) / (np.abs(x64) @ np.abs(wd).T)) < 2.0 ** -18


def test_supports():
    assert K.supports((1, 2688), 1856, jnp.bfloat16)
    assert K.supports((512, 1856), 2688, jnp.float32)
    assert K.supports((3, 16), 16, jnp.float16)
    assert not K.supports((4, 2688), 1850, jnp.bfloat16)   # N % 16
    assert not K.supports((4, 40), 64, jnp.bfloat16)        # K % 16
    assert not K.supports((4, 64), 64, jnp.int8)
    assert not K.supports((2, 4, 64), 64, jnp.bfloat16)     # 2-D x only (the dispatch flattens)
    assert not K.supports((2 ** 20, 4096), 64, jnp.bfloat16)  # offsets past int32
    assert K.block_sizes(1, 1856, 2688) == (16, 64, 128)
    assert K.block_sizes(512, 2688, 1856) == (64, 128, 64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_lowers_to_triton_for_h200_without_a_gpu(dtype):
    """Cross-lower (no compile, no GPU) for an abstract H200: the Pallas -> Triton IR lowering rejects
    unsupported primitives and non-power-of-two tiles. PTX compilation and the numbers on a GPU are not
    checked here (no GPU run yet)."""
    sds = jax.ShapeDtypeStruct
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    for m, n, k in [(1, 1856, 2688), (512, 2688, 1856), (7, 48, 96)]:
        args = [sds((m, k), dtype), sds((n, k // 2), jnp.uint8), sds((n, k // 16), jnp.uint8),
                sds((1,), jnp.float32)]
        f = functools.partial(K.nvfp4_matmul, interpret=False)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("d",), abstract_device=h200)), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the Pallas Triton backend's notice
            text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 1, (m, n, k)
