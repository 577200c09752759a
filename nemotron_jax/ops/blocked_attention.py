"""Causal GQA attention for the CPU that never computes the logits of future keys.

The XLA attention (tokamax's "xla" implementation) builds the full [t, t] logits per head and masks the upper
triangle: half its GEMM work and memory is thrown away. Here the queries go in blocks of `block` rows and
query block i multiplies only the keys up to its own last row, so the work is (nb + 1) / (2 nb) of the full
square for nb blocks; queries sharing a KV head are one GEMM against it (no repeated K/V copy). Each block's
softmax covers every key its rows may see, so the result is exact (not an online-softmax approximation).
Differentiated by autodiff (jax.nn.softmax's own VJP). Measured forward + backward on this CPU at the bench
model's heads (8 query / 2 KV heads x 64, benchmarks/attention.py): 1.1-1.35x tokamax's XLA attention at T
512-1k, 1.4-1.7x at 2k-4k with 2.2-2.7x less scratch memory. GPUs and TPUs keep tokamax's flash kernels
(`layers.attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128  # query rows per block: measured best of 64 / 128 / 256 / 512 from T 512 to 4k (fp32 and bf16)
MAX_BLOCKS = 32  # the blocks are unrolled (each has its own key length): compile time grows with their number


def default_block(t: int) -> int:
    """BLOCK rows, or more where T would need over MAX_BLOCKS blocks. Measured at T 4k, forward + backward: 32
    blocks of 128 compile in 5.9 s and run 1.5-1.7x tokamax; 16 blocks of 256 compile in 2.9 s and run 1.3-1.6x;
    tokamax compiles in under 1 s. A train step compiles once, so 4k keeps the faster 128-row blocks."""
    return max(BLOCK, -(-t // MAX_BLOCKS))


def supports(t: int) -> bool:
    """Whether blocking saves anything: at least two query blocks (one block is plain full attention)."""
    return t > default_block(t)


def blocked_causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                             segment_ids_bt: jax.Array | None = None, *, block: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(h), causal, same segment id only) v; q [b, t, n, h], k/v [b, t, kv, h] with n a
    multiple of kv (query head i reads KV head i // (n / kv)), segment_ids [b, t] or None. Logits and softmax in
    fp32, the probabilities cast to v's dtype for the second GEMM (as HF's eager attention); returns q's dtype.
    `block`: query rows per block (default `default_block(t)`). The diagonal is always visible, so no row is
    fully masked."""
    b, t, n, h = q_btnh.shape
    kv = k_btkh.shape[2]
    if k_btkh.shape != (b, t, kv, h) or v_btkh.shape != k_btkh.shape or n % kv:
        raise ValueError(f"blocked_causal_attention: q {q_btnh.shape}, k {k_btkh.shape}, v {v_btkh.shape}: "
                         "want k and v [b, t, kv, h] with kv dividing q's heads")
    block = default_block(t) if block is None else block
    if block < 1:
        raise ValueError(f"blocked_causal_attention: block must be >= 1, got {block}")
    q_btgrh = q_btnh.reshape(b, t, kv, n // kv, h)
    scale = h ** -0.5
    low = jnp.finfo(jnp.float32).min  # not -inf: a masked logit must not turn a max into -inf - -inf
    outs = []
    for s in range(0, t, block):
        e = min(t, s + block)  # queries [s, e) see keys [0, e)
        logits = jnp.einsum("bqgrh,bkgh->bgrqk", q_btgrh[:, s:e], k_btkh[:, :e],
                            preferred_element_type=jnp.float32) * scale
        allowed = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]  # [q, k]
        if segment_ids_bt is not None:
            same = segment_ids_bt[:, s:e, None] == segment_ids_bt[:, None, :e]  # [b, q, k]
            allowed = (allowed & same)[:, None, None]
        p = jax.nn.softmax(jnp.where(allowed, logits, low), axis=-1)
        o = jnp.einsum("bgrqk,bkgh->bqgrh", p.astype(v_btkh.dtype), v_btkh[:, :e],
                       preferred_element_type=jnp.float32)
        outs.append(o.astype(q_btnh.dtype))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)
