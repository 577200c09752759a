"""A 20-50M parameter Super-shaped model (LatentMoE + MTP) that still runs on a CPU."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict()
    cfg.model.preset = "small"
    cfg.model.overrides = ml_collections.ConfigDict({"dtype": "float32"})
    cfg.seed = 0
    cfg.batch_size = 2
    cfg.seq_len = 256
    return cfg
