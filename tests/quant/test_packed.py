"""Packed NVFP4 weights (quant/packed.py): the jnp dequantize equals ModelOpt's bit for bit, the
dequantize-matmul equals the BF16 Linear's GEMM on the dequantized weight bit for bit, the packed Linear and
experts are inference-only, and the dispatch picks / refuses the Pallas kernel as the other dispatches do."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax import platform
from nemotron_jax.convert import modelopt as mo
from nemotron_jax.convert.safetensors_io import SafetensorsFile
from nemotron_jax.layers.common import Linear
from nemotron_jax.quant import packed as P
from pallas_kernels import nvfp4_matmul as K

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"
CASES = ["normal_f32", "normal_bf16", "heavy_tail", "zeros_outlier", "ties_negzero"]


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def packed_of(w: np.ndarray) -> P.PackedNVFP4:
    return P.PackedNVFP4.from_arrays(*mo.nvfp4_quantize(w))


def test_e2m1_table_is_modelopts():
    np.testing.assert_array_equal(bits(P.E2M1_TABLE), bits(mo.E2M1_VALUES))  # code 8 -> +0, not -0


@pytest.mark.parametrize("case", CASES)
def test_dequantize_equals_modelopt_goldens(case):
    g = SafetensorsFile(FIX / "tensors.safetensors")
    p = P.PackedNVFP4.from_arrays(g.get(f"{case}.nvfp4.weight"), g.get(f"{case}.nvfp4.weight_scale"),
                                  g.get(f"{case}.nvfp4.weight_scale_2").reshape(()))
    np.testing.assert_array_equal(bits(P.dequantize(p)), bits(g.get(f"{case}.nvfp4.dequant")))
    np.testing.assert_array_equal(bits(jax.jit(P.dequantize)(p)), bits(g.get(f"{case}.nvfp4.dequant")))
    assert p.shape == g.get(f"{case}.input").shape
    assert p.nbytes == p.shape[0] * p.shape[1] * 9 // 16 + 4  # 4.5 bits per weight + the fp32 scale_2


def test_dequantize_stacked_per_expert_scale_2():
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal((48, 64)).astype(np.float32) * s for s in (1.0, 1e-3, 40.0)]
    parts = [mo.nvfp4_quantize(w) for w in ws]
    p = P.PackedNVFP4.from_arrays(np.stack([c for c, _, _ in parts]), np.stack([s for _, s, _ in parts]),
                                  np.stack([s2 for _, _, s2 in parts]))
    assert p.shape == (3, 48, 64) and p.scale_2.shape == (3,)
    want = np.stack([mo.nvfp4_dequantize(*t) for t in parts])
    np.testing.assert_array_equal(bits(P.dequantize(p)), bits(want))
    # our [E, in, out] layout for the grouped GEMM, in the compute dtype (fp32 values cast once)
    got = jax.jit(P.dequantize_stacked, static_argnums=1)(p, jnp.bfloat16)
    np.testing.assert_array_equal(bits(got), bits(want.transpose(0, 2, 1).astype(jnp.bfloat16)))


def test_from_arrays_checks_shapes_and_dtypes():
    c, s, s2 = mo.nvfp4_quantize(np.ones((16, 32), np.float32))
    P.PackedNVFP4.from_arrays(c, s.view(np.uint8), s2)  # the scales' raw bytes are accepted
    with pytest.raises(ValueError, match="codes must be uint8"):
        P.PackedNVFP4.from_arrays(c.astype(np.int8), s, s2)
    with pytest.raises(ValueError, match=r"scales \(16, 1\) do not match"):
        P.PackedNVFP4.from_arrays(c, s[:, :1], s2)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        P.PackedNVFP4.from_arrays(c, s.astype(np.float32), s2)
    with pytest.raises(ValueError, match="scale_2"):
        P.PackedNVFP4.from_arrays(c, s, np.ones(3, np.float32))


# (tokens, N, K): N = 200 is a shape where a dot contracting the transposed [N, K] operand accumulates in a
# different order from the [K, N] GEMM on XLA:CPU; the reference must still be the Linear's GEMM exactly
SHAPES = [((3, 5), 64, 64), ((24,), 200, 64), ((1,), 96, 512), ((2, 33), 48, 1856 // 4)]


@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_reference_is_the_bf16_linears_gemm_bit_for_bit(lead, n, k, dtype):
    rng = np.random.default_rng(n + k)
    p = packed_of(rng.standard_normal((n, k)).astype(np.float32))
    w_kn = jnp.asarray(mo.nvfp4_dequantize(p.codes, p.scales, p.scale_2).T)  # the dequantize-at-load kernel
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)

    lin = Linear(k, n, axes=("embed", "mlp"), rngs=nnx.Rngs(0), dtype=dtype)
    lin.kernel[...] = w_kn  # the plain Linear on the dequantize-at-load weight

    want = jax.jit(lambda x: lin(x))(x)
    got = jax.jit(P.dequant_matmul)(x, p)
    assert got.dtype == dtype and got.shape == (*lead, n)
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(bits(P.dequant_matmul(x, p)), bits(lin(x)))  # eager too


def _linear_pair(dtype, n=96, k=128, bias=False):
    a = Linear(k, n, axes=("embed", "mlp"), rngs=nnx.Rngs(0), dtype=dtype, use_bias=bias)
    w_nk = np.asarray(a.kernel.get_value()).T
    p = packed_of(w_nk)
    a.kernel.set_value(jnp.asarray(mo.nvfp4_dequantize(p.codes, p.scales, p.scale_2).T))  # dequantized at load
    if bias:
        a.bias.set_value(jnp.arange(n, dtype=jnp.float32) / 7)
    b = Linear(k, n, axes=("embed", "mlp"), rngs=nnx.Rngs(1), dtype=dtype, use_bias=bias)
    b.kernel = P.NVFP4Weight(p, impl="reference")
    if bias:
        b.bias.set_value(a.bias.get_value())
    return a, b


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_packed_linear_equals_dequantized_linear(dtype):
    a, b = _linear_pair(dtype, bias=True)
    x = jax.random.normal(jax.random.key(0), (2, 7, 128), dtype)
    ga, sa = nnx.split(a)
    gb, sb = nnx.split(b)
    ya = jax.jit(lambda s, x: nnx.merge(ga, s)(x))(sa, x)
    yb = jax.jit(lambda s, x: nnx.merge(gb, s)(x))(sb, x)
    np.testing.assert_array_equal(bits(ya), bits(yb))
    # the packed state: codes, scales, scale_2, 4.5 bits per weight; no Param holds the kernel
    leaves = jax.tree.leaves(nnx.state(b, P.NVFP4Weight))
    assert [x.dtype for x in leaves] == [jnp.uint8, jnp.float8_e4m3fn, jnp.float32]
    assert sum(x.nbytes for x in leaves) == 96 * 128 * 9 // 16 + 4
    assert "kernel" not in nnx.state(b, nnx.Param)


def test_packed_linear_refuses_training():
    _, b = _linear_pair(jnp.float32)
    x = jnp.ones((4, 128))
    with pytest.raises(P.PackedWeightError, match="dequantize=True"):
        jax.grad(lambda x: b(x).sum())(x)
    with pytest.raises(P.PackedWeightError, match="inference-only.*Packed: kernel"):
        P.check_trainable(b)
    a, _ = _linear_pair(jnp.float32)
    P.check_trainable(a)  # nothing packed: no complaint
    np.testing.assert_array_equal(b(x), jax.jit(lambda x: b(x))(x))  # the forward alone is unaffected


def test_dispatch_resolves_and_fails_closed(monkeypatch):
    assert P.resolve("reference", (4, 64), 48, 64, jnp.bfloat16) == "reference"
    assert P.resolve("auto", (4, 64), 48, 64, jnp.bfloat16) == "reference"       # CPU: the reference
    assert P.resolve("pallas", (4, 64), 48, 64, jnp.bfloat16) == "pallas"        # interpreted off GPU
    with pytest.raises(ValueError, match=r"does not support x \(4, 64\).*\[40, 64\]"):
        P.resolve("pallas", (4, 64), 40, 64, jnp.bfloat16)                      # N % 16: fails closed
    with pytest.raises(ValueError, match="impl='nope'"):
        P.resolve("nope", (4, 64), 48, 64, jnp.bfloat16)
    asked = []
    real = K.supports
    monkeypatch.setattr(K, "supports", lambda *a: asked.append(a) or real(*a))
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    assert P.resolve("auto", (2, 3, 64), 48, 64, jnp.bfloat16) == "pallas"       # GPU and supported
    assert asked[-1] == ((6, 64), 48, jnp.bfloat16)
    assert P.resolve("auto", (2, 64), 40, 64, jnp.bfloat16) == "reference"       # GPU, unsupported: falls back
    assert len(asked) == 2  # once per call


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dispatch_to_the_interpreted_kernel(dtype):
    rng = np.random.default_rng(3)
    p = packed_of(rng.standard_normal((64, 256)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), dtype)
    ref = np.asarray(P.dequant_matmul(x, p, impl="reference"), np.float32)
    got = np.asarray(P.dequant_matmul(x, p, impl="pallas_interpret"), np.float32)
    assert got.shape == (2, 3, 64)
    # accumulation order only (bound and reasoning in pallas_kernels/nvfp4_matmul.py and its test)
    w = np.abs(mo.nvfp4_dequantize(p.codes, p.scales, p.scale_2).astype(np.float64))
    bound = 2 * 256 * 2.0 ** -24 * (np.abs(np.asarray(x, np.float64)) @ w.T)
    if dtype == jnp.bfloat16:
        bound = bound + 2.0 ** -7 * np.abs(ref)
    assert np.all(np.abs(got - ref) <= bound + 1e-30)
    with pytest.raises(P.PackedWeightError):
        jax.grad(lambda x: P.dequant_matmul(x, p, impl="pallas_interpret").astype(jnp.float32).sum())(x)
