"""The main job on the bundled default: build the configured model, run a forward pass on CPU, report.

    python experiments/main.py --config configs/tiny.py [--config.batch_size=4 --config.model.preset=small]

Prints the layer table, parameter counts, the logits shape and the forward time (compile and steady state).
The training issue turns this into training on the bundled corpus.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
from absl import app
from flax import nnx
from ml_collections import config_flags

from nemotron_jax import model as M
from nemotron_jax.experiment import model_config_from
from nemotron_jax.info import count_params, format_report

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = config_flags.DEFINE_config_file("config", str(_ROOT / "configs" / "tiny.py"), "experiment config file")


def run(exp) -> dict:
    cfg = model_config_from(exp)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {len(jax.devices())} device(s)")
    print(format_report(exp.model.preset, count_params(cfg)))

    model = M.init_model(cfg, seed=exp.seed)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: M.apply(graphdef, s, t))
    tokens = jax.random.randint(jax.random.key(exp.seed), (exp.batch_size, exp.seq_len), 0, cfg.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(state, tokens))
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(state, tokens))
    t_run = time.perf_counter() - t0
    print(f"tokens {tuple(tokens.shape)} -> logits {tuple(out.logits.shape)} {out.logits.dtype}"
          + "".join(f", MTP depth {k} logits {tuple(lg.shape)}" for k, lg in enumerate(out.mtp_logits, 1)))
    print(f"forward: first call (with compile) {t_compile:.2f}s, steady state {t_run * 1e3:.1f} ms "
          f"({tokens.size / t_run:,.0f} tokens/s)")
    if not bool(jnp.all(jnp.isfinite(out.logits))):
        raise SystemExit("non-finite logits: the model is broken")
    return {"logits_shape": tuple(out.logits.shape), "seconds": t_run}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
