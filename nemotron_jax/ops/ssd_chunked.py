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

import jax
import jax.numpy as jnp

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
    a zero update, so the final state is unchanged) and y is sliced back.

    Segments use same-run masks, not -inf log-decays: every exponent is a finite sum of
    log-decays (<= 0) or is masked to 0 *before* the exp, so neither the forward nor the
    gradient can produce inf * 0 = NaN. Within-chunk decays are direct sums over the tokens
    between s and l ("segsum"), so strong decays lose no precision to cancellation.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, L = h // g, chunk_size
    nc = -(-t // L)
    pad = nc * L - t

    def padt(a):
        return jnp.pad(a.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    x_ = padt(x).reshape(b, nc, L, g, r, p)
    dt_ = padt(dt).reshape(b, nc, L, g, r)
    B_ = padt(B).reshape(b, nc, L, g, n)
    C_ = padt(C).reshape(b, nc, L, g, n)
    A_ = A.astype(f32).reshape(g, r)
    if run_ids is None:
        runs = jnp.zeros((b, nc, L), jnp.int32)
    else:  # padded tokens continue the last run
        runs = jnp.pad(run_ids.astype(jnp.int32), [(0, 0), (0, pad)], mode="edge").reshape(b, nc, L)

    # Per-chunk log-decays, heads before time: [b, c, g, r, L].
    dt_h = jnp.moveaxis(dt_, 2, -1)                            # [b, c, g, r, L]
    dA = dt_h * A_[:, :, None]
    Acum = jnp.cumsum(dA, axis=-1)                             # log-decay from chunk start through l
    Alast = Acum[..., -1]                                      # whole-chunk log-decay [b, c, g, r]
    # segsum[l, s] = sum_{s < k <= l} dA_k, summed directly (not Acum_l - Acum_s, which loses
    # ~eps * |Acum| to cancellation when decays are strong); 0 above the diagonal.
    strict = jnp.tril(jnp.ones((L, L), bool), -1)              # [k, s]: k > s
    segsum = jnp.cumsum(jnp.where(strict, dA[..., :, None], 0.0), axis=-2)   # [b, c, g, r, l, s]

    run_last = runs[:, :, -1]                                  # [b, c]
    run_prev = jnp.pad(run_last[:, :-1], [(0, 0), (1, 0)])     # run at the previous chunk's end; 0 (= run at t=0) for c=0

    # (i) intra-chunk (diagonal blocks): y_l += sum_{s<=l, same run} (C_l.B_s) exp(segsum[l, s]) dt_s x_s
    causal = jnp.tril(jnp.ones((L, L), bool))
    mask = causal & (runs[:, :, :, None] == runs[:, :, None, :])      # [b, c, l, s]
    mask = mask[:, :, None, None]                                      # [b, c, 1, 1, l, s]
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, segsum, 0.0)), 0.0)
    CB = jnp.einsum("bclgn,bcsgn->bcgls", C_, B_)                       # [b, c, g, l, s]
    W = CB[:, :, :, None] * decay * dt_h[..., None, :]                 # [b, c, g, r, l, s]
    Y_diag = jnp.einsum("bcgrls,bcsgrp->bclgrp", W, x_)

    # (ii) chunk states: contributions of the chunk's tokens to the state at its last token,
    # decayed by exp(segsum[L-1, s]) = exp(sum_{s < k < L} dA_k).
    w_state = jnp.exp(segsum[..., -1, :]) * dt_h                       # [b, c, g, r, s]
    w_state = w_state * (runs == run_last[..., None])[:, :, None, None, :]
    xw = x_ * jnp.moveaxis(w_state, -1, 2)[..., None]                  # [b, c, s, g, r, p]
    states = jnp.einsum("bcsgrp,bcsgn->bcgrpn", xw, B_)                # [b, c, g, r, p, n]

    # (iii) inter-chunk scan (sequential over c: cost linear in T). The incoming state survives
    # chunk c only if no run starts inside it, i.e. its last run equals the previous chunk's.
    keep = (run_last == run_prev).astype(f32)                           # [b, c]
    chunk_decay = jnp.exp(Alast) * keep[:, :, None, None]               # [b, c, g, r]
    S0 = (jnp.zeros((b, h, p, n), f32) if initial_state is None
          else initial_state.astype(f32)).reshape(b, g, r, p, n)

    def carry(S, inp):
        decay_c, state_c = inp
        return decay_c[..., None, None] * S + state_c, S

    S_final, S_prev = jax.lax.scan(
        carry, S0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
    S_prev = jnp.moveaxis(S_prev, 0, 1)                                 # [b, c, g, r, p, n]: state entering chunk c

    # (iv) state -> output: y_l += exp(Acum_l) C_l . S_prev, where position l is still in the
    # run that was current at the previous chunk's end.
    off = jnp.exp(Acum) * (runs == run_prev[..., None])[:, :, None, None, :]   # [b, c, g, r, l]
    Y_off = jnp.einsum("bclgn,bcgrpn->bclgrp", C_, S_prev) * jnp.moveaxis(off, -1, 2)[..., None]

    y = (Y_diag + Y_off).reshape(b, nc * L, h, p)[:, :t]
    return y.astype(x.dtype), S_final.reshape(b, h, p, n)
