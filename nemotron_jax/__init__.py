"""nemotron-jax: Nemotron 3 hybrid Mamba-2 / attention / MoE models and the NVFP4 recipe in JAX."""

from nemotron_jax.config import ConfigError, ModelConfig
from nemotron_jax.model import ModelOutput, NemotronModel

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "NemotronModel"]
__version__ = "0.1.0"
