"""Checkpoint converters. `hf`: HF NemotronH (Hub layout) import/export, see nemotron_jax.convert.hf."""

from nemotron_jax.convert.hf import CheckpointError, from_hf, load_hf_weights, to_hf
from nemotron_jax.convert.hf_config import config_from_hf, config_to_hf

__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "from_hf", "load_hf_weights", "to_hf"]
