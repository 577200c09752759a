"""Quantization diagnostics per tensor: flush-to-zero fraction and relative error.

ftz:     fraction of the non-zero entries whose quantized value is exactly zero (why Mamba out_proj moved to
         MXFP8: up to 40% FTZ under NVFP4 on Nano, spec section 4).
rel_err: ||qdq(x) - x|| / ||x||  (0 for an all-zero tensor).
Both computed in fp32 on the array as given (for 1x16 along its last axis, 16x16 over its last two axes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.quant import mxfp8, nvfp4


def _qdq(x, fmt, block):
    if fmt == "nvfp4":
        return nvfp4.qdq(x, block=block)
    if fmt == "mxfp8":
        return mxfp8.qdq(x)
    raise ValueError(f"fmt={fmt!r}: use 'nvfp4' or 'mxfp8'")


def supported(x, fmt: str = "nvfp4", block=(1, 16)) -> bool:
    if fmt == "mxfp8":
        return x.ndim >= 1 and x.shape[-1] % mxfp8.MX_BLOCK == 0
    n = 1 if tuple(block) == (1, 16) else 2
    return x.ndim >= n and all(s % 16 == 0 for s in x.shape[-n:])


def quant_stats(x: jax.Array, *, fmt: str = "nvfp4", block=(1, 16)) -> dict[str, float]:
    """{"ftz": ..., "rel_err": ...} for one array (raises for shapes the format cannot block)."""
    x = jnp.asarray(x, jnp.float32)
    xq = _qdq(x, fmt, tuple(block))
    ftz = nvfp4.flush_to_zero_fraction(x, xq)
    norm = jnp.linalg.norm(x.ravel())
    rel = jnp.where(norm > 0, jnp.linalg.norm((xq - x).ravel()) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return {"ftz": float(ftz), "rel_err": float(rel)}


def tree_quant_stats(tree, *, fmt: str = "nvfp4", block=(1, 16)) -> dict[str, dict[str, float]]:
    """Stats for every leaf of a param pytree that the format can block (others are skipped), keyed by the
    leaf's path string ("/"-joined keys)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = getattr(leaf, "value", leaf)
        if not hasattr(arr, "shape") or not supported(arr, fmt, block):
            continue
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[name] = quant_stats(arr, fmt=fmt, block=block)
    return out


def format_stats(stats: dict[str, dict[str, float]]) -> str:
    w = max([len(k) for k in stats] + [6])
    lines = [f"{'tensor':<{w}}  {'ftz':>8}  {'rel_err':>8}"]
    lines += [f"{k:<{w}}  {v['ftz']:8.4f}  {v['rel_err']:8.4f}" for k, v in stats.items()]
    return "\n".join(lines)


def weight_ftz_fraction(params, fmt: str = "nvfp4") -> float:
    """Mean flush-to-zero fraction of the weights whose GEMMs run in `fmt`, selected by their `quant` metadata
    (set where the linear is built), quantized as the forward pass does: 16x16 tiles over the last two axes.
    Zero padding to whole tiles adds no non-zero values, so it changes nothing. 0.0 when there are none."""
    from flax import nnx  # noqa: PLC0415

    fr = []
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if not isinstance(v, nnx.Variable) or v.get_metadata().get("quant") != fmt:
            continue
        x = jnp.asarray(v.get_value())
        pad = [(0, 0)] * (x.ndim - 2) + [(0, (-s) % 16) for s in x.shape[-2:]]
        fr.append(quant_stats(jnp.pad(x, pad), fmt="nvfp4", block=(16, 16))["ftz"])
    return sum(fr) / len(fr) if fr else 0.0
