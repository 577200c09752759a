"""nemotron-jax: Nemotron 3 hybrid Mamba-2 / attention / MoE models and the NVFP4 recipe in JAX."""

from nemotron_jax.config import ConfigError, ModelConfig
from nemotron_jax.model import ModelOutput, NemotronModel



def from_hf(*args, **kwargs):
    """Load an HF NemotronH checkpoint: see nemotron_jax.convert.hf.from_hf (imported lazily)."""
    from nemotron_jax.convert.hf import from_hf as _from_hf  # noqa: PLC0415
    return _from_hf(*args, **kwargs)


def to_hf(*args, **kwargs):
    """Write a model as an HF NemotronH checkpoint: see nemotron_jax.convert.hf.to_hf (imported lazily)."""
    from nemotron_jax.convert.hf import to_hf as _to_hf  # noqa: PLC0415
    return _to_hf(*args, **kwargs)


def __getattr__(name):
    # `nemotron_jax.generate` is a callable module (function and CLI share the name); import it on first use
    if name == "generate":
        import nemotron_jax.generate as g  # noqa: PLC0415
        return g
    if name == "load_run":
        from nemotron_jax.inference.load import load_run  # noqa: PLC0415
        return load_run
    raise AttributeError(f"module 'nemotron_jax' has no attribute {name!r}")


__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "NemotronModel", "from_hf", "generate", "load_run", "to_hf"]
__version__ = "0.1.0"
