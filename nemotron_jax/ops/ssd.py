"""Mamba-2 SSD (state-space duality) scan: the public op, its registry, dispatch and custom VJP.

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

Implementations (``impl``; the names are `IMPLS`, which ``ModelConfig.ssd_impl`` is checked against):
  "reference"  token-by-token ``lax.scan``: the oracle (O(T) sequential steps).
  "chunked"    four-step chunked algorithm in jnp (`ssd_chunked.py`): runs everywhere. On CPU in chunks of at
               most `CPU_CHUNK` tokens whatever ``chunk_size`` says (`chunked_size`).
  "pallas"     a Pallas kernel forward + the chunked op's backward: the first of `BACKENDS` that
               supports the call (the Mosaic GPU kernel where it applies: p = 64, n in {64, 128},
               bf16/f16; else the portable kernel); raises ValueError when neither does.
               ``interpret`` defaults to True off GPU, so it runs (slowly) on CPU.
  "auto"       the Mosaic GPU kernel on a GPU where it applies, "chunked" everywhere else; never
               fails on unsupported shapes (and never picks the portable kernel, whose GPU
               lowering goes through the deprecated Triton backend).

Layout (as tokamax's ops): this file is the API, the registry (`IMPLS`, `BACKENDS`), the dispatch
and the custom VJP; `ssd_chunked.py` holds the jnp reference and chunked op; the kernels are leaves,
one file per backend, each with ``supports(x_shape, B_shape, chunk_size, dtype)`` and
``forward(x, dt, A, B, C, s0, run_ids, *, chunk_size, interpret, **options)``. The dispatch asks each
kernel's ``supports`` at most once per call and the kernels do not check again; whether to interpret
is decided here (`nemotron_jax.platform`), never inside a kernel.

Kernel backends (`BACKENDS`, in the order "pallas" tries them):
  "mosaic_gpu"  `pallas_kernels/ssd_mosaic.py`: the JAX-recommended GPU backend (wgmma, TMA,
                barriers); covers the Nemotron 3 shapes. Off GPU it runs under Mosaic GPU's CPU
                interpreter, which the tests use (with its race detector on) against the oracle;
                its lowering is checked by cross-lowering for CUDA without a GPU.
  "portable"    `pallas_kernels/ssd.py`: the portable Pallas surface; every dtype (fp32 included)
                and power-of-two tiles; on a GPU it lowers through Pallas' Triton backend.
Until ``benchmarks/gpu_ssd.py`` has been run on a GPU, neither kernel has been compiled to PTX: the
model's default stays the chunked op.

Backward (both kernels): ``jax.custom_vjp`` whose backward is ``jax.vjp`` of the chunked op,
recomputing its forward from the saved inputs. Chosen over a Pallas backward because (a) it is
exact by construction (the chunked op is tested against the oracle, including gradients), (b) it
is XLA-fused O(T) work, and (c) a hand-written backward (dx, dB, dC, ddt, dA via reverse state
pass) is a large kernel whose GPU lowering could not be tested here. Cost: training recomputes the
forward once in XLA. A Pallas backward is the natural next step once a GPU can validate it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nemotron_jax import platform
from nemotron_jax.ops.ssd_chunked import segment_runs, ssd_chunked, ssd_reference
from pallas_kernels import ssd as ssd_portable
from pallas_kernels import ssd_mosaic

__all__ = ["ssd", "ssd_pallas", "backend_for", "IMPLS", "BACKENDS", "ssd_reference", "ssd_chunked",
           "segment_runs"]

# The names ssd(impl=...) takes. config.py checks ModelConfig.ssd_impl against this tuple (importing it
# inside its validation), so the list lives here, beside the dispatch that gives each name a meaning.
IMPLS = ("reference", "chunked", "pallas", "auto")

# The kernels, in the order impl="pallas" tries them (see the module docstring for their interface).
BACKENDS = {"mosaic_gpu": ssd_mosaic, "portable": ssd_portable}

# The chunked op's chunk on CPU. The chunk is the algorithm's block size, not part of the model: any chunk
# computes the same SSD (the result moves by fp32 rounding only). Half the [L, L] intra-chunk work for the same
# state work; measured at the bench layer (b 4, T 512, 16 heads x 64, state 64), forward + backward: chunk 64
# 25.8 ms against 32.8 for 128 and 33.6 for 32; 17% faster than 128 at T 2048, as fast at T 8192 (where both
# scan over chunks); the bench model's forward + backward 2.7% faster in fp32, 1.4% in bf16 (docs/benchmarks.md).
CPU_CHUNK = 64


def chunked_size(chunk_size: int) -> int:
    """The chunk the chunked op computes with for a model's ``chunk_size``: at most CPU_CHUNK on CPU."""
    return min(chunk_size, CPU_CHUNK) if platform.on_cpu() else chunk_size


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


def backend_for(x_shape, B_shape, *, chunk_size: int, dtype) -> str | None:
    """The first of `BACKENDS` whose kernel supports x [b,t,h,p], B/C [b,t,g,n], ``chunk_size`` and
    ``dtype`` (asking each at most once), else None."""
    return next((name for name, kernel in BACKENDS.items()
                 if kernel.supports(x_shape, B_shape, chunk_size, dtype)), None)


def _choose(name: str, x_shape, B_shape, chunk_size: int, dtype) -> str:
    """What runs for ``name`` (one of IMPLS, or a backend of BACKENDS): "reference", "chunked" or a
    backend. Asks each kernel's ``supports`` at most once. Fail-closed: "pallas" or a named backend
    that cannot take these shapes raises ValueError; only "auto" falls back."""
    if name in ("reference", "chunked"):
        return name
    if name == "auto":
        # never the portable kernel: on a GPU it lowers through Pallas' deprecated Triton backend
        usable = platform.on_gpu() and ssd_mosaic.supports(x_shape, B_shape, chunk_size, dtype)
        return "mosaic_gpu" if usable else "chunked"
    if name == "pallas":
        chosen, tried = backend_for(x_shape, B_shape, chunk_size=chunk_size, dtype=dtype), tuple(BACKENDS)
        what = "impl='pallas': no SSD kernel supports"
    else:
        ok = BACKENDS[name].supports(x_shape, B_shape, chunk_size, dtype)
        chosen, tried = (name if ok else None), (name,)
        what = f"SSD kernel {name!r} does not support"
    if chosen is None:
        supported = "; ".join(f"{b}: {BACKENDS[b].SUPPORTED}" for b in tried)
        raise ValueError(f"{what} x {tuple(x_shape)}, B {tuple(B_shape)}, chunk_size={chunk_size}, "
                         f"dtype {jnp.dtype(dtype)} ({supported}); use impl='auto' to fall back to the chunked op")
    return chosen


class _Launch(NamedTuple):
    """A kernel call's static part (hashable: the custom VJP's non-differentiable argument)."""
    backend: str                 # a key of BACKENDS
    chunk_size: int
    interpret: object            # bool, or a plgpu.InterpretGPUParams for "mosaic_gpu"
    options: tuple = ()          # the kernel's own launch options, as sorted (name, value) pairs


def _forward(launch: _Launch, x, dt, A, B, C, s0, run_ids):
    return BACKENDS[launch.backend].forward(x, dt, A, B, C, s0, run_ids, chunk_size=launch.chunk_size,
                                            interpret=launch.interpret, **dict(launch.options))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_op(launch, x, dt, A, B, C, s0, run_ids):
    return _forward(launch, x, dt, A, B, C, s0, run_ids)


def _kernel_op_fwd(launch, x, dt, A, B, C, s0, run_ids):
    return _forward(launch, x, dt, A, B, C, s0, run_ids), (x, dt, A, B, C, s0, run_ids)


def _kernel_op_bwd(launch, res, cts):
    """Backward = VJP of the chunked op, recomputing its forward from the saved inputs."""
    x, dt, A, B, C, s0, run_ids = res

    def chunked(x, dt, A, B, C, s0):
        return ssd_chunked(x, dt, A, B, C, launch.chunk_size, s0, run_ids)

    _, vjp = jax.vjp(chunked, x, dt, A, B, C, s0)
    return (*vjp(cts), None)   # no cotangent for the integer run ids


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


def _run_kernel(backend, x, dt, A, B, C, chunk_size, initial_state, run_ids, interpret, options):
    """The chosen kernel (support already asked) with the custom VJP; ``interpret`` None: the platform decides."""
    if interpret is None:
        interpret = platform.interpret_default()
    elif isinstance(interpret, (bool, int)):
        interpret = bool(interpret)
    b, _, h, p = x.shape
    s0 = jnp.zeros((b, h, p, B.shape[3]), jnp.float32) if initial_state is None else initial_state
    launch = _Launch(backend, chunk_size, interpret, tuple(sorted(options.items())))
    return _kernel_op(launch, x, dt, A, B, C, s0, run_ids)


def ssd(x, dt, A, B, C, *, chunk_size: int, initial_state=None, return_final_state: bool = False,
        segment_ids=None, impl: str = "chunked", interpret: bool | None = None):
    """SSD scan; see the module docstring for shapes, semantics and ``impl``.

    ``interpret`` only affects the Pallas kernels (None: True unless running on GPU).
    """
    _validate(x, dt, A, B, C, chunk_size, initial_state, segment_ids, impl)
    run_ids = None if segment_ids is None else segment_runs(segment_ids)
    # mixed dtypes: the promoted one decides (the Mosaic kernel needs x, B, C in one 16-bit dtype)
    dtype = jnp.result_type(x, B, C)
    chosen = _choose(impl, _shape(x), _shape(B), chunk_size, dtype)
    if chosen == "reference":
        y, state = ssd_reference(x, dt, A, B, C, initial_state, run_ids)
    elif chosen == "chunked":
        y, state = ssd_chunked(x, dt, A, B, C, chunked_size(chunk_size), initial_state, run_ids)
    else:
        y, state = _run_kernel(chosen, x, dt, A, B, C, chunk_size, initial_state, run_ids, interpret, {})
    return (y, state) if return_final_state else y


def ssd_pallas(x, dt, A, B, C, *, chunk_size: int, initial_state=None, run_ids=None, interpret=None,
               backend: str | None = None, **options):
    """The kernel path alone (tests, benchmarks): inputs as `ssd` (not validated beyond support),
    ``run_ids`` from `segment_runs`. ``backend``: a key of BACKENDS (fail-closed: ValueError if its
    kernel does not support these shapes), or None for `backend_for` (ValueError if none does).
    ``interpret``: None means True unless on a GPU; "mosaic_gpu" also takes a
    ``plgpu.InterpretGPUParams``. ``options``: the kernel's own launch options (portable: ``block_p``,
    ``precision``, ``num_warps``, ``num_stages``). Differentiable (the custom VJP). Returns
    (y, final_state)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)} or None; got {backend!r}")
    chosen = _choose("pallas" if backend is None else backend, _shape(x), _shape(B), chunk_size,
                     jnp.result_type(x, B, C))
    return _run_kernel(chosen, x, dt, A, B, C, chunk_size, initial_state, run_ids, interpret, options)
