"""A float64 numpy attention oracle for the attention tests."""

import numpy as np


def softmax_reference(q, k, v, seg=None):
    """Explicit numpy attention: query head n reads KV head n // (N/K); causal; same-document only."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    kv = k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            ki = ni // (n // kv)
            s = q[bi, :, ni] @ k[bi, :, ki].T / np.sqrt(h)
            allowed = np.tril(np.ones((t, t), bool))
            if seg is not None:
                allowed &= np.asarray(seg)[bi][:, None] == np.asarray(seg)[bi][None, :]
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, ni] = p @ v[bi, :, ki]
    return out
