"""A 23M-parameter Super-shaped model (LatentMoE + MTP, 12 layers) on the bundled corpus.

Slower than tiny on a CPU (about 0.2 s per 1k tokens); meant for a longer CPU run or an accelerator.

    python experiments/train.py --config configs/small.py --workdir runs/small
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_tiny_config", pathlib.Path(__file__).with_name("tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
    c = _tiny.get_config()
    c.model.preset = "small"
    c.steps = 2000
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    return c
