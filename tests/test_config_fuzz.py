"""Config fuzzing (hypothesis): every valid ModelConfig builds and runs a forward; every invalid one raises
ConfigError naming the field, never an error from deep inside jax.

Two tests share one strategy of small, consistent configs (`valid_configs`):
- `test_fuzzed_config_is_refused_by_name_or_traces`: a valid config with 1-3 fields overwritten by values from
  each field's whole range (zero, negative, non-divisible, NaN, inf, wrong types). Either ModelConfig raises
  ConfigError naming a field, or the model builds and its forward (with MTP) traces to the right shapes
  (`jax.eval_shape`: the whole graph is built, nothing is compiled, so it is cheap enough for many examples).
- `test_fuzzed_valid_config_runs_a_finite_forward`: fewer valid configs, built for real and run (one jit of
  init + forward each); every logit, MTP logits included, is finite.

The examples are derandomized (the same every run, so the suite's time is stable); set
NEMOTRON_FUZZ_EXAMPLES=N to draw N per test with a fresh random seed.
"""

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nemotron_jax import model as M
from nemotron_jax.config import ConfigError, ModelConfig

FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_N = int(os.environ.get("NEMOTRON_FUZZ_EXAMPLES", "0"))


def _settings(n: int):
    return settings(max_examples=_N or n, deadline=None, derandomize=not _N, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def valid_configs(draw):
    """Small configs that satisfy every cross-field rule (heads / groups / experts divisibility, top-k)."""
    def divisor_of(n):
        return st.sampled_from([d for d in range(1, n + 1) if n % d == 0])

    heads = draw(st.sampled_from([1, 2, 4]))
    m_heads = draw(st.sampled_from([1, 2, 4]))
    experts = draw(st.integers(1, 6))
    n_group = draw(divisor_of(experts))
    topk_group = draw(st.integers(1, n_group))
    k_max = experts if n_group == 1 else min(experts, topk_group * (experts // n_group))
    mtp = draw(st.sampled_from([0, 0, 1]))
    return dict(
        vocab_size=draw(st.sampled_from([16, 17, 32])),
        hidden_size=draw(st.sampled_from([8, 12, 16])),
        hybrid_override_pattern=draw(st.text("M*E-", min_size=1, max_size=3)),
        num_attention_heads=heads, num_key_value_heads=draw(divisor_of(heads)),
        head_dim=draw(st.sampled_from([4, 8])), attention_bias=draw(st.booleans()),
        intermediate_size=draw(st.sampled_from([4, 16])), mlp_bias=draw(st.booleans()),
        mamba_num_heads=m_heads, n_groups=draw(divisor_of(m_heads)), mamba_head_dim=draw(st.sampled_from([4, 8])),
        ssm_state_size=draw(st.sampled_from([4, 8])), conv_kernel=draw(st.integers(1, 4)),
        chunk_size=draw(st.integers(1, 8)), use_conv_bias=draw(st.booleans()), mamba_proj_bias=draw(st.booleans()),
        time_step_limit=draw(st.sampled_from([(0.0, math.inf), (1e-3, math.inf), (0.0, 0.5)])),
        mamba_ssm_cache_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        ssd_impl=draw(st.sampled_from(["chunked", "reference", "auto"])),  # "pallas" fails closed on CPU by design
        remat=draw(st.sampled_from(["none", "block", "mamba_only", "block_save_dots"])),
        n_routed_experts=experts, num_experts_per_tok=draw(st.integers(1, k_max)), n_group=n_group,
        topk_group=topk_group, norm_topk_prob=draw(st.booleans()),
        moe_intermediate_size=draw(st.sampled_from([4, 8])),
        moe_shared_expert_intermediate_size=draw(st.sampled_from([0, 8])), n_shared_experts=draw(st.integers(0, 1)),
        moe_latent_size=draw(st.sampled_from([None, 4])),
        num_nextn_predict_layers=mtp, mtp_hybrid_override_pattern=draw(st.text("M*E-", max_size=2)),
        mtp_depths=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        param_dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        precision=draw(st.sampled_from(["bf16", "bf16", "nvfp4"])),
        max_position_embeddings=64,
    )


_BAD_NUMBERS = [0, -1, -3, 1.5, math.nan, math.inf, -math.inf, True, None, "4"]
_INT = st.one_of(st.integers(-3, 9), st.sampled_from(_BAD_NUMBERS))
_REAL = st.one_of(st.sampled_from([1e-5, 1e-3, 0.02, 0.1, 0.5, 1.0, 2.5]), st.sampled_from(_BAD_NUMBERS))
_PATTERN = st.one_of(st.text("M*E-", max_size=3), st.text("M*E-X e", max_size=3), st.sampled_from([None, 3, ["M"]]))
_DTYPE = st.sampled_from(["float32", "bfloat16", "float16", "int8", "", None, 32])
_BOOL = st.sampled_from([True, False, 0, 1, "yes", None])
OVERRIDES = {
    "vocab_size": _INT, "hidden_size": _INT, "hybrid_override_pattern": _PATTERN,
    "layer_norm_epsilon": _REAL, "initializer_range": _REAL, "rescale_prenorm_residual": _BOOL,
    "max_position_embeddings": _INT,
    "num_attention_heads": _INT, "num_key_value_heads": _INT, "head_dim": _INT, "attention_bias": _BOOL,
    "intermediate_size": _INT, "mlp_bias": _BOOL, "mlp_hidden_act": st.sampled_from(["relu2", "gelu", None]),
    "mamba_num_heads": _INT, "mamba_head_dim": _INT, "ssm_state_size": _INT, "n_groups": _INT,
    "conv_kernel": _INT, "chunk_size": _INT, "use_conv_bias": _BOOL, "mamba_proj_bias": _BOOL,
    "mamba_hidden_act": st.sampled_from(["silu", "relu"]),
    "time_step_min": _REAL, "time_step_max": _REAL, "time_step_floor": _REAL,
    "time_step_limit": st.sampled_from([(0.0, math.inf), [1e-3, math.inf], (0.5, 0.1), (-1.0, 1.0), (0.0, math.nan),
                                        (math.nan, 1.0), (math.inf, math.inf), (0.0,), (0.0, 1.0, 2.0), None, 1.0,
                                        ("0", "1")]),
    "mamba_ssm_cache_dtype": _DTYPE, "ssd_impl": st.sampled_from(["chunked", "reference", "auto", "fast", None]),
    "remat": st.sampled_from(["none", "block", "mamba_only", "block_save_dots", "full", None, 1]),
    "n_routed_experts": _INT, "num_experts_per_tok": _INT, "moe_intermediate_size": _INT,
    "moe_shared_expert_intermediate_size": _INT, "n_shared_experts": _INT,
    "moe_latent_size": st.one_of(st.none(), _INT), "routed_scaling_factor": _REAL, "n_group": _INT,
    "topk_group": _INT, "norm_topk_prob": _BOOL, "moe_router_bias_update_rate": _REAL, "moe_aux_loss_coeff": _REAL,
    "moe_capacity_factor": st.one_of(st.none(), _REAL),
    "num_nextn_predict_layers": _INT, "mtp_hybrid_override_pattern": _PATTERN, "mtp_depths": _INT,
    "mtp_loss_scaling_factor": _REAL,
    "sharding_rules": st.sampled_from([None, (("batch", "data"),), [["embed", ["fsdp", "tensor"]]], 5, "rules",
                                       ((1, "data"),), (("batch",),), (("batch", 3),)]),
    "dtype": _DTYPE, "param_dtype": _DTYPE, "precision": st.sampled_from(["bf16", "nvfp4", "fp8", None]),
    "nvfp4_bf16_last_fraction": _REAL, "nvfp4_bf16_last_layers": st.one_of(st.none(), _INT),
    "nvfp4_rht": _BOOL, "nvfp4_stochastic_rounding": _BOOL, "nvfp4_weight_2d": _BOOL, "mamba_out_proj_mxfp8": _BOOL,
    # "pallas" is left out: off GPU it runs the kernel interpreted, too slow for a fuzz example (tested in quant/)
    "nvfp4_impl": st.sampled_from(["reference", "auto", "fast", "", None]),
}


def test_overrides_cover_every_field():
    """A new ModelConfig field must be fuzzed too (add it to OVERRIDES with its whole range)."""
    assert FIELDS - set(OVERRIDES) == set(), "fields not fuzzed"
    assert set(OVERRIDES) - FIELDS == set(), "fuzzed names that are not fields"


def _perturbed():
    return st.tuples(valid_configs(),
                     st.lists(st.sampled_from(sorted(OVERRIDES)), min_size=1, max_size=3, unique=True).flatmap(
                         lambda names: st.fixed_dictionaries({n: OVERRIDES[n] for n in names})))


def _build(kw):
    """ModelConfig(**kw), or None after checking that the ConfigError names a field (and only a ConfigError)."""
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        m = re.match(r"ModelConfig\.(\w+)=", str(e))
        assert m and m.group(1) in FIELDS, f"ConfigError does not start with 'ModelConfig.<field>=': {e}"
        assert ";" in str(e), f"no fix after the reason: {e}"
        return None


@_settings(120)
@given(_perturbed(), st.integers(1, 2), st.integers(1, 9))
def test_fuzzed_config_is_refused_by_name_or_traces(case, b, t):
    base, over = case
    cfg = _build({**base, **over})
    if cfg is None:
        return
    assert cfg.num_hidden_layers == len(cfg.hybrid_override_pattern)
    graphdef, state = nnx.split(M.abstract_model(cfg))
    out = jax.eval_shape(lambda s, x: M.apply(graphdef, s, x), state, jax.ShapeDtypeStruct((b, t), jnp.int32))
    assert out.logits.shape == (b, t, cfg.vocab_size) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (b, t, cfg.hidden_size)
    assert len(out.mtp_logits) == (cfg.mtp_depths if cfg.mtp_enabled else 0)
    assert all(x.shape == (b, t, cfg.vocab_size) for x in out.mtp_logits)
    assert len(out.moe_aux) == cfg.hybrid_override_pattern.count("E")


_EVERYTHING = dict(  # every layer kind, NVFP4, LatentMoE, group-limited routing and MTP, one token (< mtp_depths)
    vocab_size=17, hidden_size=16, hybrid_override_pattern="ME*-", num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, intermediate_size=16, mamba_num_heads=2, n_groups=2, mamba_head_dim=8, ssm_state_size=4,
    conv_kernel=4, chunk_size=3, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
    moe_intermediate_size=8, moe_latent_size=4, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
    mtp_depths=2, dtype="bfloat16", precision="nvfp4", max_position_embeddings=64)


@_settings(5)
@given(valid_configs(), st.integers(1, 2), st.integers(1, 7))
@example(_EVERYTHING, 2, 1)
def test_fuzzed_valid_config_runs_a_finite_forward(kw, b, t):
    cfg = ModelConfig(**kw)
    toks = jax.random.randint(jax.random.key(t), (b, t), 0, cfg.vocab_size, dtype=jnp.int32)
    graphdef, state = nnx.split(M.NemotronModel(cfg, rngs=nnx.Rngs(0)))
    out = jax.jit(lambda s, x: M.apply(graphdef, s, x))(state, toks)
    assert out.logits.shape == (b, t, cfg.vocab_size)
    for x in (out.logits, *out.mtp_logits):
        assert bool(jnp.all(jnp.isfinite(x))), cfg


@pytest.mark.parametrize("overrides, field", [
    (dict(layer_norm_epsilon=math.nan), "layer_norm_epsilon"),
    (dict(initializer_range=math.inf), "initializer_range"),
    (dict(initializer_range=-0.02), "initializer_range"),
    (dict(time_step_max=math.inf), "time_step_max"),
    (dict(time_step_floor=math.nan), "time_step_floor"),
    (dict(routed_scaling_factor=math.nan), "routed_scaling_factor"),
    (dict(moe_router_bias_update_rate=-1e-3), "moe_router_bias_update_rate"),
    (dict(moe_aux_loss_coeff=math.nan), "moe_aux_loss_coeff"),
    (dict(mtp_loss_scaling_factor=math.inf), "mtp_loss_scaling_factor"),
    (dict(moe_capacity_factor=math.inf), "moe_capacity_factor"),
    (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
    (dict(attention_bias="no"), "attention_bias"),
    (dict(moe_latent_size=True), "moe_latent_size"),
    (dict(time_step_limit=(0.0,)), "time_step_limit"),
    (dict(time_step_limit=None), "time_step_limit"),
    (dict(sharding_rules=5), "sharding_rules"),
    (dict(num_nextn_predict_layers=1, mtp_hybrid_override_pattern=None), "mtp_hybrid_override_pattern"),
    (dict(nvfp4_bf16_last_layers=1.5), "nvfp4_bf16_last_layers"),
])
def test_fuzz_findings_are_config_errors(overrides, field):
    """What fuzzing found passing validation (NaN/inf/negative numbers, wrong types) or failing with a TypeError."""
    with pytest.raises(ConfigError, match=rf"^ModelConfig\.{field}="):
        ModelConfig.tiny(**overrides)


def test_sequence_shorter_than_mtp_depths_runs():
    """Fuzzing found `shift_tokens` built a [b, k] tail for k > t (a concatenate error inside jax): t=1, depth 2."""
    cfg = ModelConfig.tiny(num_nextn_predict_layers=1, mtp_depths=2, hybrid_override_pattern="-")
    out = jax.eval_shape(lambda x: M.NemotronModel(cfg, rngs=nnx.Rngs(0)).forward(x),
                         jax.ShapeDtypeStruct((2, 1), jnp.int32))
    assert [x.shape for x in out.mtp_logits] == [(2, 1, 256)] * 2
    assert M.shift_tokens(jnp.arange(3)[None], 5).tolist() == [[0, 0, 0]]
    assert M.shift_tokens(jnp.arange(3)[None], 1).tolist() == [[1, 2, 0]]
