"""The Mamba-2 depthwise causal conv1d: k shifted multiply-adds in fp32, with a hand-written VJP.

Autodiff of the shifted slices gives, per tap, a pad of the cotangent and an fp32 convert of the slice, and the
weight gradient as k separate reductions over a broadcast; the VJP here reads dy once per tap, writes dx with
k shifted multiply-adds (the conv with the taps reversed) and the weight and bias gradients as row sums.
Measured on the bench Mamba conv ([4, 512, 1280], k = 4), forward + backward with bf16 inputs: 1.5x faster
than autodiff; with fp32 inputs within 10% slower, so those keep autodiff (docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.ops.ssd_chunked import segment_runs

f32 = jnp.float32


def _tap_masks(segment_ids_bt, k: int):
    """[k] masks [b, t, 1]: tap j (input t - (k-1) + j) lies in the same document as t; None without segments."""
    if segment_ids_bt is None:
        return None
    b, t = segment_ids_bt.shape
    seg_p = jnp.concatenate([jnp.full((b, k - 1), -1, segment_ids_bt.dtype), segment_ids_bt], axis=1)
    return [(seg_p[:, j:j + t] == segment_ids_bt)[..., None] for j in range(k)]


def _forward(x_btc, w_kc, b_c, hist_bkc, masks):
    k = w_kc.shape[0]
    t = x_btc.shape[1]
    xp = jnp.concatenate([hist_bkc.astype(x_btc.dtype), x_btc], axis=1)  # [b, t+k-1, c]
    y = jnp.zeros(x_btc.shape, f32)
    for j in range(k):
        tap = xp[:, j:j + t].astype(f32)
        if masks is not None and j < k - 1:  # the last tap is the token itself: always its own document
            tap = jnp.where(masks[j], tap, 0.0)
        y = y + tap * w_kc[j].astype(f32)
    return (y + b_c.astype(f32)).astype(x_btc.dtype)


@jax.custom_vjp
def _conv(x_btc, w_kc, b_c, hist_bkc, segment_ids_bt):
    return _forward(x_btc, w_kc, b_c, hist_bkc, _tap_masks(segment_ids_bt, w_kc.shape[0]))


def _conv_fwd(x_btc, w_kc, b_c, hist_bkc, segment_ids_bt):
    y = _forward(x_btc, w_kc, b_c, hist_bkc, _tap_masks(segment_ids_bt, w_kc.shape[0]))
    return y, (x_btc, w_kc, b_c, hist_bkc, segment_ids_bt)


def _conv_bwd(res, dy_btc):
    x_btc, w_kc, b_c, hist_bkc, segment_ids_bt = res
    k = w_kc.shape[0]
    bsz, t, c = x_btc.shape
    masks = _tap_masks(segment_ids_bt, k)
    dy = dy_btc.astype(f32)
    xp = jnp.concatenate([hist_bkc.astype(x_btc.dtype), x_btc], axis=1)  # [b, t+k-1, c]
    dxp = jnp.zeros((bsz, t + k - 1, c), f32)
    dw = []
    for j in range(k):
        masked = masks is not None and j < k - 1
        # input position t + j (in xp) fed output t through weight j; each mask is applied where it is read
        # (one consumer each), so XLA fuses it instead of writing a masked copy of dy per tap
        dyj = jnp.where(masks[j], dy, 0.0) if masked else dy
        dxp = dxp + jnp.pad(dyj * w_kc[j].astype(f32), ((0, 0), (j, k - 1 - j), (0, 0)))
        tap = xp[:, j:j + t].astype(f32)
        tap = jnp.where(masks[j], tap, 0.0) if masked else tap
        dw.append(jnp.sum((tap * dy).reshape(-1, c), axis=0))
    dw_kc = jnp.stack(dw).astype(w_kc.dtype)
    db_c = jnp.sum(dy.reshape(-1, c), axis=0).astype(b_c.dtype)
    seg_ct = None if segment_ids_bt is None else jnp.zeros(segment_ids_bt.shape, jax.dtypes.float0)
    return (dxp[:, k - 1:].astype(x_btc.dtype), dw_kc, db_c, dxp[:, :k - 1].astype(hist_bkc.dtype), seg_ct)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d(x_btc: jax.Array, w_kc: jax.Array, b_c: jax.Array | None,
                  segment_ids_bt: jax.Array | None = None, history_bkc: jax.Array | None = None, *,
                  custom_vjp: bool | None = None) -> jax.Array:
    """Depthwise causal conv: y[t] = sum_j w[j] * x[t - (k-1) + j] + b, taps from other documents zeroed.

    x [b, t, c], w [k, c], b [c] or None, segment_ids [b, t] ints or None; `history_bkc` holds the k-1 inputs
    before x (zeros when absent, i.e. the sequence start). A document is a run of equal segment ids, as in the
    SSD (`segment_runs`). Accumulates in fp32, returns x's dtype.
    Differentiable in x, w, b and history: by the hand-written VJP for narrow inputs (`custom_vjp=None`), by
    autodiff for fp32 ones, where XLA's own backward measured as fast or faster (benchmarks/causal_conv.py).
    """
    k = w_kc.shape[0]
    bsz, _, c = x_btc.shape
    if history_bkc is None:
        history_bkc = jnp.zeros((bsz, k - 1, c), x_btc.dtype)
    if b_c is None:
        b_c = jnp.zeros((c,), w_kc.dtype)
    if segment_ids_bt is not None:  # equal run ids <=> same contiguous document ([0, 1, 0] is three)
        segment_ids_bt = segment_runs(segment_ids_bt)
    if custom_vjp is None:
        custom_vjp = jnp.dtype(x_btc.dtype) != jnp.float32
    if custom_vjp:
        return _conv(x_btc, w_kc, b_c, history_bkc, segment_ids_bt)
    return _forward(x_btc, w_kc, b_c, history_bkc, _tap_masks(segment_ids_bt, k))


def causal_conv1d_reference(x_btc, w_kc, b_c, segment_ids_bt=None, history_bkc=None):
    """The same conv by `jax.lax.conv_general_dilated` (one group per channel), differentiated by autodiff: the
    oracle for `causal_conv1d`'s values and VJP. With segments an output whose document began r tokens back
    (r < k-1) sees only its last r+1 taps: one conv per r with the earlier taps' weights zeroed, selected per
    output."""
    k = w_kc.shape[0]
    bsz, t, c = x_btc.shape
    if history_bkc is None:
        history_bkc = jnp.zeros((bsz, k - 1, c), x_btc.dtype)
    xp = jnp.concatenate([history_bkc.astype(x_btc.dtype), x_btc], axis=1).astype(f32)

    def conv(w):
        return jax.lax.conv_general_dilated(xp, w.astype(f32)[:, None, :], (1,), "VALID",
                                            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=c,
                                            precision=jax.lax.Precision.HIGHEST)

    y = conv(w_kc)
    if segment_ids_bt is not None:
        seg_p = jnp.concatenate([jnp.full((bsz, k - 1), -1, segment_ids_bt.dtype), segment_ids_bt], axis=1)
        same = jnp.stack([seg_p[:, j:j + t] == segment_ids_bt for j in range(k - 1)], -1)  # [b, t, k-1]
        reach = jnp.sum(jnp.cumprod(same[..., ::-1].astype(jnp.int32), axis=-1), axis=-1)  # same-doc run back
        for r in range(k - 1):
            y_r = conv(jnp.where((jnp.arange(k) >= k - 1 - r)[:, None], w_kc, 0))
            y = jnp.where((reach == r)[..., None], y_r, y)
    if b_c is not None:
        y = y + b_c.astype(f32)
    return y.astype(x_btc.dtype)
