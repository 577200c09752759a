"""The quantized GEMMs a linear can be built with (the precision policy picks one per linear at build time).

`QuantMatmul` (NVFP4 recipe or MXFP8) replaces x @ W; `QuantRaggedDot` (NVFP4) replaces the routed experts'
grouped GEMM. Both are frozen dataclasses: static, hashable parts of the module graph. Stochastic rounding
takes the step's key as an explicit argument; each GEMM folds in a hash of its own name, so every linear draws
different bits, and a grouped GEMM running on one token shard of a mesh also folds in that shard's index.

Shapes that are not multiples of the block (16 for NVFP4, 32 for MXFP8) are zero-padded: zeros change neither
a block's amax nor a dot product, so padding gives the values an unpadded quantizer would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nemotron_jax.quant.recipe import NVFP4Recipe, mxfp8_matmul, nvfp4_matmul, nvfp4_ragged_dot, quantizer_key

__all__ = ["QuantMatmul", "QuantRaggedDot"]


def _pad_to(a: jax.Array, axis: int, mult: int) -> jax.Array:
    r = (-a.shape[axis]) % mult
    if r == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, r)
    return jnp.pad(a, widths)


@dataclasses.dataclass(frozen=True)
class QuantMatmul:
    """matmul(x [..., K], w [K, N], key) in `fmt` ("nvfp4" or "mxfp8"); `name` keys its rounding bits."""

    fmt: str
    name: str
    recipe: NVFP4Recipe = NVFP4Recipe()

    def __call__(self, x: jax.Array, w: jax.Array, key: jax.Array | None = None) -> jax.Array:
        n = w.shape[1]
        # NVFP4 blocks are 16 wide; MXFP8 blocks 32 along K (fprop) and along N (dgrad).
        mult = 16 if self.fmt == "nvfp4" else 32
        xp, wp = _pad_to(x, -1, mult), _pad_to(_pad_to(w, 0, mult), 1, mult)
        if self.fmt == "nvfp4":
            y = nvfp4_matmul(xp, wp, None if key is None else quantizer_key(key, self.name), self.recipe)
        elif self.fmt == "mxfp8":
            y = mxfp8_matmul(xp, wp)
        else:
            raise ValueError(f"QuantMatmul: unknown format {self.fmt!r}")
        return y[..., :n]


@dataclasses.dataclass(frozen=True)
class QuantRaggedDot:
    """ragged_dot(x [M, K], w [G, K, N], group_sizes [G], state=key, shard=i) with the NVFP4 recipe (16x16
    expert tiles). `state` is the step key; `shard` (inside an expert-parallel shard_map) the token shard's
    index, folded in so shards holding different tokens draw different bits."""

    name: str
    recipe: NVFP4Recipe = NVFP4Recipe()
    fmt: str = "nvfp4"

    def __call__(self, x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, state: jax.Array | None = None,
                 shard: jax.Array | None = None) -> jax.Array:
        n = w.shape[-1]
        xp, wp = _pad_to(x, -1, 16), _pad_to(_pad_to(w, 1, 16), 2, 16)
        key = state
        if key is not None and shard is not None:
            key = jax.random.fold_in(key, shard)
        key = None if key is None else quantizer_key(key, self.name)
        return nvfp4_ragged_dot(xp, wp, group_sizes, key, self.recipe)[..., :n]
