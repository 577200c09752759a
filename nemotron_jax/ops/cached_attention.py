"""Causal GQA attention of new queries against a KV cache, in key blocks with an online softmax.

    o_btnh = cached_attention(q_btnh, k_bskh, v_bskh, q_pos_bt, block=256)

Query i of row b sits at position q_pos[b, i] and sees cache keys 0..q_pos[b, i]. Keys are visited in blocks of
`block`, only up to the furthest query position of the batch (a dynamic trip count), so a decode step costs
what the cache holds, not its capacity, and a long-prompt slice never builds a [T, max_len] score matrix.
Inference only (no gradient path is needed). Scores and the softmax run in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cached_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, q_pos_bt: jax.Array, *,
                     block: int = 256) -> jax.Array:
    b, t, nh, hd = q_btnh.shape
    s, kvh = k_bskh.shape[1], k_bskh.shape[2]
    block = min(block, s)
    if s % block:
        raise ValueError(f"cache length {s} must be a multiple of the key block {block}")
    rep = nh // kvh
    q = q_btnh.astype(jnp.float32).reshape(b, t, kvh, rep, hd) * (hd ** -0.5)
    n_blocks = (jnp.max(q_pos_bt) + block) // block  # blocks holding any key a query can see

    def body(j, carry):
        m, l, acc = carry  # [b, kvh, rep, t], same, [b, kvh, rep, t, hd]
        k = jax.lax.dynamic_slice_in_dim(k_bskh, j * block, block, axis=1).astype(jnp.float32)
        v = jax.lax.dynamic_slice_in_dim(v_bskh, j * block, block, axis=1).astype(jnp.float32)
        sc = jnp.einsum("btgrd,bsgd->bgrts", q, k)
        k_pos = j * block + jnp.arange(block)
        visible = k_pos[None, None, :] <= q_pos_bt[:, :, None]  # [b, t, s]
        sc = jnp.where(visible[:, None, None], sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.exp(sc - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l_new = l * corr + jnp.sum(p, axis=-1)
        acc_new = acc * corr[..., None] + jnp.einsum("bgrts,bsgd->bgrtd", p, v)
        return m_new, l_new, acc_new

    # m starts at a finite floor: every query sees key 0, so the first block makes m finite and corr exact.
    init = (jnp.full((b, kvh, rep, t), -1e30, jnp.float32), jnp.zeros((b, kvh, rep, t), jnp.float32),
            jnp.zeros((b, kvh, rep, t, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o = acc / l[..., None]  # [b, kvh, rep, t, hd]
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, nh, hd).astype(q_btnh.dtype)


def write_kv(cache_bskh: jax.Array, new_btkh: jax.Array, start_b: jax.Array) -> jax.Array:
    """Write each row's T new entries at positions start[b]..start[b]+T-1 (the caller keeps them in range)."""
    def one(c, n, s):
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0)
    return jax.vmap(one)(cache_bskh, new_btkh, start_b)
