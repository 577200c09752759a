"""The portable Pallas kernel for the Mamba-2 SSD chunked scan (forward only).

A leaf: arrays in, arrays out. `supports` says which shapes it takes; `forward` runs it and does not
check them again: the op (`nemotron_jax.ops.ssd`) asks `supports` once per call, chooses between this
kernel, the Mosaic GPU one (`ssd_mosaic.py`) and the chunked jnp op, says whether to interpret, and
owns the custom VJP (the backward is the chunked op's VJP).

It uses the portable Pallas surface only (``pl.pallas_call`` with a grid and ``BlockSpec``s, ``pl.ds``
slices, ``lax.fori_loop``, ``lax.dot_general``, elementwise jnp). It runs under ``interpret=True`` on
CPU, serves every dtype (fp32 included: tested at fp32 tolerances) and power-of-two tile sizes, and
on a GPU lowers through Pallas' Triton backend (deprecated since JAX 0.11), which is why the op's
``impl="auto"`` never picks it.

Layout
------
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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

f32 = jnp.float32

SUPPORTED = ("chunk_size, head dim p and state dim n powers of two in [16, 256], dtype float32, bfloat16 "
             "or float16, h divisible by g")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _pow2_in(v: int, lo: int = 16, hi: int = 256) -> bool:
    return lo <= v <= hi and (v & (v - 1)) == 0


def supports(x_shape, B_shape, chunk_size: int, dtype) -> bool:
    """True when this kernel handles x [b,t,h,p], B/C [b,t,g,n], ``chunk_size`` and ``dtype``: any T
    (padded to a multiple of the chunk); tile sizes powers of two with matmul dims >= 16 (Triton's
    constraints)."""
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


def _triton_params(interpret: bool, num_warps: int | None, num_stages: int | None):
    if interpret or (num_warps is None and num_stages is None):
        return None
    from jax.experimental.pallas import triton as plt
    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def forward(x, dt, A, B, C, s0, run_ids, *, chunk_size: int, interpret: bool, block_p: int | None = None,
            precision=lax.Precision.HIGHEST, num_warps: int | None = None, num_stages: int | None = None):
    """x [b,t,h,p], dt [b,t,h], A [h], B/C [b,t,g,n], s0 [b,h,p,n], run_ids [b,t] int or None, for
    shapes `supports` accepts (not checked again here). Pads T to a multiple of ``chunk_size``,
    launches the kernel, slices. ``interpret``: True (Pallas interpreter) or False (compile).
    ``block_p``: p-slice per program (None: all of p; must divide p). ``precision``: in-kernel dots
    (DEFAULT = TF32 on GPU). ``num_warps``, ``num_stages``: Triton launch options (None: Pallas'
    defaults). Returns (y [b,t,h,p] in x's dtype, S [b,h,p,n] fp32)."""
    if not isinstance(interpret, bool):
        raise ValueError("the portable SSD kernel takes interpret=True/False, not Mosaic GPU interpreter params")
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, L = h // g, chunk_size
    nc = -(-t // L)
    T = nc * L
    bp = p if block_p is None else block_p
    if p % bp:
        raise ValueError(f"block_p={block_p} must divide the head dim p={p}")

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

    kernel = functools.partial(_kernel, L=L, nc=nc, precision=precision)
    if run_ids is None:  # keep one kernel signature: runs_ref=None
        def kernel(x_ref, dt_ref, dA_ref, B_ref, C_ref, s0_ref, y_ref, sf_ref, _k=kernel):
            _k(x_ref, dt_ref, dA_ref, B_ref, C_ref, None, s0_ref, y_ref, sf_ref)

    y, S = pl.pallas_call(
        kernel,
        grid=(b, h, p // bp),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, T, None, bp), lambda i, j, k: (i, 0, j, k)), state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, T, h, p), x.dtype), jax.ShapeDtypeStruct((b, h, p, n), f32)],
        interpret=interpret,
        compiler_params=_triton_params(interpret, num_warps, num_stages),
        name="ssd_chunked_scan_fwd",
    )(*args)
    return y[:, :t], S
