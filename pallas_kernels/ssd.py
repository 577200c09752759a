"""Pallas kernels for the Mamba-2 SSD chunked scan (forward); the backward is the VJP of a jnp op passed in.

Public entry: ``nemotron_jax.ops.ssd.ssd(..., impl="pallas" | "auto")``. Here: `backend_for`,
`supports`, `ssd_pallas` (kernel forward; differentiable when given a ``reference`` op) and the
portable kernel. Like every kernel here they know arrays only: the chunked jnp op they
differentiate through is handed in by ``nemotron_jax.ops.ssd``, not imported.

Two backends
------------
``"mosaic_gpu"`` (`ssd_mosaic.py`): the JAX-recommended GPU backend (wgmma, TMA, barriers). It
covers the Nemotron 3 shapes (p = 64, n in {64, 128}, bf16/f16) and is what ``impl="auto"`` picks
on a GPU. Off GPU it runs under Mosaic GPU's CPU interpreter, which the tests use (with its race
detector on) against the token-by-token oracle; its lowering to Mosaic GPU IR is checked in the
tests by cross-lowering for CUDA without a GPU.

``"portable"`` (this file): the portable Pallas surface only (``pl.pallas_call`` with a grid and
``BlockSpec``s, ``pl.ds`` slices, ``lax.fori_loop``, ``lax.dot_general``, elementwise jnp). It runs
under ``interpret=True`` on CPU, serves every dtype (fp32 included: tested at fp32 tolerances) and
power-of-two tile sizes, and on a GPU lowers through Pallas' Triton backend (deprecated since JAX
0.11), so ``impl="auto"`` never picks it on a GPU; ``impl="pallas"`` uses it where the Mosaic GPU
kernel does not apply.

Until ``benchmarks/gpu_ssd.py`` has been run on a GPU, neither kernel has been compiled to PTX:
the model's default stays the chunked op.

Portable kernel layout
----------------------
Grid ``(b, h, p // block_p)``; each program owns one (batch row, head, slice of p) and walks
the chunks sequentially with the state ``S [block_p, n]`` (fp32) carried in the loop, so the
inter-chunk state pass needs no second kernel and no HBM round trip. Per chunk (length L):

  (i)   y  = ((C B^T) * exp(Acum_l - Acum_s) * dt_s * mask) @ x         intra-chunk
  (iv)  y += exp(Acum_l) * (C @ S^T) * [run_l == run at previous chunk end]   state -> output
  (ii)  S_c = (x * exp(Acum_L - Acum_s) * dt_s * [run_s == run_L])^T @ B       chunk state
  (iii) S  = exp(Acum_L) * [no reset in chunk] * S + S_c                      state pass

where mask = causal & same run and Acum is the chunk-local cumsum of dt*A. Decays are
differences of that cumsum (as GPU SSD kernels usually compute them), so each term carries a
relative error of about eps * |Acum| (~2e-5 at |Acum| = 200, the far end of Nano's decay range
over 128 tokens); the chunked jnp op sums the log-decays between s and l directly instead.
B/C of group ``head // (h // g)`` are read by the index map
(no repeat in HBM). Matmuls use ``precision`` (default HIGHEST: IEEE fp32 on GPU, since the
Triton default for fp32 is TF32).

Backward (both backends)
------------------------
``jax.custom_vjp`` whose backward is ``jax.vjp`` of the ``reference`` op (the chunked jnp op,
recomputing its forward from the saved inputs). Chosen over a Pallas backward because (a) it is exact by construction
(the chunked op is tested against the oracle, including gradients), (b) it is XLA-fused O(T)
work, and (c) a hand-written backward (dx, dB, dC, ddt, dA via reverse state pass) is a large
kernel whose GPU lowering could not be tested here. Cost: training recomputes the forward once
in XLA. A Pallas backward is the natural next step once a GPU can validate it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import ssd_mosaic

f32 = jnp.float32

BACKENDS = ("mosaic_gpu", "portable")
SUPPORTED = (f"Mosaic GPU: {ssd_mosaic.SUPPORTED}; portable: chunk_size, head dim p and state dim n "
             "powers of two in [16, 256], dtype float32, bfloat16 or float16, h divisible by g")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _pow2_in(v: int, lo: int = 16, hi: int = 256) -> bool:
    return lo <= v <= hi and (v & (v - 1)) == 0


def _supported(x_shape, B_shape, chunk_size: int, dtype) -> dict[str, bool]:
    return {"mosaic_gpu": ssd_mosaic.supports(x_shape, B_shape, dtype=dtype),
            "portable": supports_portable(x_shape, B_shape, chunk_size=chunk_size, dtype=dtype)}


def backend_for(x_shape, B_shape, *, chunk_size: int, dtype) -> str | None:
    """The backend `ssd_pallas` uses for these shapes: the first of BACKENDS (Mosaic GPU, then
    portable) that supports them, else None."""
    ok = _supported(x_shape, B_shape, chunk_size, dtype)
    return next((name for name in BACKENDS if ok[name]), None)


def supports(x_shape, B_shape, *, chunk_size: int, dtype) -> bool:
    """True when one of the two kernels handles x [b,t,h,p], B/C [b,t,g,n], chunk size and dtype."""
    return backend_for(x_shape, B_shape, chunk_size=chunk_size, dtype=dtype) is not None


def supports_portable(x_shape, B_shape, *, chunk_size: int, dtype) -> bool:
    """The portable kernel: any T (padded to a multiple of the chunk); tile sizes powers of two
    with matmul dims >= 16 (Triton's constraints)."""
    try:
        b, t, h, p = x_shape
        _, _, g, n = B_shape
    except (TypeError, ValueError):
        return False
    return (b >= 1 and t >= 1 and g >= 1 and h % g == 0
            and _pow2_in(p) and _pow2_in(n) and _pow2_in(chunk_size)
            and jnp.dtype(dtype) in _DTYPES)


def _kernel(x_ref, dt_ref, dA_ref, B_ref, C_ref, runs_ref, s0_ref, y_ref, sf_ref, *,
            L: int, nc: int, precision):
    """One program: batch row i, head j, p-slice k. Refs (squeezed):
    x/y [T, bp]; dt, dA [T]; B, C [T, n]; runs [T] int32 (or None); s0, sf [bp, n]."""
    dims_nt = (((1,), (1,)), ((), ()))   # a @ b^T
    dims_tn = (((0,), (0,)), ((), ()))   # a^T @ b
    dims_nn = (((1,), (0,)), ((), ()))   # a @ b
    dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=f32)
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    causal = col <= row
    is_last = lax.broadcasted_iota(jnp.int32, (L,), 0) == L - 1

    def body(c, carry):
        S, run_prev = carry                                   # [bp, n] fp32, scalar int32
        sl = pl.ds(pl.multiple_of(c * L, L), L)
        x = x_ref[sl, :].astype(f32)                          # [L, bp]
        dt = dt_ref[sl]                                       # [L]
        Bc = B_ref[sl, :].astype(f32)                         # [L, n]
        Cc = C_ref[sl, :].astype(f32)
        acum = jnp.cumsum(dA_ref[sl])                         # [L]
        a_last = jnp.sum(jnp.where(is_last, acum, 0.0))
        if runs_ref is None:
            mask, run_last = causal, run_prev
            off_w, st_w, carry_w = jnp.exp(acum), jnp.exp(a_last - acum) * dt, jnp.exp(a_last)
        else:
            runs = runs_ref[sl]                               # [L] int32
            run_last = jnp.sum(jnp.where(is_last, runs, 0))
            mask = causal & (runs[:, None] == runs[None, :])
            off_w = jnp.where(runs == run_prev, jnp.exp(acum), 0.0)
            st_w = jnp.where(runs == run_last, jnp.exp(a_last - acum) * dt, 0.0)
            carry_w = jnp.where(run_last == run_prev, jnp.exp(a_last), 0.0)   # 0: a run starts in this chunk
        diff = jnp.where(mask, acum[:, None] - acum[None, :], 0.0)
        decay = jnp.where(mask, jnp.exp(diff), 0.0)
        W = dot(Cc, Bc, dims_nt) * decay * dt[None, :]        # [L(l), L(s)]
        y = dot(W, x, dims_nn) + dot(Cc, S, dims_nt) * off_w[:, None]   # [L, bp]
        y_ref[sl, :] = y.astype(y_ref.dtype)
        S = carry_w * S + dot(x * st_w[:, None], Bc, dims_tn)   # [bp, n]
        return S, run_last

    S, _ = lax.fori_loop(0, nc, body, (s0_ref[...].astype(f32), jnp.int32(0)))
    sf_ref[...] = S


class KernelConfig(NamedTuple):
    """Static launch options (hashable: the custom_vjp's non-differentiable argument)."""
    chunk_size: int
    interpret: object                   # bool, or a plgpu.InterpretGPUParams for "mosaic_gpu"
    backend: str = "portable"           # one of BACKENDS
    # the rest: portable backend only
    block_p: int | None = None          # p-slice per program (None: all of p); must divide p
    precision: lax.Precision = lax.Precision.HIGHEST   # in-kernel dots; DEFAULT = TF32 on GPU
    num_warps: int | None = None        # Triton launch options (None: Pallas defaults)
    num_stages: int | None = None


def _triton_params(cfg: KernelConfig):
    if cfg.interpret or (cfg.num_warps is None and cfg.num_stages is None):
        return None
    from jax.experimental.pallas import triton as plt
    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
    return cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(x, dt, A, B, C, s0, run_ids, cfg: KernelConfig):
    if cfg.backend == "mosaic_gpu":
        return ssd_mosaic.forward(x, dt, A, B, C, s0, run_ids, interpret=cfg.interpret)
    return _forward_portable(x, dt, A, B, C, s0, run_ids, cfg)


def _forward_portable(x, dt, A, B, C, s0, run_ids, cfg: KernelConfig):
    """Pad T, launch the portable kernel, slice. Returns (y [b,t,h,p] x.dtype, S [b,h,p,n] fp32)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, L = h // g, cfg.chunk_size
    nc = -(-t // L)
    T = nc * L
    bp = p if cfg.block_p is None else cfg.block_p
    if p % bp:
        raise ValueError(f"block_p={cfg.block_p} must divide the head dim p={p}")

    def padt(a):
        return jnp.pad(a, [(0, 0), (0, T - t)] + [(0, 0)] * (a.ndim - 2))

    dt_f = dt.astype(f32)
    dA = padt(dt_f * A.astype(f32))                           # dt = 0 padding: decay 1, no update
    args = [padt(x), padt(dt_f), dA, padt(B), padt(C)]
    specs = [
        pl.BlockSpec((None, T, None, bp), lambda i, j, k: (i, 0, j, k)),
        pl.BlockSpec((None, T, None), lambda i, j, k: (i, 0, j)),
        pl.BlockSpec((None, T, None), lambda i, j, k: (i, 0, j)),
        pl.BlockSpec((None, T, None, n), lambda i, j, k: (i, 0, j // r, 0)),   # group of head j
        pl.BlockSpec((None, T, None, n), lambda i, j, k: (i, 0, j // r, 0)),
    ]
    if run_ids is not None:
        args.append(jnp.pad(run_ids.astype(jnp.int32), [(0, 0), (0, T - t)], mode="edge"))
        specs.append(pl.BlockSpec((None, T), lambda i, j, k: (i, 0)))
    state_spec = pl.BlockSpec((None, None, bp, n), lambda i, j, k: (i, j, k, 0))
    args.append(s0.astype(f32))
    specs.append(state_spec)

    kernel = functools.partial(_kernel, L=L, nc=nc, precision=cfg.precision)
    if run_ids is None:  # keep one kernel signature: runs_ref=None
        def kernel(x_ref, dt_ref, dA_ref, B_ref, C_ref, s0_ref, y_ref, sf_ref, _k=kernel):
            _k(x_ref, dt_ref, dA_ref, B_ref, C_ref, None, s0_ref, y_ref, sf_ref)

    y, S = pl.pallas_call(
        kernel,
        grid=(b, h, p // bp),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, T, None, bp), lambda i, j, k: (i, 0, j, k)), state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, T, h, p), x.dtype), jax.ShapeDtypeStruct((b, h, p, n), f32)],
        interpret=cfg.interpret,
        compiler_params=_triton_params(cfg),
        name="ssd_chunked_scan_fwd",
    )(*args)
    return y[:, :t], S


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ssd_pallas(x, dt, A, B, C, s0, run_ids, cfg, reference):
    return _forward(x, dt, A, B, C, s0, run_ids, cfg)


def _ssd_pallas_fwd(x, dt, A, B, C, s0, run_ids, cfg, reference):
    return _forward(x, dt, A, B, C, s0, run_ids, cfg), (x, dt, A, B, C, s0, run_ids)


def _ssd_pallas_bwd(cfg, reference, res, cts):
    """Backward = VJP of the reference op, recomputing its forward from the saved inputs."""
    x, dt, A, B, C, s0, run_ids = res

    def ref(x, dt, A, B, C, s0):
        return reference(x, dt, A, B, C, cfg.chunk_size, s0, run_ids)

    _, vjp = jax.vjp(ref, x, dt, A, B, C, s0)
    return (*vjp(cts), None)   # no cotangent for the integer run ids


_ssd_pallas.defvjp(_ssd_pallas_fwd, _ssd_pallas_bwd)


def ssd_pallas(x, dt, A, B, C, *, chunk_size: int, initial_state=None, run_ids=None,
               interpret=None, backend: str | None = None, block_p: int | None = None,
               precision=lax.Precision.HIGHEST, num_warps: int | None = None,
               num_stages: int | None = None, reference=None):
    """Kernel forward. Inputs as `nemotron_jax.ops.ssd.ssd` (validated there); ``run_ids`` from
    `segment_runs`. ``backend``: one of BACKENDS, None = `backend_for` these shapes (ValueError if
    the named or chosen backend does not support them). ``interpret``: None means True unless the
    default backend is GPU; the Mosaic GPU backend also takes a ``plgpu.InterpretGPUParams``.
    ``reference``: ``fn(x, dt, A, B, C, chunk_size, s0, run_ids) -> (y, state)``, a differentiable
    jnp op whose VJP is the backward (None: forward only, no autodiff). ``block_p``, ``precision``,
    ``num_warps``, ``num_stages``: portable backend only (`KernelConfig`). Returns (y, final_state)."""
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda", "rocm")
    elif isinstance(interpret, (bool, int)):
        interpret = bool(interpret)
    b, t, h, p = x.shape
    n = B.shape[3]
    dtype = jnp.result_type(x, B, C)   # mixed dtypes: the promoted one decides (Mosaic needs one dtype)
    if backend is None:
        backend = backend_for(x.shape, B.shape, chunk_size=chunk_size, dtype=dtype)
    if backend not in BACKENDS or not _supported(x.shape, B.shape, chunk_size, dtype)[backend]:
        raise ValueError(f"SSD kernel backend {backend!r} does not support x {tuple(x.shape)} {x.dtype}, "
                         f"B {tuple(B.shape)} {B.dtype}, chunk_size={chunk_size} ({SUPPORTED})")
    if backend == "portable" and not isinstance(interpret, bool):
        raise ValueError("the portable SSD kernel takes interpret=True/False, not Mosaic GPU interpreter params")
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state
    cfg = KernelConfig(chunk_size, interpret, backend, block_p, precision, num_warps, num_stages)
    if reference is None:
        return _forward(x, dt, A, B, C, s0, run_ids, cfg)
    return _ssd_pallas(x, dt, A, B, C, s0, run_ids, cfg, reference)
