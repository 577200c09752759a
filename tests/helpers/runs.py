"""Short training runs for tests: the bundled tiny config cut down to a few small steps."""

from configs.tiny import get_config


def small_exp(**kw):
    """configs/tiny.py at 8 steps of 4x32 tokens (checkpoints every 3 steps); `kw` sets fields by dotted path,
    e.g. small_exp(steps=5, **{"model.overrides.hybrid_override_pattern": "M*E-"})."""
    c = get_config()
    c.steps = 8
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.log_every = 1
    c.eval_every = 4
    c.eval_batches = 2
    c.ckpt_every = 3
    c.sample.length = 8
    c.optim.warmup_steps = 2
    for k, v in kw.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c
