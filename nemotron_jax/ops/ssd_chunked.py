"""SSD math in plain jnp: the token-by-token oracle and the four-step chunked algorithm.

Both functions take validated inputs (see `nemotron_jax.ops.ssd.ssd` for the public op,
shapes and checks) and always return ``(y, final_state)``:

    x [b, t, h, p]   dt [b, t, h]   A [h]   B, C [b, t, g, n]   state [b, h, p, n] (fp32)

Recurrence per head (S is [p, n]; head i reads group i // (h // g)):

    S_t = exp(dt_t * A) * S_{t-1} + (dt_t * x_t) B_t^T        y_t = S_t C_t

With ``run_ids`` (see `segment_runs`), S_{t-1} is replaced by zero at every token whose run
id differs from the previous token's, so packed documents share no state.

Everything is computed in fp32; y is cast back to x's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def segment_runs(segment_ids: jax.Array) -> jax.Array:
    """Turn segment ids [b, t] into run indices [b, t] int32: 0 at t=0, +1 at each id change.

    A new segment starts wherever the id differs from the previous token's id, so the ids need
    not be sorted or unique per row ([0, 0, 1, 1, 0] is three documents). Run indices are
    non-decreasing, which makes "same run" equivalent to "no reset in between" and lets the
    chunked form use plain equality masks.
    """
    seg = segment_ids.astype(jnp.int32)
    change = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(seg[:, :1]), jnp.cumsum(change, axis=1)], axis=1)


def ssd_reference(x, dt, A, B, C, initial_state=None, run_ids=None):
    """Token-by-token `lax.scan` over t: the oracle. Returns (y [b,t,h,p] x.dtype, S [b,h,p,n] fp32)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    x_f, dt_f, A_f = x.astype(f32), dt.astype(f32), A.astype(f32)
    B_h = jnp.repeat(B.astype(f32), r, axis=2)  # [b, t, h, n]; head i -> group i // r
    C_h = jnp.repeat(C.astype(f32), r, axis=2)
    S0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    if run_ids is None:
        keep = jnp.ones((b, t), bool)
    else:  # keep the previous state unless this token starts a new run
        keep = jnp.concatenate([jnp.ones((b, 1), bool), run_ids[:, 1:] == run_ids[:, :-1]], axis=1)

    def step(S_bhpn, inp):
        x_bhp, dt_bh, B_bhn, C_bhn, keep_b = inp
        decay_bh = jnp.exp(dt_bh * A_f)
        carried = jnp.where(keep_b[:, None, None, None], decay_bh[:, :, None, None] * S_bhpn, 0.0)
        S_bhpn = carried + (dt_bh[:, :, None] * x_bhp)[..., None] * B_bhn[:, :, None, :]
        y_bhp = jnp.einsum("bhpn,bhn->bhp", S_bhpn, C_bhn)
        return S_bhpn, y_bhp

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (x_f, dt_f, B_h, C_h, keep))
    S, y_tbhp = jax.lax.scan(step, S0, xs)
    return jnp.moveaxis(y_tbhp, 0, 1).astype(x.dtype), S


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, run_ids=None):
    """The four-step chunked SSD (spec section 2.6) in fp32. Returns (y, final_state).

    T is padded up to a multiple of ``chunk_size`` with dt = x = B = C = 0 (decay exp(0) = 1 and
    a zero update, so the final state is unchanged) and y is sliced back. Differentiable through
    a hand-written VJP (`_chunks`) that reuses the forward's inter-chunk states.

    Segments use same-run masks; within-chunk decays are exact-prefix differences
    (`_prefix_sums`), so strong decays lose no precision to cancellation.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, L = h // g, chunk_size
    nc = -(-t // L)
    pad = nc * L - t

    def padt(a):
        return jnp.pad(a.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    runs = None
    if run_ids is not None:   # padded tokens continue the last run
        runs = jnp.pad(run_ids.astype(jnp.int32), [(0, 0), (0, pad)], mode="edge").reshape(b, nc, L)
    S0 = None   # the state inside is [b, g, n, r*p]: see the layouts below
    if initial_state is not None:
        S0 = jnp.moveaxis(initial_state.astype(f32).reshape(b, g, r * p, n), -1, 2)
    y, S = _chunks(padt(x).reshape(b, nc, L, g, r, p), padt(dt).reshape(b, nc, L, g, r),
                   A.astype(f32).reshape(g, r), padt(B).reshape(b, nc, L, g, n),
                   padt(C).reshape(b, nc, L, g, n), S0, runs)
    return y.reshape(b, nc * L, h, p)[:, :t].astype(x.dtype), jnp.moveaxis(S, 2, -1).reshape(b, h, p, n)


# Layouts inside `_chunks` (c = chunk, l/s = position in the chunk, head = (g, r), m = (r, p)):
#   token-major  [b, c, L, g, r, p]   the caller's layout
#   head-major   [b, c, g, r, L, p]   per-head L x L matmuls (intra-chunk)
#   group-major  [b, c, g, L, m]      a group's heads folded into one matmul dim (states, C . S)
#   states       [b, c, g, n, m]
# Every einsum is a batched GEMM, batch dims leading, with the lhs contracting over its last dim:
# XLA's CPU backend sends those to its fast GEMM library and transposed-lhs ones to a ~2x slower
# path, so the backward works on the transposed intra-chunk matrices ([s, l]).

def _pow2(k):
    """2.0 ** k for int32 k in the normal range, exactly (built from the exponent bits)."""
    return jax.lax.bitcast_convert_type((k + 127) << 23, f32)


def _triangle(L, op):
    """[L, L] bool, entry [i, j] = i op j. A numpy constant: masks made from iota inside the
    [.., L, L] loops stop XLA's CPU backend from vectorising them (~6x slower exp pass)."""
    i = np.arange(L)
    return {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}[op](i[:, None], i[None, :])


def _tri_matmul(a, kind):
    """Cumulative sums along the last axis as one matmul with a 0/1 matrix (jnp.cumsum lowers to
    a log-depth scan of many small ops on CPU). kind: "incl" (sum over k <= l), "excl" (k < l),
    "rev" (k >= l)."""
    tri = _triangle(a.shape[-1], {"incl": "<=", "excl": "<", "rev": ">="}[kind])
    return jnp.matmul(a, tri.astype(np.float32), precision=jax.lax.Precision.HIGHEST)


def _prefix_sums(a):
    """Inclusive prefix sums of a [..., L] as hi + lo, with hi exact.

    a = hi_part + lo_part where hi_part is a rounded to a power-of-two grid ``step`` per row
    with at most 2**bits steps, so every partial sum of hi_part is a multiple of step below
    2**23 steps: the matmul sums it exactly in fp32. Then hi_l - hi_s is exact and segment sums
    (hi_l - hi_s) + (lo_l - lo_s) lose no precision to cancellation however large |prefix|
    gets (strong decays): the error is ~eps * |segment sum|.
    """
    bits = 23 - max(a.shape[-1] - 1, 1).bit_length()
    m = jnp.max(jnp.abs(a), axis=-1, keepdims=True)
    e = jnp.clip(((jax.lax.bitcast_convert_type(m, jnp.int32) >> 23) & 255) - 126, -100, 100)  # m < 2**e
    hi_part = jnp.round(a * _pow2(bits - e)) * _pow2(e - bits)
    return _tri_matmul(hi_part, "incl"), _tri_matmul(a - hi_part, "incl")


class _Chunk(NamedTuple):
    """Per-chunk decays and masks shared by the forward and the backward ([b, c, g, r, L] unless noted)."""
    dt: jax.Array      # dt, head-major
    hi: jax.Array      # prefix sums of dA = dt * A within the chunk, hi + lo (`_prefix_sums`)
    lo: jax.Array
    E: jax.Array       # exp(sum_{k > s} dA_k) where s is in the chunk's last run, else 0 (token -> chunk state)
    F: jax.Array       # exp(sum_{k <= l} dA_k) where l is in the previous chunk's last run, else 0 (state -> token)
    kd: jax.Array      # [b, c, g, r] decay of the incoming state across the chunk (0 if a run starts in it)
    same: jax.Array | None   # [b, c, 1, 1, L, L] same run (None: no run ids)


def _chunk_decays(dt, A, runs) -> _Chunk:
    dth = jnp.moveaxis(dt, 2, -1)                                  # [b, c, g, r, L]
    hi, lo = _prefix_sums(dth * A[:, :, None])
    if runs is None:
        m_last = m_prev = keep = True
        same = None
    else:
        run_last = runs[:, :, -1]
        run_prev = jnp.pad(run_last[:, :-1], [(0, 0), (1, 0)])     # 0 (= run at t=0) for c=0
        m_last = (runs == run_last[..., None])[:, :, None, None]
        m_prev = (runs == run_prev[..., None])[:, :, None, None]
        keep = (run_last == run_prev)[:, :, None, None]
        same = (runs[:, :, :, None] == runs[:, :, None, :])[:, :, None, None]
    E = jnp.where(m_last, jnp.exp((hi[..., -1:] - hi) + (lo[..., -1:] - lo)), 0.0)
    F = jnp.where(m_prev, jnp.exp(hi + lo), 0.0)
    kd = jnp.where(keep, jnp.exp(hi[..., -1] + lo[..., -1]), 0.0)
    return _Chunk(dth, hi, lo, E, F, kd, same)


def _decay_matrix(k: _Chunk, transpose: bool):
    """exp(sum_{s < k <= l} dA_k) on pairs s < l in one run, else 0: [b, c, g, r, l, s], or [.., s, l]
    with ``transpose``. Strictly causal: the diagonal (decay 1) is handled per token, which keeps
    the backward's log-decay sums free of cancellation against it. Masked before the exp, so no
    inf above the diagonal."""
    L = k.hi.shape[-1]
    if transpose:   # rows s, columns l
        mask, sign = _triangle(L, "<"), -1.0
    else:
        mask, sign = _triangle(L, ">"), 1.0
    if k.same is not None:
        mask = mask & k.same
    seg = sign * ((k.hi[..., :, None] - k.hi[..., None, :]) + (k.lo[..., :, None] - k.lo[..., None, :]))
    return jnp.exp(jnp.where(mask, seg, -jnp.inf))   # exp(-inf) = 0; never differentiated (custom VJP)


_UNROLL_CHUNKS = 16


def _state_scan(kd, states, S0, reverse: bool = False):
    """S_c = kd_c * S_{c-1} + states_c over chunks (sequential, linear in T); with ``reverse`` from the last
    chunk down, S_c = kd_c * S_{c+1} + states_c (the backward's gradient flow). Returns (final, entering
    [b, c, ...]: the value each chunk's step started from). Unrolled for few chunks: `lax.scan`'s stacked
    output costs a zero-fill and copies of the whole [b, c, ...] buffer, a tenth of the forward at T=512."""
    nc = kd.shape[1]
    if nc > _UNROLL_CHUNKS:
        def step(S, inp):
            kd_c, st_c = inp
            return kd_c * S + st_c, S
        S, entering = jax.lax.scan(step, S0, (jnp.moveaxis(kd, 1, 0), jnp.moveaxis(states, 1, 0)),
                                   reverse=reverse)
        return S, jnp.moveaxis(entering, 0, 1)
    S, entering = S0, [None] * nc
    for c in (reversed(range(nc)) if reverse else range(nc)):
        entering[c] = S
        S = kd[:, c] * S + states[:, c]
    return S, jnp.stack(entering, axis=1)


def _kd_states(kd, p):
    """kd [b, c, g, r] broadcast against states [b, c, g, n, r*p]."""
    return jnp.repeat(kd, p, axis=-1)[:, :, :, None, :]


@jax.custom_vjp
def _chunks(x, dt, A, B, C, S0, runs):
    """Chunked SSD on padded fp32 chunks: x [b,c,L,g,r,p], dt [b,c,L,g,r], A [g,r], B/C [b,c,L,g,n],
    S0 [b,g,n,r*p] or None, runs [b,c,L] int32 or None. Returns (y [b,c,L,g,r,p], final [b,g,n,r*p])."""
    return _chunks_fwd(x, dt, A, B, C, S0, runs)[0]


def _chunks_fwd(x, dt, A, B, C, S0, runs):
    b, nc, L, g, r, p = x.shape
    n = B.shape[-1]
    k = _chunk_decays(dt, A, runs)
    Bg, Cg = jnp.moveaxis(B, 3, 2), jnp.moveaxis(C, 3, 2)              # [b, c, g, L, n]
    xdt = x * dt[..., None]                                             # dt_s x_s: every use has both
    xh = jnp.moveaxis(xdt, 2, 4)                                        # [b, c, g, r, L, p]
    xg = jnp.moveaxis(xdt, 2, 3)                                        # [b, c, g, L, r, p]

    # (i) intra-chunk: y_l += sum_{s<=l, same run} (C_l.B_s) exp(sum_{s<k<=l} dA_k) dt_s x_s;
    # s < l as a matmul, s = l (decay 1) per token
    CB = jnp.einsum("bcgln,bcgsn->bcgls", Cg, Bg)
    W = CB[:, :, :, None] * _decay_matrix(k, False)                     # [b, c, g, r, l, s]
    y_strict = jnp.einsum("bcgrls,bcgrsp->bcgrlp", W, xh)
    CBd = jnp.sum(Cg * Bg, axis=-1)[:, :, :, None, :, None]             # [b, c, g, 1, L, 1] C_l . B_l
    y_diag = y_strict + CBd * xh

    # (ii) chunk states: sum_s E_s dt_s B_s x_s^T, the group's heads in one matmul
    xw = (xg * jnp.moveaxis(k.E, -1, 3)[..., None]).reshape(b, nc, g, L, r * p)
    states = jnp.einsum("bcgns,bcgsm->bcgnm", jnp.swapaxes(Bg, -1, -2), xw)

    # (iii) inter-chunk scan: S_prev[:, c] is the state entering chunk c
    S0_ = jnp.zeros((b, g, n, r * p), f32) if S0 is None else S0
    S_final, S_prev = _state_scan(_kd_states(k.kd, p), states, S0_)    # S_prev [b, c, g, n, m]

    # (iv) state -> output: y_l += F_l C_l . S_prev
    Q = jnp.einsum("bcgln,bcgnm->bcglm", Cg, S_prev).reshape(b, nc, g, L, r, p)
    y_off = Q * jnp.moveaxis(k.F, -1, 3)[..., None]

    y = jnp.moveaxis(y_diag, 4, 2) + jnp.moveaxis(y_off, 3, 2)           # [b, c, L, g, r, p]
    return (y, S_final), (x, dt, A, B, C, S0, runs, S_prev, Q, y_strict)


def _chunks_bwd(res, cts):
    x, dt, A, B, C, S0, runs, S_prev, Q, y_strict = res
    dy, dS_final = cts
    b, nc, L, g, r, p = x.shape
    n = B.shape[-1]
    k = _chunk_decays(dt, A, runs)
    Bg, Cg = jnp.moveaxis(B, 3, 2), jnp.moveaxis(C, 3, 2)
    BgT, CgT = jnp.swapaxes(Bg, -1, -2), jnp.swapaxes(Cg, -1, -2)      # [b, c, g, n, L]
    xdt = x * dt[..., None]
    xh = jnp.moveaxis(xdt, 2, 4)
    xg = jnp.moveaxis(xdt, 2, 3)
    dyh = jnp.moveaxis(dy, 2, 4)                                         # [b, c, g, r, L, p]
    dyg = jnp.moveaxis(dy, 2, 3)                                         # [b, c, g, L, r, p]

    # (i) intra-chunk, on [s, l] matrices. G = dW * W (s < l) is d/d(log-decay sum over s < k <= l);
    # its row and column sums come from the matmuls' outputs: sum_l G[s, l] = xdt_s . (W^T dy)_s
    # and sum_s G[s, l] = dy_l . y_strict_l.
    CBt = jnp.einsum("bcgsn,bcgln->bcgsl", Bg, Cg)
    Dt = _decay_matrix(k, True)
    dx_strict = jnp.einsum("bcgrsl,bcgrlp->bcgrsp", CBt[:, :, :, None] * Dt, dyh)
    dcum = jnp.sum(dyh * y_strict, axis=-1) - jnp.sum(xh * dx_strict, axis=-1)   # d/d prefix_j: + as l, - as s
    dWt = jnp.einsum("bcgrsp,bcgrlp->bcgrsl", xh, dyh)
    dCBt = jnp.sum(dWt * Dt, axis=3)                                     # [b, c, g, s, l]
    dBg = jnp.einsum("bcgsl,bcgln->bcgsn", dCBt, Cg)
    dCg = jnp.swapaxes(jnp.einsum("bcgns,bcgsl->bcgnl", BgT, dCBt), -1, -2)
    CBd = jnp.sum(Cg * Bg, axis=-1)                                      # the diagonal s = l
    dCBd = jnp.sum(dyh * xh, axis=(3, 5))                                # [b, c, g, L]
    dBg = dBg + dCBd[..., None] * Cg
    dCg = dCg + dCBd[..., None] * Bg
    dx_diag = dx_strict + CBd[:, :, :, None, :, None] * dyh

    # (iv) state -> output
    dcum = dcum + jnp.moveaxis(jnp.sum(dyg * Q, axis=-1), 3, -1) * k.F
    dQ = (dyg * jnp.moveaxis(k.F, -1, 3)[..., None]).reshape(b, nc, g, L, r * p)
    dCg = dCg + jnp.einsum("bcglm,bcgnm->bcgln", dQ, S_prev)
    dS_prev = jnp.einsum("bcgnl,bcglm->bcgnm", CgT, dQ)

    # (iii) inter-chunk scan, reversed: the state after chunk c gets dS_prev[c+1] and kd[c+1] * its grad
    dS0, dstates = _state_scan(_kd_states(k.kd, p), dS_prev, dS_final, reverse=True)  # [b, c, g, n, m]
    dkd = jnp.sum((dstates * S_prev).reshape(b, nc, g, n, r, p), axis=(3, 5))
    dlast = dkd * k.kd                                                   # d/d whole-chunk log-decay

    # (ii) chunk states
    Eg = jnp.moveaxis(k.E, -1, 3)[..., None]                             # [b, c, g, L, r, 1]
    xw = (xg * Eg).reshape(b, nc, g, L, r * p)
    U = jnp.einsum("bcgsn,bcgnm->bcgsm", Bg, dstates).reshape(b, nc, g, L, r, p)
    dE = jnp.moveaxis(jnp.sum(U * xg, axis=-1), 3, -1)                   # [b, c, g, r, L]
    dBg = dBg + jnp.einsum("bcgsm,bcgnm->bcgsn", xw, dstates)

    # log-decays dA_k = dt_k A: prefix_j (j >= k), suffix_s (s < k) and the whole chunk contain dA_k
    da = _tri_matmul(dcum, "rev") + _tri_matmul(dE * k.E, "excl") + dlast[..., None]
    dA = jnp.sum(da * k.dt, axis=(0, 1, 4))

    dxdt = jnp.moveaxis(dx_diag, 4, 2) + jnp.moveaxis(U * Eg, 3, 2)     # [b, c, L, g, r, p]
    ddt = jnp.sum(dxdt * x, axis=-1) + jnp.moveaxis(da * A[:, :, None], -1, 2)
    return (dxdt * dt[..., None], ddt, dA, jnp.moveaxis(dBg, 2, 3), jnp.moveaxis(dCg, 2, 3),
            None if S0 is None else dS0, None)


_chunks.defvjp(_chunks_fwd, _chunks_bwd)
