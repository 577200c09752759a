"""Next-token and MTP losses with document-aware masks, and the total training loss (spec section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.config import ModelConfig


def shifted_targets(tokens_bt: jax.Array, offset: int, segment_ids_bt: jax.Array | None = None,
                    loss_mask_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """labels[i] = tokens[i + offset], valid where i + offset < T, inside the same document and unmasked.

    offset=1 is the main next-token target; MTP depth k uses offset k + 1 (labels rolled one more per depth).
    """
    b, t = tokens_bt.shape
    pad = jnp.zeros((b, offset), tokens_bt.dtype)
    labels = jnp.concatenate([tokens_bt[:, offset:], pad], axis=1)
    valid = jnp.arange(t)[None, :] < t - offset
    valid = jnp.broadcast_to(valid, (b, t))
    if segment_ids_bt is not None:
        seg_next = jnp.concatenate([segment_ids_bt[:, offset:], jnp.full((b, offset), -1, segment_ids_bt.dtype)], 1)
        valid = valid & (seg_next == segment_ids_bt)
    if loss_mask_bt is not None:
        m_next = jnp.concatenate([loss_mask_bt[:, offset:], jnp.zeros((b, offset), loss_mask_bt.dtype)], 1)
        valid = valid & m_next.astype(bool)
    return labels, valid


def cross_entropy(logits_btv: jax.Array, labels_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Mean token cross-entropy over valid positions (0 when none are valid), in fp32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels_bt[..., None], axis=-1)[..., 0]
    m = mask_bt.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def total_loss(cfg: ModelConfig, out, tokens_bt: jax.Array, segment_ids_bt: jax.Array | None = None,
               loss_mask_bt: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """L_main + (lambda / D) * sum_k L_k + sum of the MoE sequence aux losses; returns (loss, metrics)."""
    labels, valid = shifted_targets(tokens_bt, 1, segment_ids_bt, loss_mask_bt)
    main = cross_entropy(out.logits, labels, valid)
    metrics = {"loss_main": main}
    loss = main
    if out.mtp_logits:
        mtp_losses = []
        for k, logits_k in enumerate(out.mtp_logits, start=1):
            lab_k, val_k = shifted_targets(tokens_bt, k + 1, segment_ids_bt, loss_mask_bt)
            l_k = cross_entropy(logits_k, lab_k, val_k)
            metrics[f"loss_mtp_{k}"] = l_k
            mtp_losses.append(l_k)
        loss = loss + cfg.mtp_loss_scaling_factor / len(mtp_losses) * sum(mtp_losses)
    aux = [a["aux_loss"] for a in (*out.moe_aux, *out.mtp_moe_aux)]
    if aux:
        metrics["aux_loss"] = sum(aux)
        loss = loss + metrics["aux_loss"]
    metrics["loss"] = loss
    return loss, metrics
