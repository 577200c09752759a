"""The stochastic-rounding key of the current step, as a context: quantized GEMMs read it while tracing.

`NemotronModel.forward(..., quant_key=key)` opens the scope; each quantized GEMM folds in a hash of
its own path (`quant.recipe.quantizer_key`). A `shard_map` body cannot close over the key (jax
refuses closed-over arrays on explicit mesh axes), so code that opens one passes the key in as an
argument and re-opens the scope inside with `shard_quant_key_scope`, which also folds in the
shard's index along the axes the tokens are split over: shards holding different tokens then draw
different bits.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax

_QUANT_KEY: contextvars.ContextVar = contextvars.ContextVar("nemotron_quant_key", default=None)


def current_quant_key() -> jax.Array | None:
    return _QUANT_KEY.get()


@contextlib.contextmanager
def quant_key_scope(key: jax.Array | None) -> Iterator[None]:
    token = _QUANT_KEY.set(key)
    try:
        yield
    finally:
        _QUANT_KEY.reset(token)


@contextlib.contextmanager
def shard_quant_key_scope(key: jax.Array | None, axis_names: Sequence[str]) -> Iterator[None]:
    """Inside a shard_map body: ``key`` (passed in as a replicated argument) folded with this
    shard's linear index over ``axis_names`` (the axes its data is split over); None stays None."""
    if key is not None and axis_names:
        key = jax.random.fold_in(key, jax.lax.axis_index(tuple(axis_names)))
    with quant_key_scope(key):
        yield
