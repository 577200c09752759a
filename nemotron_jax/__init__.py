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


__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "NemotronModel", "from_hf", "to_hf"]
__version__ = "0.1.0"
