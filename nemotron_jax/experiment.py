"""Experiment configs (configs/*.py: `model.preset` + `model.overrides`) -> ModelConfig.

`model_overrides(...)` gives `config.model.overrides` a typed placeholder for EVERY ModelConfig field, so any
field can be set on the command line (`--config.model.overrides.vocab_size=32000`); unset placeholders (None)
keep the preset's value. `check_override_flags(argv)` refuses an unknown field before flags are parsed, naming
the nearest real one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

import ml_collections
from ml_collections import config_dict

from nemotron_jax.config import ConfigError, ModelConfig

_OVERRIDE_PREFIX = "--config.model.overrides."
# set through config.precision (the trainer applies it), so there is one way to choose it
_NOT_OVERRIDABLE = ("precision",)


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(ModelConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple or hint is tuple:
        return tuple
    if args:  # X | None
        return args[0] if typing.get_origin(args[0]) is None else typing.get_origin(args[0])
    return hint


def overridable_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_OVERRIDABLE]


def model_overrides(**values) -> ml_collections.ConfigDict:
    """A ConfigDict with every overridable ModelConfig field: `values` set, the rest typed None placeholders."""
    unknown = sorted(set(values) - set(overridable_fields()))
    if unknown:
        raise ConfigError(f"model_overrides: unknown ModelConfig field(s) {unknown}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    d = {name: values[name] if name in values else config_dict.placeholder(_field_type(fields[name]))
         for name in overridable_fields()}
    return ml_collections.ConfigDict(d)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, overridable_fields(), n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see nemotron_jax/config.py for the field names"


def check_override_flags(argv: list[str]) -> None:
    """Refuse `--config.model.overrides.NAME=...` for a NAME that is not a ModelConfig field (with a suggestion)."""
    for arg in argv:
        if arg.startswith(_OVERRIDE_PREFIX):
            name = arg[len(_OVERRIDE_PREFIX):].split("=", 1)[0]
            if name in _NOT_OVERRIDABLE:
                raise ConfigError(f"{arg}: set --config.{name} instead (the trainer applies it)")
            if name not in overridable_fields():
                raise ConfigError(f"{arg}: {name!r} is not a ModelConfig field{_suggest(name)}")


def model_config_from(exp_cfg) -> ModelConfig:
    overrides = {k: v for k, v in dict(exp_cfg.model.get("overrides", {}) or {}).items() if v is not None}
    if "precision" in overrides:
        raise ConfigError("config.model.overrides.precision: set config.precision instead (bf16 or nvfp4); "
                          "the trainer applies that one")
    unknown = sorted(set(overrides) - set(overridable_fields()))
    if unknown:
        raise ConfigError(f"config.model.overrides has unknown ModelConfig field(s) {unknown}"
                          f"{_suggest(unknown[0])}")
    if isinstance(overrides.get("time_step_limit"), list):
        overrides["time_step_limit"] = tuple(overrides["time_step_limit"])
    return ModelConfig.preset(exp_cfg.model.preset, **overrides)
