"""Turning an ml-collections experiment config into a ModelConfig (configs/*.py hold `model.preset` + overrides)."""

from __future__ import annotations

import dataclasses

from nemotron_jax.config import ConfigError, ModelConfig


def model_config_from(exp_cfg) -> ModelConfig:
    overrides = dict(exp_cfg.model.get("overrides", {}) or {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if "precision" in overrides:
        raise ConfigError("config.model.overrides.precision: set config.precision instead (bf16 or nvfp4); "
                          "the trainer applies that one")
    if unknown:
        raise ConfigError(f"config.model.overrides has unknown ModelConfig field(s) {unknown}; "
                          f"see nemotron_jax/config.py for the field names")
    return ModelConfig.preset(exp_cfg.model.preset, **overrides)
