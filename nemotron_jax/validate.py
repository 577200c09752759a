"""Checks on what a caller hands the model: token arrays, before anything is compiled.

Every public entry point that takes token ids (`NemotronModel.forward` / `__call__` / `extend`, `model.apply`,
`inference.engine.prefill` / `generate`) runs `check_tokens` first. It refuses, with one `InputError` naming
the argument, the offending values and the vocabulary size:

- anything that is not a 2-D `[batch, seq]` array of integers: a float or bool array, a ragged list, a 1-D or
  3-D array. Python lists and tuples of ints are accepted and converted with `np.asarray` (then checked like an
  array), so `model([[1, 2, 3]])` works;
- an empty batch or a zero-length sequence (shape `(0, t)` or `(b, 0)`);
- token ids outside `[0, vocab_size)`, when the values are concrete (numpy, Python, or a committed jax.Array).

Inside a jitted function the values are tracers and cannot be read: only the shape and dtype are checked.
Unchecked there, an id >= vocab_size makes the embedding lookup (`jnp.take`, out-of-bounds mode "fill") return
NaN, and the logits of that row come out NaN (the chunked Mamba scan spreads it over the chunk, in practice the
whole row; other rows are unaffected); a negative id -V <= i < 0 silently reads row V + i.
For a checked jitted call use `nemotron_jax.model.checked_apply` (or `apply(..., checked=True)` under
`jax.experimental.checkify.checkify`): the range check is compiled in and `err.throw()` raises after the call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

MAX_REPORTED = 5  # offending ids listed in a message


class InputError(ValueError):
    """Bad input to a public entry point (token ids, batch shape, lengths); the message names the argument."""


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def as_token_array(tokens: Any, *, name: str = "tokens", ndim: int = 2, layout: str = "[batch, seq]"):
    """`tokens` as an integer array of `ndim` dims with no empty axis; shape and dtype checks only.

    Lists and tuples are converted with `np.asarray`; jax arrays and tracers are returned as they are.
    """
    if isinstance(tokens, (list, tuple)):
        try:
            arr = np.asarray(tokens)
        except ValueError as e:  # ragged nested lists
            raise InputError(f"{name}: a ragged list cannot be a {layout} token array ({e}); pad the rows to one "
                             f"length, or pass prompts of different lengths to nemotron_jax.generate") from None
        if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([[]]) is float64: report it as empty, not float
            arr = arr.astype(np.int32)
        tokens = arr
    elif not isinstance(tokens, (np.ndarray, jax.Array)) and not is_tracer(tokens):
        raise InputError(f"{name} must be a {layout} array of integer token ids (numpy, jax, or a list of lists "
                         f"of ints); got {type(tokens).__name__}")
    shape, dtype = tuple(tokens.shape), tokens.dtype
    if len(shape) != ndim:
        hint = "; add a batch axis, e.g. ids[None, :]" if len(shape) == ndim - 1 else ""
        raise InputError(f"{name} must be {layout} integer token ids, got shape {shape}{hint}")
    if not (jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_):
        raise InputError(f"{name} must hold integer token ids, got dtype {dtype}; floats and bools are refused "
                         f"(cast with .astype(int32) if the values are whole token ids)")
    if 0 in shape:
        raise InputError(f"{name} is empty: shape {shape}; every {layout} batch needs at least one row and one "
                         f"token per row")
    return tokens


def token_range_error(tokens: Any, vocab_size: int, *, name: str = "tokens") -> str | None:
    """The message for ids outside [0, vocab_size) in concrete `tokens`, or None when all are in range.

    Tracers (inside jit) cannot be read: None. A jax.Array that is not fully addressable (a global array of a
    multi-process run) is checked on device and the message gives the count only.
    """
    if is_tracer(tokens):
        return None
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        n = int(_count_out_of_range(tokens, vocab_size))
        return (f"{name}: {n} token id(s) outside the vocabulary [0, {vocab_size}) (vocab_size={vocab_size})"
                if n else None)
    arr = np.asarray(tokens)
    bad = (arr < 0) | (arr >= vocab_size)
    if not bad.any():
        return None
    where = np.argwhere(bad)
    shown = ", ".join(f"{int(arr[tuple(p)])} at {tuple(int(i) for i in p)}" for p in where[:MAX_REPORTED])
    more = f" (and {len(where) - MAX_REPORTED} more)" if len(where) > MAX_REPORTED else ""
    return (f"{name}: {len(where)} token id(s) outside the vocabulary [0, {vocab_size}) (vocab_size={vocab_size}): "
            f"{shown}{more}")


@jax.jit
def _count_out_of_range(tokens, vocab_size):
    return jnp.sum((tokens < 0) | (tokens >= vocab_size))


def check_tokens(tokens: Any, vocab_size: int, *, name: str = "tokens", ndim: int = 2,
                 layout: str = "[batch, seq]"):
    """`as_token_array` and, for concrete values, the range check; returns the (converted) array.

    Raises InputError (a ValueError). Inside jit only shape and dtype are checked (see the module docstring).
    """
    tokens = as_token_array(tokens, name=name, ndim=ndim, layout=layout)
    msg = token_range_error(tokens, vocab_size, name=name)
    if msg is not None:
        raise InputError(msg)
    return tokens


def checkify_tokens(tokens: jax.Array, vocab_size: int, *, name: str = "tokens") -> None:
    """The range check as a `checkify.check`, for traced tokens: call it under `checkify.checkify`."""
    flat = jnp.reshape(jnp.asarray(tokens), (-1,))
    bad = (flat < 0) | (flat >= vocab_size)
    i = jnp.argmax(bad)
    checkify.check(~jnp.any(bad),
                   f"{name}: {{n}} token id(s) outside the vocabulary [0, {vocab_size}) (vocab_size={vocab_size}); "
                   f"the first is {{value}} at flat index {{index}} of shape {tuple(tokens.shape)}",
                   n=jnp.sum(bad), value=jnp.take(flat, i), index=i)


def check_segment_ids(segment_ids: Any, tokens_shape: tuple[int, ...], *, name: str = "segment_ids"):
    """None, or an integer array of the tokens' shape (lists are converted)."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (list, tuple)):
        segment_ids = np.asarray(segment_ids)
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise InputError(f"{name} must be an integer array of the tokens' shape {tuple(tokens_shape)}; "
                         f"got {type(segment_ids).__name__}")
    if tuple(segment_ids.shape) != tuple(tokens_shape):
        raise InputError(f"{name} must have the tokens' shape {tuple(tokens_shape)}, got {tuple(segment_ids.shape)}")
    if not (jnp.issubdtype(segment_ids.dtype, jnp.integer) and segment_ids.dtype != jnp.bool_):
        raise InputError(f"{name} must hold integers (one id per packed document), got dtype {segment_ids.dtype}")
    return segment_ids
