"""Which platform am I on: the one place in the package that asks JAX.

Ops and dispatchers ask here; Pallas kernels (pallas_kernels/) never do: they are told, through
their ``interpret`` argument. Everything derives from `backend()`, so a test can pretend to be on
another platform by patching that one function.
"""

from __future__ import annotations

import jax

# jax.default_backend() names a GPU "gpu"; the plugin names cover older or explicit set-ups.
_GPU_NAMES = ("gpu", "cuda", "rocm")


def backend() -> str:
    """The default JAX platform as "gpu", "cpu" or "tpu" (CUDA and ROCm both count as "gpu")."""
    name = jax.default_backend()
    return "gpu" if name in _GPU_NAMES else name


def on_gpu() -> bool:
    return backend() == "gpu"


def on_cpu() -> bool:
    return backend() == "cpu"


def interpret_default() -> bool:
    """Whether a Pallas kernel should run interpreted when nobody says: our kernels compile for GPUs
    only (Mosaic GPU and Triton lowerings), so everywhere else they run under the interpreter."""
    return not on_gpu()


def host_allocator() -> str:
    """The C allocator serving this process's host memory (XLA's CPU buffers among it): "tcmalloc", "jemalloc" or
    "mimalloc" when one is preloaded (scripts/setup.sh preloads tcmalloc: docs/benchmarks.md, "The host allocator on CPU"),
    else "system"; "unknown" where /proc is not there to ask."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"
