"""Experiment configs -> ModelConfig: every field overridable, typos named, precision set in one place."""

import dataclasses

import pytest

from configs.tiny import get_config
from nemotron_jax.config import ConfigError, ModelConfig
from nemotron_jax.experiment import check_override_flags, model_config_from, model_overrides, overridable_fields


def test_every_model_field_has_an_override_slot():
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"precision"}
    assert set(overridable_fields()) == fields
    assert set(model_overrides()) == fields


def test_unset_slots_keep_the_preset_and_set_ones_apply():
    exp = get_config()
    exp.model.overrides.vocab_size = 512
    exp.model.overrides.time_step_limit = [0.001, float("inf")]  # e.g. from a JSON config
    cfg = model_config_from(exp)
    assert cfg.vocab_size == 512 and cfg.hidden_size == ModelConfig.tiny().hidden_size
    assert cfg.dtype == "bfloat16" and cfg.time_step_limit == (0.001, float("inf"))


def test_typos_and_precision_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="did you mean 'vocab_size'"):
        check_override_flags(["--config.model.overrides.vocab_sise=3"])
    with pytest.raises(ConfigError, match="set --config.precision instead"):
        check_override_flags(["--config.model.overrides.precision=nvfp4"])
    check_override_flags(["--config.steps=3", "--config.model.overrides.hidden_size=32"])  # fine
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        model_overrides(hiden_size=3)
