"""The fixed "bench" model of issue 14: what benchmarks/train_step.py times against HF transformers.

hidden 512, pattern MEM*EMEM*EME (6 Mamba-2, 2 attention, 4 MoE), 8 heads / 2 KV heads x 64, Mamba-2 16 heads x
64 (2 groups, state 64, chunk 128), 16 routed experts top-4 of width 256 + a shared expert of width 512, byte
vocabulary (256); batch 4 x 512 tokens; 33.8M parameters. It trains like any other config:

    python experiments/train.py --config configs/bench.py --workdir runs/bench-train [--config.steps=200]

`BENCH_MODEL`, `SEQ_LEN` and `BATCH_SIZE` are plain module constants (no ml_collections needed to read them), so
the benchmark can load them on a machine without the trainer's dependencies.
"""

import importlib.util
import pathlib

# Every architecture field the benchmark fixes, on top of the `tiny` preset (which has no latent MoE and no MTP).
BASE_PRESET = "tiny"
BENCH_MODEL = dict(
    vocab_size=256, hidden_size=512, hybrid_override_pattern="MEM*EMEM*EME",
    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=2, conv_kernel=4, chunk_size=128,
    n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, moe_shared_expert_intermediate_size=512,
    routed_scaling_factor=2.5, initializer_range=0.02,
)
SEQ_LEN, BATCH_SIZE = 512, 4


def get_config():
    from nemotron_jax.experiment import model_overrides  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("_tiny_config", pathlib.Path(__file__).with_name("tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.model.preset = BASE_PRESET
    c.model.overrides = model_overrides(dtype="bfloat16", **BENCH_MODEL)  # compute dtype; params stay fp32 masters
    c.data.seq_len = SEQ_LEN
    c.data.batch_size = BATCH_SIZE
    c.steps = 500
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    return c
