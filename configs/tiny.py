"""The bundled default: train the `tiny` preset (every layer type, <1M parameters) on the bundled
Shakespeare corpus with a byte tokenizer, on CPU, in a few minutes.

    python experiments/train.py --config configs/tiny.py --workdir runs/tiny [--config.steps=200]
"""

import ml_collections

from nemotron_jax.experiment import model_overrides


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 2000
    c.precision = "bf16"  # or "nvfp4": the NVFP4 recipe and precision policy

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    # every ModelConfig field is here (None keeps the preset's value): --config.model.overrides.hidden_size=96
    c.model.overrides = model_overrides(dtype="bfloat16")  # compute dtype; params stay fp32 masters

    c.data = ml_collections.ConfigDict()
    c.data.source = ml_collections.config_dict.placeholder(str)  # None: the bundled corpus; or a .txt file / dir
    c.data.tokenizer = ml_collections.config_dict.placeholder(str)  # None: bytes; or a tokenizer.json
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.worker_count = 0
    c.data.validation_fraction = 0.05

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.decay_fraction = 0.2
    c.optim.min_lr_ratio = 0.1
    c.optim.decay_shape = "minus_sqrt"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})

    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = 8
    c.ckpt_every = 250
    c.ckpt_keep = 3

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "ROMEO:\n"
    c.sample.length = 200  # 0 skips the end-of-run sample
    c.sample.temperature = 0.8  # 0 is greedy
    c.sample.top_k = 40  # None or 0 keeps every token
    c.sample.top_p = 1.0

    # a step with a non-finite loss or gradient is skipped (no update; counted in metrics.csv `skipped_steps`);
    # this many in a row stop the run with the last good state checkpointed (0: never stop)
    c.max_consecutive_skips = 10
    # resuming with another `steps` or optim.* value changes the schedule: refused unless this is True
    # (an accepted change is recorded in <workdir>/events.jsonl)
    c.allow_schedule_change = False

    c.debug_kill_after_step = -1  # tests only: SIGKILL the run after this step
    c.debug_kill_in_save_at_step = -1  # tests only: SIGKILL inside this step's checkpoint save (before it commits)
    c.debug_nan_at_steps = ()  # tests only: NaN loss and gradients at these (1-based) steps
    return c
