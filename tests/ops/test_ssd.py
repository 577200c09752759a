"""SSD op: the reference against a numpy loop, chunked against the reference (values, final state,
gradients for every input), packed documents, dispatch and input validation.

Tolerances (fp32 everywhere, matmuls at "highest" via conftest): errors are measured as
max|a - ref| / max|ref| per tensor. Reordering the sum over <= 37 tokens and computing decays as
exp(Acum_l - Acum_s) instead of a product of per-token exps costs a few fp32 ulps per term; we
observe <= ~3e-6 on values and states and <= ~1e-5 on gradients (which sum over t, p and n too).
We allow 1e-5 for values/states and 5e-5 for gradients: 2-5x margin, while a wrong mask, a
missing decay or a one-token shift gives errors of order 1e-1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import platform
from nemotron_jax.ops import ssd as ssd_mod
from nemotron_jax.ops.ssd import ssd
from tests.helpers.ssd import (GRAD_NAMES, assert_close, check_packed_equals_separate, grads,
                             make_inputs, packed_case)

TOL, GTOL = 1e-5, 5e-5


def numpy_ssd(x, dt, A, B, C, S0, seg):
    """Plain float64 python loop, written from the recurrence (the oracle's oracle)."""
    x, dt, A, B, C, S = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, S0))
    S = S.copy()
    b, t, h, p = x.shape
    r = h // B.shape[2]
    y = np.zeros_like(x)
    for i in range(b):
        for k in range(t):
            if k > 0 and seg[i][k] != seg[i][k - 1]:
                S[i] = 0.0
            for j in range(h):
                S[i, j] = np.exp(dt[i, k, j] * A[j]) * S[i, j] + dt[i, k, j] * np.outer(x[i, k, j], B[i, k, j // r])
                y[i, k, j] = S[i, j] @ C[i, k, j // r]
    return y, S


@pytest.mark.parametrize("with_segments", [False, True])
def test_reference_matches_numpy_loop(with_segments):
    x, dt, A, B, C, S0 = make_inputs(seed=1, b=2, t=9, h=4, p=3, g=2, n=5)
    seg = np.array([[0, 0, 0, 1, 1, 0, 0, 0, 0], [2] * 9]) if with_segments else np.zeros((2, 9), int)
    y, S = ssd(x, dt, A, B, C, chunk_size=4, initial_state=S0, return_final_state=True, impl="reference",
               segment_ids=jnp.asarray(seg) if with_segments else None)
    y_np, S_np = numpy_ssd(x, dt, A, B, C, S0, seg)
    assert_close(y, y_np, TOL, "y")
    assert_close(S, S_np, TOL, "final state")


@functools.lru_cache(maxsize=None)
def _reference_outputs():
    inputs = make_inputs()
    y, S = ssd(*inputs[:5], chunk_size=1, initial_state=inputs[5], return_final_state=True, impl="reference")
    return inputs, y, S


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])   # T = 37: ragged last chunk; 64 > T
def test_chunked_matches_reference(chunk_size):
    (x, dt, A, B, C, S0), y_ref, S_ref = _reference_outputs()
    y, S = jax.jit(lambda *a: ssd(*a[:5], chunk_size=chunk_size, initial_state=a[5], return_final_state=True,
                                  impl="chunked"))(x, dt, A, B, C, S0)
    assert y.shape == x.shape and y.dtype == x.dtype and S.shape == S0.shape and S.dtype == jnp.float32
    assert_close(y, y_ref, TOL, "y")
    assert_close(S, S_ref, TOL, "final state")


def test_chunked_on_cpu_computes_in_chunks_of_at_most_cpu_chunk(monkeypatch):
    """The chunk is the algorithm's block size, not the model's: on CPU chunk_size=128 runs as CPU_CHUNK-token
    chunks (bit for bit the chunked op at that chunk), smaller sizes as asked; elsewhere as asked."""
    x, dt, A, B, C, S0 = make_inputs(t=150)

    def run(cs):
        return np.asarray(ssd(x, dt, A, B, C, chunk_size=cs, initial_state=S0, impl="chunked"))

    def direct(cs):
        return np.asarray(ssd_mod.ssd_chunked(x, dt, A, B, C, cs, S0)[0])

    assert ssd_mod.CPU_CHUNK == 64
    assert np.any(direct(64) != direct(128))  # the chunks' rounding tells them apart
    np.testing.assert_array_equal(run(128), direct(64))
    np.testing.assert_array_equal(run(16), direct(16))
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    np.testing.assert_array_equal(run(128), direct(128))


def test_chunked_without_initial_state_returns_y_only():
    x, dt, A, B, C, _ = make_inputs()
    y = jax.jit(lambda *a: ssd(*a, chunk_size=8))(x, dt, A, B, C)
    assert isinstance(y, jax.Array) and y.shape == x.shape
    run = jax.jit(lambda *a, impl: ssd(*a, chunk_size=8, impl=impl, return_final_state=True),
                  static_argnames="impl")
    y_ref, S_ref = run(x, dt, A, B, C, impl="reference")
    assert_close(y, y_ref, TOL, "y")
    assert_close(run(x, dt, A, B, C, impl="chunked")[1], S_ref, TOL, "final state")


def test_chunked_bf16_inputs_keep_dtype():
    x, dt, A, B, C, S0 = make_inputs(dtype=jnp.bfloat16)
    run = jax.jit(lambda *a, impl: ssd(*a[:5], chunk_size=16, initial_state=a[5], return_final_state=True,
                                       impl=impl), static_argnames="impl")
    y, S = run(x, dt, A, B, C, S0, impl="chunked")
    y_ref, S_ref = run(x, dt, A, B, C, S0, impl="reference")
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), 1e-2, "y (bf16 output rounding)")
    assert_close(S, S_ref, TOL, "final state (fp32 compute)")


@functools.lru_cache(maxsize=None)
def _reference_grads(with_segments: bool):
    inputs = make_inputs()
    seg = packed_segments() if with_segments else None
    return inputs, seg, grads("reference", 1, inputs, seg)


def packed_segments():
    return jnp.array([[0] * 10 + [1] * 20 + [0] * 7, [5] * 3 + [6] * 34], jnp.int32)


@pytest.mark.parametrize("chunk_size,with_segments", [(5, False), (16, False), (16, True),
                                                      (2, True)])   # 19 chunks: the lax.scan path
def test_chunked_gradients_match_reference(chunk_size, with_segments):
    inputs, seg, g_ref = _reference_grads(with_segments)
    g = grads("chunked", chunk_size, inputs, seg)
    for name, a, ref in zip(GRAD_NAMES, g, g_ref):
        assert_close(a, ref, GTOL, f"d loss / d {name}")


def test_chunked_gradient_through_final_state_alone():
    """Only the final state is used (prefill hands it on): the backward gets a zero y cotangent."""
    inputs = make_inputs()
    seg = packed_segments()
    w = np.random.default_rng(5).standard_normal(inputs[5].shape).astype(np.float32)

    def loss(impl, chunk_size):
        def f(*a):
            _, S = ssd(*a[:5], chunk_size=chunk_size, initial_state=a[5], return_final_state=True,
                       segment_ids=seg, impl=impl)
            return jnp.sum(S * w)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))(*inputs)

    for name, a, ref in zip(GRAD_NAMES, loss("chunked", 16), loss("reference", 1)):
        assert_close(a, ref, GTOL, f"d final-state loss / d {name}")


@pytest.mark.parametrize("with_segments", [False, True])
def test_chunked_strong_decay_long_chunks_precise(with_segments):
    """A ~ -16 and dt up to 1 over 128-token chunks: within-chunk log-decay prefixes reach ~-2000,
    where exp(prefix_l - prefix_s) in plain fp32 would be off by ~eps * 2000 relative. The chunked
    op's exact prefix sums keep values and gradients within the usual tolerances of the oracle."""
    x, dt, A, B, C, S0 = make_inputs(seed=11, b=1, t=200, h=4, p=8, g=2, n=8, a_scale=16.0)
    dt = jnp.minimum(dt, 1.0)
    seg = jnp.asarray(np.repeat([0, 1, 2], [90, 70, 40])[None]) if with_segments else None
    inputs = (x, dt, A, B, C, S0)
    y, S = jax.jit(lambda *a: ssd(*a[:5], chunk_size=128, initial_state=a[5], return_final_state=True,
                                  segment_ids=seg, impl="chunked"))(*inputs)
    y_ref, S_ref = jax.jit(lambda *a: ssd(*a[:5], chunk_size=1, initial_state=a[5], return_final_state=True,
                                          segment_ids=seg, impl="reference"))(*inputs)
    assert_close(y, y_ref, TOL, "y")
    assert_close(S, S_ref, TOL, "final state")
    for name, a, ref in zip(GRAD_NAMES, grads("chunked", 128, inputs, seg), grads("reference", 1, inputs, seg)):
        assert_close(a, ref, GTOL, f"d loss / d {name}")


def test_exact_prefix_sums_keep_segment_sums_precise():
    """`_prefix_sums`: the hi part's segment sums are exact, so a segment sum of strongly negative
    log-decays is off by at most ~eps * max(|segment sum|, 1) however large the prefix (the decay
    exp(sum) then has relative error ~eps * |sum|, tiny wherever exp(sum) is not). Plain fp32
    prefix differences miss that bound by orders of magnitude (~eps * |prefix|)."""
    from nemotron_jax.ops.ssd_chunked import _prefix_sums
    rng = np.random.default_rng(0)
    a = -(16.0 * rng.uniform(0.0, 1.0, (3, 128)) ** 2).astype(np.float32)
    a[1, :60] *= 1e-4                                         # weak then strong decays in one row
    hi, lo = (np.asarray(v, np.float64) for v in jax.jit(_prefix_sums)(jnp.asarray(a)))
    exact = np.cumsum(a.astype(np.float64), axis=-1)
    lower = np.tril(np.ones((128, 128), bool), -1)

    def worst(prefix_hi, prefix_lo=0.0):
        seg = (prefix_hi[:, :, None] - prefix_hi[:, None, :]) + (prefix_lo[:, :, None] - prefix_lo[:, None, :]
                                                               if np.ndim(prefix_lo) else 0.0)
        seg_exact = exact[:, :, None] - exact[:, None, :]
        return (np.abs(seg - seg_exact) / np.maximum(np.abs(seg_exact), 1.0))[:, lower].max()

    assert worst(hi, lo) < 2 ** -23
    assert worst(np.asarray(jnp.cumsum(jnp.asarray(a), axis=-1), np.float64)) > 2 ** -18   # the naive form
    hi32 = np.asarray(jax.jit(_prefix_sums)(jnp.asarray(a))[0])
    assert np.array_equal(hi32[:, :, None] - hi32[:, None, :], hi[:, :, None] - hi[:, None, :])   # exact in fp32


def test_packed_documents_reference():
    check_packed_equals_separate("reference", chunk_size=1)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_packed_documents_chunked(chunk_size):
    check_packed_equals_separate("chunked", chunk_size)


def test_chunked_strong_decay_and_resets_stay_finite():
    """Very negative dt*A over long chunks (exp underflows to 0) and many resets: values and
    gradients stay finite and still match the reference (where-before-exp, no -inf log-decays)."""
    x, dt, A, B, C, S0 = make_inputs(seed=3, t=40, a_scale=60.0)
    seg = jnp.asarray(np.repeat(np.arange(8), 5)[None].repeat(2, 0))
    inputs = (x, 4.0 * dt, A, B, C, S0)
    g_ref = grads("reference", 1, inputs, seg)
    g = grads("chunked", 32, inputs, seg)
    for name, a, ref in zip(GRAD_NAMES, g, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), name
        assert_close(a, ref, GTOL, f"d loss / d {name}")


def test_auto_on_cpu_uses_chunked_for_any_shape():
    x, dt, A, B, C, S0 = make_inputs(p=3, n=5)   # shapes the kernel does not support
    y = ssd(x, dt, A, B, C, chunk_size=7, initial_state=S0, impl="auto")
    assert_close(y, ssd(x, dt, A, B, C, chunk_size=7, initial_state=S0, impl="chunked"), 0.0, "auto == chunked")


def test_auto_falls_back_on_unsupported_shapes_on_gpu(monkeypatch):
    """With the backend reported as GPU, "auto" sends shapes the Mosaic GPU kernel does not cover
    (p=3, n=5, odd chunk; fp32, which only the portable Triton-path kernel takes) to the chunked
    op and covered ones (p=64, bf16) to the kernel."""
    calls = []
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    for kernel in ssd_mod.BACKENDS.values():
        monkeypatch.setattr(kernel, "forward", lambda *a, _real=kernel.forward, **k: calls.append(1) or _real(*a, **k))
    for shape, chunk in ((dict(p=3, n=5, t=12), 7), (dict(p=64, n=64, t=12), 16)):
        x, dt, A, B, C, _ = make_inputs(**shape)
        y = ssd(x, dt, A, B, C, chunk_size=chunk, impl="auto")
        assert not calls
        assert_close(y, ssd(x, dt, A, B, C, chunk_size=chunk, impl="chunked"), 0.0, "auto == chunked")
    x, dt, A, B, C, _ = make_inputs(p=64, n=64, t=12, dtype=jnp.bfloat16)
    y = ssd(x, dt, A, B, C, chunk_size=16, impl="auto", interpret=True)   # told to: the real machine is a CPU
    assert calls
    up = lambda a: a.astype(jnp.float32)
    # bf16 wgmma operands inside the kernel: tolerance as in tests/pallas_kernels/test_ssd_mosaic.py
    assert_close(up(y), ssd(up(x), dt, A, up(B), up(C), chunk_size=16, impl="reference"), 4 * 2.0 ** -8,
                 "auto (kernel) == reference")


def _count_supports(monkeypatch):
    """Wrap every kernel's supports() with a counter: {backend name: calls}."""
    asked = {name: 0 for name in ssd_mod.BACKENDS}
    for name, kernel in ssd_mod.BACKENDS.items():
        def counted(*a, _name=name, _real=kernel.supports):
            asked[_name] += 1
            return _real(*a)
        monkeypatch.setattr(kernel, "supports", counted)
    return asked


@pytest.mark.parametrize("impl,on_gpu,shape,dtype,asked", [
    ("pallas", False, dict(p=16, n=16), jnp.float32, {"mosaic_gpu": 1, "portable": 1}),   # portable runs
    ("pallas", False, dict(p=64, n=64), jnp.bfloat16, {"mosaic_gpu": 1, "portable": 0}),  # Mosaic runs
    ("auto", True, dict(p=64, n=64), jnp.bfloat16, {"mosaic_gpu": 1, "portable": 0}),
    ("auto", True, dict(p=3, n=5), jnp.float32, {"mosaic_gpu": 1, "portable": 0}),        # falls back
    ("auto", False, dict(p=64, n=64), jnp.bfloat16, {"mosaic_gpu": 0, "portable": 0}),
    ("chunked", True, dict(p=64, n=64), jnp.bfloat16, {"mosaic_gpu": 0, "portable": 0}),
])
def test_dispatch_asks_each_kernel_at_most_once(monkeypatch, impl, on_gpu, shape, dtype, asked):
    """One support check per kernel per call, in the op (the kernels do not check again); traced only."""
    monkeypatch.setattr(platform, "backend", lambda: "gpu" if on_gpu else "cpu")
    counts = _count_supports(monkeypatch)
    x, dt, A, B, C, S0 = make_inputs(t=12, dtype=dtype, **shape)
    jax.eval_shape(lambda *a: ssd(*a[:5], chunk_size=16, initial_state=a[5], impl=impl, interpret=True),
                   x, dt, A, B, C, S0)
    assert counts == asked


def test_named_backends_fail_closed():
    """A named kernel that cannot take the shapes raises (naming it and its limits); so does an unknown name.
    Only impl="auto" falls back."""
    x, dt, A, B, C, _ = make_inputs(p=3, n=5, t=8)
    with pytest.raises(ValueError, match="'portable' does not support.*power"):
        ssd_mod.ssd_pallas(x, dt, A, B, C, chunk_size=8, backend="portable")
    with pytest.raises(ValueError, match="no SSD kernel supports.*mosaic_gpu.*portable"):
        ssd_mod.ssd_pallas(x, dt, A, B, C, chunk_size=8)
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd_mod.ssd_pallas(x, dt, A, B, C, chunk_size=8, backend="triton")


def test_registry_names_and_kernel_interface():
    """The op's lists; each kernel module is a leaf with supports/forward/SUPPORTED; config checks IMPLS."""
    assert ssd_mod.IMPLS == ("reference", "chunked", "pallas", "auto")
    assert tuple(ssd_mod.BACKENDS) == ("mosaic_gpu", "portable")   # the order impl="pallas" tries them
    for kernel in ssd_mod.BACKENDS.values():
        assert callable(kernel.supports) and callable(kernel.forward) and isinstance(kernel.SUPPORTED, str)
    from nemotron_jax.config import ModelConfig
    for name in ssd_mod.IMPLS:
        assert ModelConfig.tiny(ssd_impl=name).ssd_impl == name


def _bad(**over):
    x, dt, A, B, C, S0 = make_inputs(b=2, t=6, h=4, p=3, g=2, n=5)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, chunk_size=4, initial_state=S0)
    args.update(over)
    return args


@pytest.mark.parametrize("over,word", [
    (dict(impl="triton"), "impl"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.0), "chunk_size"),
    (dict(x=jnp.zeros((2, 6, 4))), "x"),
    (dict(dt=jnp.zeros((2, 6, 3))), "dt"),
    (dict(A=jnp.zeros((3,))), "A"),
    (dict(B=jnp.zeros((2, 5, 2, 5))), "B"),
    (dict(C=jnp.zeros((2, 6, 2, 4))), "C"),
    (dict(B=jnp.zeros((2, 6, 3, 5)), C=jnp.zeros((2, 6, 3, 5))), "divisible"),
    (dict(initial_state=jnp.zeros((2, 4, 3, 4))), "initial_state"),
    (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), "segment_ids"),
    (dict(segment_ids=jnp.zeros((2, 6), jnp.float32)), "segment_ids"),
])
def test_invalid_inputs_raise_value_error_naming_the_argument(over, word):
    args = _bad(**over)
    with pytest.raises(ValueError, match=word):
        ssd(args.pop("x"), args.pop("dt"), args.pop("A"), args.pop("B"), args.pop("C"), **args)


def test_pallas_on_unsupported_shapes_raises_and_points_to_auto():
    x, dt, A, B, C, _ = make_inputs(p=3, n=5, t=8)
    with pytest.raises(ValueError, match="impl='auto'"):
        ssd(x, dt, A, B, C, chunk_size=8, impl="pallas")


def test_packed_case_is_well_formed():
    (x, *_), seg, docs = packed_case()
    assert sum(d[2] for d in docs if d[0] == 0) == x.shape[1] == sum(d[2] for d in docs if d[0] == 1)
    assert int(ssd_mod.segment_runs(seg)[0, -1]) == 2   # the returning id 3 is a third document
