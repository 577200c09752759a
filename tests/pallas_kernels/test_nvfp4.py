"""Pallas NVFP4 QDQ kernel (interpret mode on CPU) equals the jnp reference bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.quant import dispatch, nvfp4
from pallas_kernels import nvfp4 as K

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 64)).astype(np.float32) * 3)
X = X.at[0, 3, :16].set(0.0).at[1, 7, 20].set(500.0)  # a zero block and an outlier


def _scales(x, hadamard):
    amax = jnp.max(jnp.abs(nvfp4.rht(x) if hadamard else x))
    return jnp.stack(nvfp4.tensor_scales(amax))


@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "rht"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_kernel_bit_identical_to_reference(block, rounding, hadamard):
    bits = nvfp4.random_bits(jax.random.key(1), X.shape) if rounding == "stochastic" else None
    ref_q = nvfp4.quantize(X, block=block, rounding=rounding, bits=bits, hadamard=hadamard)
    y, s = K.qdq_kernel(X, _scales(X, hadamard), block=block, rounding=rounding, bits=bits, hadamard=hadamard,
                        interpret=True, block_cols=2)  # block_cols=2: a 2x2 or 4x2 grid, several tiles
    np.testing.assert_array_equal(np.asarray(y), np.asarray(nvfp4.dequantize(ref_q)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(ref_q.block_scales.astype(jnp.float32)))


def test_kernel_seeded_bits_match_hash_bits():
    """In-kernel counter-based bits == hash_bits(seed, shape) fed to the reference; seeds decorrelate."""
    y, _ = K.qdq_kernel(X, _scales(X, False), rounding="stochastic", seed=jnp.uint32(7), interpret=True)
    ref = nvfp4.qdq(X, rounding="stochastic", bits=K.hash_bits(7, X.shape))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    b1, b2 = np.asarray(K.hash_bits(7, (4096,))), np.asarray(K.hash_bits(8, (4096,)))
    assert len(np.unique(b1)) == 4096 and (b1 != b2).mean() > 0.99
    assert abs((b1 >> 31).mean() - 0.5) < 0.05  # top bit balanced (5 sigma ~ 0.04)


def test_kernel_bf16_in_unscaled_out():
    xb = X.astype(jnp.bfloat16)
    y, _ = K.qdq_kernel(xb, _scales(xb.astype(jnp.float32), False), interpret=True)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(nvfp4.qdq(xb)))
    v, s_dec = dispatch.qdq_unscaled(X, block=(16, 16), impl="pallas_interpret")
    q = nvfp4.quantize(X, block=(16, 16))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(nvfp4.dequantize(q, jnp.bfloat16, apply_tensor_scale=False)))
    assert float(s_dec) == float(q.tensor_scale)


def test_supports_and_dispatch():
    assert K.supports((2, 32, 64), jnp.float32, (1, 16)) and K.supports((16, 16), jnp.bfloat16, (16, 16))
    assert not K.supports((8, 24), jnp.float32, (1, 16))
    assert not K.supports((8, 32), jnp.float32, (16, 16))
    assert not K.supports((16, 32), jnp.int32, (1, 16))
    with pytest.raises(ValueError, match="does not support"):
        dispatch.qdq(jnp.ones((8, 24)), impl="pallas")
    # auto on CPU is the reference; the kernel path gives the same values
    np.testing.assert_array_equal(np.asarray(dispatch.qdq(X)), np.asarray(nvfp4.qdq(X)))
    k = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(dispatch.qdq(X, rounding="stochastic", key=k, hadamard=True, impl="pallas_interpret")),
        np.asarray(dispatch.qdq(X, rounding="stochastic", key=k, hadamard=True, impl="reference")))


def test_dispatch_asks_supports_once_and_fails_closed(monkeypatch):
    """The op asks the kernel's supports() once per call; named kernel impls raise, only "auto" falls back;
    "auto" takes the kernel on a GPU (the platform module says which) and tells it not to interpret."""
    from nemotron_jax import platform
    asked, launched, verdict = [], [], {"deny": False}
    real_supports, real_kernel = K.supports, K.qdq_kernel
    monkeypatch.setattr(K, "supports", lambda *a: asked.append(a) or (not verdict["deny"] and real_supports(*a)))
    monkeypatch.setattr(K, "qdq_kernel", lambda *a, **k: launched.append(k["interpret"]) or real_kernel(*a, **k))
    for impl in ("pallas", "pallas_interpret"):
        asked.clear()
        with pytest.raises(ValueError, match="does not support"):
            dispatch.qdq(jnp.ones((8, 24)), impl=impl)
        assert len(asked) == 1
    asked.clear()
    dispatch.qdq(X, impl="auto")                       # on CPU: the reference, no question asked
    assert asked == [] and launched == []
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    verdict["deny"] = True
    dispatch.qdq(X, impl="auto")                       # a GPU, but the kernel says no: the reference
    assert len(asked) == 1 and launched == []
    verdict["deny"] = False
    jax.eval_shape(lambda x: dispatch.qdq(x, impl="auto"), X)   # traced only: no GPU to compile for
    assert len(asked) == 2 and launched == [False]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_kernel_lowers_to_triton_for_h200_without_a_gpu(dtype, block):
    """Cross-lower (no compile, no GPU) for an abstract H200: runs the Pallas -> Triton IR lowering, which
    rejects unsupported primitives (round, multi-axis reductions in some versions) and non-power-of-two tiles.
    The fp32 division must be the inlined IEEE div.rn.f32 (Triton's own fp32 divide is approximate). PTX
    compilation and the bits on a GPU are checked by benchmarks/gpu_nvfp4.sh."""
    import functools
    import warnings
    assert hasattr(jax.sharding, "AbstractDevice")
    sds = jax.ShapeDtypeStruct
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    cases = [("nearest", False, None), ("nearest", True, None), ("stochastic", True, "bits"),
             ("stochastic", False, "seed")]
    for rounding, had, src in cases:
        f = functools.partial(K.qdq_kernel, block=block, rounding=rounding, hadamard=had, interpret=False,
                              out_dtype=jnp.bfloat16, apply_tensor_scale=src != "seed")
        args = [sds((64, 256), dtype), sds((2,), jnp.float32),
                sds((64, 256), jnp.uint32) if src == "bits" else sds((), jnp.uint32)]

        def g(x, s, r, src=src, f=f):
            return f(x, s, bits=r if src == "bits" else None, seed=r if src == "seed" else None)

        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("d",), abstract_device=h200)), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the Pallas Triton backend's notice
            text = jax.jit(g).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 1, (rounding, had, src)
        assert "div.rn.f32" in text


def test_key_bits_are_the_kernel_hash_and_unscaled_dispatch_agrees():
    """random_bits(key) is the kernel's in-kernel hash of key_seed(key), so the dispatch hands the kernel a
    seed (no bits array) and both impls still agree bit for bit, for the row-blocked (axis=0) form too."""
    k = jax.random.key(4)
    np.testing.assert_array_equal(np.asarray(nvfp4.random_bits(k, (6, 32))),
                                  np.asarray(K.hash_bits(nvfp4.key_seed(k), (6, 32))))
    x2 = X.reshape(64, 64).astype(jnp.bfloat16)
    for axis in (-1, 0):
        a = dispatch.qdq_unscaled(x2, rounding="stochastic", key=k, hadamard=True, axis=axis, impl="pallas_interpret")
        b = dispatch.qdq_unscaled(x2, rounding="stochastic", key=k, hadamard=True, axis=axis, impl="reference")
        np.testing.assert_array_equal(np.asarray(a[0]).astype(np.float32), np.asarray(b[0]).astype(np.float32))
        assert float(a[1]) == float(b[1])
