"""Mamba-2 SSD (state-space duality) scan: the public op and its dispatch.

    y, state = ssd(x, dt, A, B, C, chunk_size=128, initial_state=S0,
                   return_final_state=True, segment_ids=seg, impl="auto")

Shapes: x [b, t, h, p]; dt [b, t, h] (already softplus'd and clamped); A [h] (negative);
B, C [b, t, g, n] with head i reading group i // (h // g); initial_state [b, h, p, n];
segment_ids [b, t] int. Returns y [b, t, h, p] in x's dtype, plus the final state
[b, h, p, n] fp32 when ``return_final_state`` (then the result is the tuple (y, state)).

Recurrence per head (S is [p, n]), computed in fp32:

    S_t = exp(dt_t * A) * S_{t-1} + (dt_t * x_t) B_t^T        y_t = S_t C_t

There is no D skip here: the mixer adds ``D * x`` itself.

Packed documents: at a token whose segment id differs from the previous token's, the state is
reset to zero before that token's update; ``initial_state`` belongs to the segment at t=0.

Implementations (``impl``):
  "reference"  token-by-token ``lax.scan``: the oracle (O(T) sequential steps).
  "chunked"    four-step chunked algorithm in jnp (`ssd_chunked.py`): runs everywhere.
  "pallas"     Pallas kernel forward + chunked-jnp backward (`pallas_kernels/ssd.py`): the Mosaic
               GPU kernel where it applies (p = 64, n in {64, 128}, bf16/f16), else the portable
               kernel; raises ValueError when neither supports these shapes/dtype. ``interpret``
               defaults to True off GPU, so it runs (slowly) on CPU.
  "auto"       the Mosaic GPU kernel on a GPU where it applies, "chunked" everywhere else; never
               fails on unsupported shapes (and never picks the portable kernel, whose GPU
               lowering goes through the deprecated Triton backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.config import SSD_IMPLS as IMPLS  # one list for the op and the config
from nemotron_jax.ops.ssd_chunked import segment_runs, ssd_chunked, ssd_reference

__all__ = ["ssd", "IMPLS", "ssd_reference", "ssd_chunked", "segment_runs"]


def _shape(a) -> tuple[int, ...]:
    return tuple(jnp.shape(a))


def _validate(x, dt, A, B, C, chunk_size, initial_state, segment_ids, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (e.g. 128); got {chunk_size!r}")
    if len(_shape(x)) != 4:
        raise ValueError(f"x must be [b, t, h, p]; got shape {_shape(x)}")
    b, t, h, p = _shape(x)
    if _shape(dt) != (b, t, h):
        raise ValueError(f"dt must be [b, t, h] = {(b, t, h)} to match x; got shape {_shape(dt)}")
    if _shape(A) != (h,):
        raise ValueError(f"A must be [h] = {(h,)} (one value per head); got shape {_shape(A)}")
    if len(_shape(B)) != 4 or _shape(B)[:2] != (b, t):
        raise ValueError(f"B must be [b, t, g, n] with b, t = {(b, t)} from x; got shape {_shape(B)}")
    g, n = _shape(B)[2:]
    if _shape(C) != _shape(B):
        raise ValueError(f"C must have B's shape {_shape(B)}; got shape {_shape(C)}")
    if g < 1 or h % g:
        raise ValueError(f"B: the {h} heads of x must be divisible by the {g} groups of B/C "
                         f"(head i uses group i // (h / g))")
    if initial_state is not None and _shape(initial_state) != (b, h, p, n):
        raise ValueError(f"initial_state must be [b, h, p, n] = {(b, h, p, n)}; "
                         f"got shape {_shape(initial_state)}")
    if segment_ids is not None:
        if _shape(segment_ids) != (b, t):
            raise ValueError(f"segment_ids must be [b, t] = {(b, t)}; got shape {_shape(segment_ids)}")
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(f"segment_ids must be an integer array; got dtype {jnp.result_type(segment_ids)}")


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def ssd(x, dt, A, B, C, *, chunk_size: int, initial_state=None, return_final_state: bool = False,
        segment_ids=None, impl: str = "chunked", interpret: bool | None = None):
    """SSD scan; see the module docstring for shapes, semantics and ``impl``.

    ``interpret`` only affects the Pallas kernel (None: True unless running on GPU).
    """
    _validate(x, dt, A, B, C, chunk_size, initial_state, segment_ids, impl)
    run_ids = None if segment_ids is None else segment_runs(segment_ids)

    if impl == "auto":
        from pallas_kernels import ssd as kernel
        usable = _on_gpu() and kernel.backend_for(_shape(x), _shape(B), chunk_size=chunk_size,
                                                  dtype=jnp.result_type(x, B, C)) == "mosaic_gpu"
        impl = "pallas" if usable else "chunked"

    if impl == "reference":
        y, state = ssd_reference(x, dt, A, B, C, initial_state, run_ids)
    elif impl == "chunked":
        y, state = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, run_ids)
    else:  # "pallas"
        from pallas_kernels import ssd as kernel
        if not kernel.supports(_shape(x), _shape(B), chunk_size=chunk_size, dtype=jnp.result_type(x, B, C)):
            raise ValueError(
                f"impl='pallas': the kernel does not support x {_shape(x)}, B {_shape(B)}, "
                f"chunk_size={chunk_size}, dtype {jnp.result_type(x, B, C)} ({kernel.SUPPORTED}); "
                f"use impl='auto' to fall back to the chunked op")
        y, state = kernel.ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state,
                                     run_ids=run_ids, interpret=interpret, reference=ssd_chunked)
    return (y, state) if return_final_state else y
