"""The bundled default: the `tiny` preset (every layer type, under 1M parameters) on CPU."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict()
    cfg.model.preset = "tiny"
    # Any ModelConfig field may be overridden here or on the command line: --config.model.overrides.dtype=bfloat16
    cfg.model.overrides = ml_collections.ConfigDict({"dtype": "float32"})
    cfg.seed = 0
    cfg.batch_size = 2
    cfg.seq_len = 128
    return cfg
