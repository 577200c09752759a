"""Mosaic GPU kernel for the SSD chunked scan forward (the JAX-recommended GPU backend, sm_90 wgmma).

A leaf: `supports` and `forward`, arrays in, arrays out. The op (`nemotron_jax.ops.ssd`) asks
`supports` once per call, picks this kernel (first choice of ``impl="pallas"``, and of ``"auto"`` on
a GPU), says whether to interpret, and owns the custom VJP. Off GPU the same kernel runs under Mosaic GPU's interpreter
(``plgpu.InterpretGPUParams``), which simulates SMEM, TMA copies, barriers and wgmma on CPU and can
detect data races: that is how the tests check it against the token-by-token oracle.

Work split
----------
XLA computes the per-token scalars (O(b t h) elementwise, p times less than x) with T padded to
a multiple of the kernel's 64-token block (padding: dt = 0, so no update and no decay):

    acum[l]  = chunk-local cumsum of dt*A                       intra-chunk decay exp(acum_l - acum_s)
    offw[l]  = exp(acum_l) [run_l == run at previous block end]  weight of the carried state in y_l
    stw[s]   = exp(acum_last - acum_s) dt_s [run_s == run_last]   weight of token s in the block state
    carry    = exp(acum_last) [no run starts in the block]        decay of the carried state

The kernel, one warpgroup per (batch row, head), walks the 64-token blocks with the state
S [p, n] fp32 in registers (``emit_pipeline`` double-buffers the TMA loads of x, B, C and the
vectors). Per block, with matmuls as wgmma (operands in SMEM, fp32 accumulation):

    CB = C @ B^T                                     [L, L]
    W  = CB * exp(acum_l - acum_s) * dt_s * [s <= l, same run]
    y  = offw * (C @ S16^T) + W16 @ x                [L, p]  -> SMEM -> TMA store
    S  = carry * S + x^T @ (stw * B)16               [p, n]

where ``16`` marks a cast to the input dtype (bf16/f16: wgmma operands). Those three roundings
are the kernel's only departure from fp32 arithmetic (relative 2^-9 each for bf16); the carried
state itself stays fp32. The block length (64) is the kernel's own tile: the result does not
depend on the op's ``chunk_size`` (it is a tuning knob of the jnp op).

Supported: p = 64 (the head dim of every Nemotron 3 preset), n in {64, 128}, bf16 or f16 x/B/C,
h divisible by g. SMEM use at n = 128: ~84 KiB of double-buffered inputs + ~80 KiB of scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

f32 = jnp.float32
BLOCK_T = 64
SUPPORTED = "head dim p = 64, state n in {64, 128}, x/B/C bfloat16 or float16, h divisible by g"
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(x_shape, B_shape, chunk_size: int, dtype) -> bool:
    """True when this kernel handles x [b, t, h, p] and B/C [b, t, g, n] of ``dtype`` (any t).
    ``chunk_size`` does not matter: the kernel tiles T by its own BLOCK_T."""
    try:
        b, t, h, p = x_shape
        _, _, g, n = B_shape
    except (TypeError, ValueError):
        return False
    return (b >= 1 and t >= 1 and g >= 1 and h % g == 0 and p == 64 and n in (64, 128)
            and jnp.dtype(dtype) in _DTYPES)


def _token_weights(dt, A, run_ids, nc: int, p: int):
    """Per-token vectors [b, h, T] fp32 (acum, dt, offw, stw), runs [b, T] fp32 and carry [b, h, nc*p]
    (the block's carry repeated p times: it scales the rows of S [p, n]).
    dt [b, T, h] is already padded; run_ids [b, T] int32 (padded with the last run) or None."""
    b, T, h = dt.shape
    L = BLOCK_T
    acum = jnp.cumsum((dt * A).reshape(b, nc, L, h), axis=2)                 # [b, c, l, h]
    a_last = acum[:, :, -1]                                                  # [b, c, h]
    runs = jnp.zeros((b, nc, L), jnp.int32) if run_ids is None else run_ids.reshape(b, nc, L)
    run_last = runs[:, :, -1]                                                # [b, c]
    run_prev = jnp.pad(run_last[:, :-1], [(0, 0), (1, 0)])                   # 0 = run at t=0
    offw = jnp.exp(acum) * (runs == run_prev[..., None])[..., None]
    stw = (jnp.exp(a_last[:, :, None] - acum) * dt.reshape(b, nc, L, h)
           * (runs == run_last[..., None])[..., None])
    carry = jnp.exp(a_last) * (run_last == run_prev)[..., None]              # [b, c, h]
    vec = lambda a: a.reshape(b, T, h).transpose(0, 2, 1)
    carry = jnp.broadcast_to(carry.transpose(0, 2, 1)[..., None], (b, h, nc, p)).reshape(b, h, nc * p)
    # runs travel as fp32 (exact for ids < 2^24) so that every vector shares one load path
    return vec(acum), vec(dt), vec(offw), vec(stw), runs.reshape(b, T).astype(f32), carry


def _block_step(idx, x_s, B_s, C_s, acum_r_s, acum_c_s, dt_s, offw_s, stw_s, runs_r_s, runs_c_s, carry_s,
                S, *, s16, bp, w16, y_s, y_g, dtype):
    """One 64-token block. *_s: this block's SMEM tiles; S [p, n] fp32 (WGMMA layout): the carry.
    Row/column copies of acum and runs: one SMEM buffer is loaded in one register layout only."""
    L = BLOCK_T
    p, n = S.shape
    wg, row_v, col_v = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    acum_r, runs_r = plgpu.load(acum_r_s, layout=row_v), plgpu.load(runs_r_s, layout=row_v)
    offw_r, stw_r = plgpu.load(offw_s, layout=row_v), plgpu.load(stw_s, layout=row_v)
    carry_r = plgpu.load(carry_s, layout=row_v)
    acum_c, runs_c = plgpu.load(acum_c_s, layout=col_v), plgpu.load(runs_c_s, layout=col_v)
    dt_c = plgpu.load(dt_s, layout=col_v)
    rows = lambda v, width: lax.broadcast_in_dim(v, (v.shape[0], width), [0])   # v[i] along row i
    cols = lambda v: lax.broadcast_in_dim(v, (L, L), [1])                       # v[j] along column j

    def matmul(a_smem, b_smem, shape):
        def scope(acc):
            plgpu.wgmma(acc, a_smem, b_smem)
            return acc[...]
        return pl.run_scoped(scope, plgpu.ACC(shape, f32))

    CB = matmul(C_s, B_s.transpose((1, 0)), (L, L))
    l_idx = plgpu.broadcasted_iota(jnp.int32, (L, L), 0, layout=wg)
    s_idx = plgpu.broadcasted_iota(jnp.int32, (L, L), 1, layout=wg)
    same = (s_idx <= l_idx) & (rows(runs_r, L) == cols(runs_c))
    # where() before the product: exp of the (positive) masked-out exponents may overflow to inf
    W = jnp.where(same, jnp.exp(rows(acum_r, L) - cols(acum_c)), 0.0) * CB * cols(dt_c)

    s16[...] = S.astype(dtype)
    w16[...] = W.astype(dtype)
    plgpu.commit_smem()                                   # register stores -> visible to wgmma
    y = rows(offw_r, p) * matmul(C_s, s16.transpose((1, 0)), (L, p)) + matmul(w16, x_s, (L, p))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)       # the previous block's y has left y_s
    y_s[...] = y.astype(y_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_g.at[pl.ds(idx[0] * L, L)])

    bp[...] = (plgpu.load(B_s, layout=wg).astype(f32) * rows(stw_r, n)).astype(dtype)
    plgpu.commit_smem()
    return rows(carry_r, n) * S + matmul(x_s.transpose((1, 0)), bp, (p, n))


def forward(x, dt, A, B, C, s0, run_ids, *, chunk_size: int | None = None, interpret=False):
    """x [b,t,h,p], dt [b,t,h], A [h], B/C [b,t,g,n], s0 [b,h,p,n], run_ids [b,t] int or None, for
    shapes and the dtype of x, B, C together that `supports` accepts (not checked again here; a 16-bit
    result dtype means x, B and C share it). ``chunk_size``: unused (see `supports`).
    ``interpret``: False (compile for the GPU), True or a ``plgpu.InterpretGPUParams`` (CPU
    interpreter; e.g. ``InterpretGPUParams(detect_races=True)``). Returns (y [b,t,h,p], S fp32)."""
    del chunk_size
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    L, r = BLOCK_T, h // g
    nc = -(-t // L)
    T = nc * L
    padt = lambda a, **kw: jnp.pad(a, [(0, 0), (0, T - t)] + [(0, 0)] * (a.ndim - 2), **kw)
    runs = None if run_ids is None else padt(run_ids.astype(jnp.int32), mode="edge")
    acum, dtv, offw, stw, runs, carry = _token_weights(padt(dt.astype(f32)), A.astype(f32), runs, nc, p)
    dtype = x.dtype
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))   # 64 x 16-bit = 128 B rows

    def body(x_g, B_g, C_g, acum_g, dt_g, offw_g, stw_g, runs_g, carry_g, s0_g, y_g, sf_g,
             s_f32, s16, bp, w16, y_s, bar):
        bi, hi = lax.axis_index("b"), lax.axis_index("h")
        gi = lax.div(hi, jnp.int32(r))
        plgpu.copy_gmem_to_smem(s0_g.at[bi, hi], s_f32, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        S0 = plgpu.load(s_f32, layout=plgpu.Layout.WGMMA)
        mat = lambda width: plgpu.BlockSpec((L, width), lambda c: (c, 0), transforms=tiles)
        vec = plgpu.BlockSpec((L,), lambda c: (c,))
        step = functools.partial(_block_step, s16=s16, bp=bp, w16=w16, y_s=y_s, y_g=y_g.at[bi, :, hi, :],
                                 dtype=dtype)
        S = plgpu.emit_pipeline(
            step, grid=(nc,), in_specs=[mat(p), mat(n), mat(n)] + [vec] * 7 + [plgpu.BlockSpec((p,), lambda c: (c,))],
            max_concurrent_steps=2, init_carry=S0,
        )(x_g.at[bi, :, hi, :], B_g.at[bi, :, gi, :], C_g.at[bi, :, gi, :], acum_g.at[bi, hi], acum_g.at[bi, hi],
          dt_g.at[bi, hi], offw_g.at[bi, hi], stw_g.at[bi, hi], runs_g.at[bi], runs_g.at[bi], carry_g.at[bi, hi])
        s_f32[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_f32, sf_g.at[bi, hi])
        plgpu.wait_smem_to_gmem(0)                        # also covers the last block's y store

    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, T, h, p), dtype), jax.ShapeDtypeStruct((b, h, p, n), f32)),
        scratch_types=[plgpu.SMEM((p, n), f32), plgpu.SMEM((p, n), dtype, transforms=tiles),
                       plgpu.SMEM((L, n), dtype, transforms=tiles), plgpu.SMEM((L, L), dtype, transforms=tiles),
                       plgpu.SMEM((L, p), dtype, transforms=tiles), plgpu.Barrier(num_barriers=1)],
        grid=(b, h), grid_names=("b", "h"),
        interpret=interpret or None,
    )
    y, S = kernel(padt(x), padt(B), padt(C), acum, dtv, offw, stw, runs, carry, s0.astype(f32))
    return y[:, :t], S
