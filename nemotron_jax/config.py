"""ModelConfig: every architecture field of Nemotron 3 (HF NemotronH names where one exists), presets, validation.

Sources for preset numbers: shared/docs/nemotron3_spec.md sections 1-3 (HF config, Megatron launch scripts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LAYER_TYPES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
_COMPUTE_DTYPES = ("float32", "bfloat16")
PRECISIONS = ("bf16", "nvfp4")
# Activation rematerialisation of the training forward (nemotron_jax.model): "none" keeps every activation for the
# backward; "block" recomputes each block's insides in the backward (keeps only the block inputs); "mamba_only"
# does that for the Mamba blocks alone (their SSD intermediates are the largest); "block_save_dots" keeps the
# matmul outputs of every block and recomputes the elementwise work around them.
REMAT_MODES = ("none", "block", "mamba_only", "block_save_dots")
_BOOL_FIELDS = ("rescale_prenorm_residual", "attention_bias", "mlp_bias", "use_conv_bias", "mamba_proj_bias",
                "norm_topk_prob", "nvfp4_rht", "nvfp4_stochastic_rounding", "nvfp4_weight_2d", "mamba_out_proj_mxfp8")
# (field, lowest value, whether the lowest is excluded, the fix): finite real numbers (int or float, not bool)
_FLOAT_FIELDS = (
    ("layer_norm_epsilon", 0.0, True, "Nemotron 3 uses 1e-5"),
    ("initializer_range", 0.0, False, "the std of the normal init; Nemotron 3 uses 0.01-0.02"),
    ("time_step_min", 0.0, True, "Megatron uses 1e-3"),
    ("time_step_max", 0.0, True, "Megatron uses 0.1"),
    ("time_step_floor", 0.0, False, "Megatron uses 1e-4"),
    ("routed_scaling_factor", 0.0, True, "Nemotron 3 uses 2.5 (Nano) or 5.0 (Super, Ultra)"),
    ("moe_router_bias_update_rate", 0.0, False, "Nemotron 3 uses 1e-3; 0 turns the bias update off"),
    ("moe_aux_loss_coeff", 0.0, False, "Nemotron 3 uses 1e-4; 0 turns the aux loss off"),
    ("mtp_loss_scaling_factor", 0.0, False, "Nemotron 3 uses 0.3 (Super) or 0.1 (Ultra)"),
    ("nvfp4_bf16_last_fraction", 0.0, False, "Nemotron 3 keeps the last 0.15 in BF16"),
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigError(ValueError):
    """A ModelConfig field holds a value the model cannot use; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- general (HF NemotronHConfig names) ---
    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "M*E"  # one char per block: M Mamba-2, * attention, E MoE, - MLP
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # std of normal init for linears and embeddings
    rescale_prenorm_residual: bool = True  # scale residual-branch output projections' init by 1/sqrt(2 * layers)
    max_position_embeddings: int = 262144  # longest context supported (no positional encoding): caps the decode cache

    # --- attention (GQA, no positional encoding) ---
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False

    # --- dense MLP ('-'): non-gated squared ReLU ---
    intermediate_size: int = 1856
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"

    # --- Mamba-2 ---
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_min: float = 1e-3  # dt init range (and HF's clamp value)
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # Clamp on softplus(dt + dt_bias). Training (Megatron) uses (0, inf); HF 5.24 parity needs (1e-3, inf).
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"  # dtype of the SSM state held in the decode cache
    # nemotron_jax.ops.ssd implementation. "auto" (Pallas kernel on GPU where supported) becomes the default once
    # benchmarks/gpu_ssd.py has validated the compiled kernel on a GPU; until then the chunked jnp op.
    ssd_impl: str = "chunked"

    # --- MoE ('E') ---
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    n_shared_experts: int = 1
    moe_latent_size: int | None = None  # LatentMoE when set
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    moe_router_bias_update_rate: float = 1e-3  # aux-loss-free balancing (0 turns it off)
    moe_aux_loss_coeff: float = 1e-4  # sequence-level aux loss
    moe_capacity_factor: float | None = None  # None: dropless (expert parallel needs a value)

    # --- MTP (shared-weight block applied mtp_depths times) ---
    num_nextn_predict_layers: int = 0  # 0: no MTP; 1: one shared-weight block
    mtp_hybrid_override_pattern: str = "*E"
    mtp_depths: int = 2
    mtp_loss_scaling_factor: float = 0.3

    # --- parallelism (data, not architecture): (logical axis, mesh axis | tuple of mesh axes | None) pairs;
    # None: nemotron_jax.sharding.DEFAULT_RULES. Parameters, activations and the expert-parallel op all use them.
    sharding_rules: tuple | None = None

    # --- numerics ---
    dtype: str = "bfloat16"  # compute dtype; params are always float32 masters
    param_dtype: str = "float32"
    # Precision policy (nemotron_jax.quant.policy): "bf16" everywhere, or the NVFP4 recipe of spec section 4.
    precision: str = "bf16"
    nvfp4_bf16_last_fraction: float = 0.15  # the last ~15% of layers stay high precision
    nvfp4_bf16_last_layers: int | None = None  # exact count instead of the fraction (Ultra: 16 of 108)
    nvfp4_rht: bool = True  # random Hadamard transform on Wgrad inputs
    nvfp4_stochastic_rounding: bool = True  # SR on dY copies
    nvfp4_weight_2d: bool = True  # 16x16 weight tiles (else 1x16)
    # NVFP4 quantize-dequantize implementation (nemotron_jax.quant.dispatch.CONFIG_IMPLS): "reference" (jnp, runs
    # everywhere), "pallas" (the fused kernel; interpreted off GPU; an unsupported shape/dtype raises) or "auto"
    # (the kernel on a GPU where it supports the call, the reference elsewhere). All give identical bits.
    # "reference" until benchmarks/gpu_nvfp4.sh has shown the compiled kernel bit-identical on a GPU.
    nvfp4_impl: str = "reference"
    remat: str = "none"  # activation rematerialisation, one of REMAT_MODES (a memory / time trade-off)
    mamba_out_proj_mxfp8: bool = True  # Mamba out_proj in MXFP8 under the NVFP4 policy

    # ------------------------------------------------------------------ derived
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(LAYER_TYPES[c] for c in self.hybrid_override_pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return 2 * self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    @property
    def mtp_enabled(self) -> bool:
        return self.num_nextn_predict_layers > 0

    @property
    def moe_expert_input_size(self) -> int:
        """Width the routed experts read: the latent size for LatentMoE, else hidden_size."""
        return self.moe_latent_size or self.hidden_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------- validation
    def __post_init__(self):
        if isinstance(self.time_step_limit, list):
            object.__setattr__(self, "time_step_limit", tuple(self.time_step_limit))
        if self.sharding_rules is not None:  # hashable, whatever sequences it came in
            try:
                rules = tuple((r[0], tuple(r[1]) if isinstance(r[1], (list, tuple)) else r[1]) if len(r) == 2
                              else tuple(r) for r in self.sharding_rules)
            except (TypeError, KeyError, IndexError):
                raise ConfigError(f"ModelConfig.sharding_rules={self.sharding_rules!r}: needs a sequence of (logical "
                                  f"axis, mesh axis | tuple of mesh axes | None) pairs; see nemotron_jax/sharding.py "
                                  f"DEFAULT_RULES, or use None for the defaults") from None
            object.__setattr__(self, "sharding_rules", rules)
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str, fix: str) -> None:
            raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}; {fix}")

        pat = self.hybrid_override_pattern
        if not isinstance(pat, str) or not pat:
            bad("hybrid_override_pattern", "the layer pattern is empty", "give one of M, *, E, - per layer")
        for i, c in enumerate(pat):
            if c not in LAYER_TYPES:
                bad("hybrid_override_pattern", f"unknown layer character {c!r} at position {i}",
                    "use M (Mamba-2), * (attention), E (MoE) or - (MLP)")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                     "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "n_group", "topk_group", "mtp_depths"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer", "set it to an int >= 1")
        for name in ("moe_shared_expert_intermediate_size", "n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be a non-negative integer", "set it to an int >= 0 (0 turns it off)")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool", "set it to True or False")
        for name, lo, strict, fix in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v < lo or (strict and v == lo):
                bad(name, f"must be a finite number {'>' if strict else '>='} {lo:g}", fix)
        if not isinstance(self.mtp_hybrid_override_pattern, str):
            bad("mtp_hybrid_override_pattern", "must be a string of layer characters", "Nemotron 3 uses '*E'")
        tsl = self.time_step_limit
        if not (isinstance(tsl, tuple) and len(tsl) == 2 and all(_is_real(x) for x in tsl)):
            bad("time_step_limit", "needs a (low, high) pair of numbers",
                "use (0.0, inf) for training or (1e-3, inf) for HF parity")
        if self.n_shared_experts > 1:
            bad("n_shared_experts", "only one shared expert MLP is built",
                "use 1 and give it the combined width in moe_shared_expert_intermediate_size (Nemotron 3 does)")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not divisible by it",
                "pick a divisor of num_attention_heads (GQA shares each KV head over a whole group)")
        if self.mamba_num_heads % self.n_groups:
            bad("n_groups", f"mamba_num_heads={self.mamba_num_heads} is not divisible by it",
                "pick a divisor of mamba_num_heads (each B/C group serves whole heads)")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"top-k exceeds n_routed_experts={self.n_routed_experts}",
                "use at most n_routed_experts")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by it",
                "use a divisor of n_routed_experts (1 disables group-limited routing)")
        if self.topk_group > self.n_group:
            bad("topk_group", f"exceeds n_group={self.n_group}", "use at most n_group")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "more than the experts in the topk_group selected groups",
                "raise topk_group or lower num_experts_per_tok")
        if self.moe_latent_size is not None and (not _is_int(self.moe_latent_size) or self.moe_latent_size < 1):
            bad("moe_latent_size", "must be a positive int or None", "use None for a standard MoE")
        if self.moe_capacity_factor is not None and not (_is_real(self.moe_capacity_factor)
                                                         and 0 < self.moe_capacity_factor < math.inf):
            bad("moe_capacity_factor", "must be positive or None (and finite)", "use None for dropless dispatch")
        if self.dtype not in _COMPUTE_DTYPES:
            bad("dtype", "unsupported compute dtype", f"use one of {_COMPUTE_DTYPES}")
        if self.mamba_ssm_cache_dtype not in _COMPUTE_DTYPES:
            bad("mamba_ssm_cache_dtype", "unsupported dtype for the Mamba decode state",
                f"use one of {_COMPUTE_DTYPES} (float32 is what Nemotron 3 uses)")
        if self.param_dtype not in _COMPUTE_DTYPES:
            bad("param_dtype", "unsupported parameter dtype", f"use one of {_COMPUTE_DTYPES}")
        if self.precision not in PRECISIONS:
            bad("precision", "unknown precision policy", f"use one of {PRECISIONS}")
        if not 0.0 <= self.nvfp4_bf16_last_fraction <= 1.0:
            bad("nvfp4_bf16_last_fraction", "must lie in [0, 1]", "Nemotron 3 keeps the last 0.15 in BF16")
        last = self.nvfp4_bf16_last_layers
        if last is not None and not (_is_int(last) and 0 <= last <= self.num_hidden_layers):
            bad("nvfp4_bf16_last_layers", f"must lie in [0, num_hidden_layers={self.num_hidden_layers}] or be None",
                "use None to apply nvfp4_bf16_last_fraction")
        # The op owns its list of implementations. Imported here, not at module level, so that config.py
        # (the bottom layer) imports nothing of the package when loaded; by the time a config is built the
        # package __init__ has already imported the op (through the model), so this is a dict lookup.
        from nemotron_jax.ops.ssd import IMPLS as ssd_impls  # noqa: PLC0415
        if self.sharding_rules is not None and not all(
                len(r) == 2 and isinstance(r[0], str) and (r[1] is None or isinstance(r[1], (str, tuple)))
                for r in self.sharding_rules):
            bad("sharding_rules", "needs (logical axis, mesh axis | tuple of mesh axes | None) pairs",
                "see nemotron_jax/sharding.py DEFAULT_RULES, or use None for the defaults")
        if self.ssd_impl not in ssd_impls:
            bad("ssd_impl", "unknown SSD implementation", f"use one of {ssd_impls}")
        if self.remat not in REMAT_MODES:
            bad("remat", "unknown rematerialisation mode", f"use one of {REMAT_MODES}")
        from nemotron_jax.quant.dispatch import CONFIG_IMPLS as nvfp4_impls  # noqa: PLC0415
        if self.nvfp4_impl not in nvfp4_impls:
            bad("nvfp4_impl", "unknown NVFP4 quantizer implementation", f"use one of {nvfp4_impls}")
        lo, hi = self.time_step_limit
        if not (0.0 <= lo < hi):
            bad("time_step_limit", "needs 0 <= low < high", "use (0.0, inf) for training or (1e-3, inf) for HF parity")
        if not (0 < self.time_step_min <= self.time_step_max):
            bad("time_step_min", f"needs 0 < time_step_min <= time_step_max={self.time_step_max}",
                "Megatron uses 1e-3 and 0.1")
        if self.mlp_hidden_act != "relu2":
            bad("mlp_hidden_act", "only squared ReLU is implemented", "use 'relu2'")
        if self.mamba_hidden_act != "silu":
            bad("mamba_hidden_act", "only SiLU is implemented for the Mamba conv", "use 'silu'")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
            bad("max_position_embeddings", "must be a positive integer", "Nemotron 3 uses 262144")
        if self.mtp_enabled:
            if self.num_nextn_predict_layers != 1:
                bad("num_nextn_predict_layers", "only one shared-weight MTP block is supported",
                    "use 1 (the block is applied mtp_depths times) or 0")
            for i, c in enumerate(self.mtp_hybrid_override_pattern):
                if c not in LAYER_TYPES:
                    bad("mtp_hybrid_override_pattern", f"unknown layer character {c!r} at position {i}",
                        "use M, *, E or -; Nemotron 3 uses '*E'")

    # ------------------------------------------------------------------ presets
    @classmethod
    def nano_30b_a3b(cls, **overrides: Any) -> "ModelConfig":
        cfg = dict(
            vocab_size=131072, hidden_size=2688,
            hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
            num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=1856,
            mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
            n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
            moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
            num_nextn_predict_layers=0, initializer_range=0.0173,
        )
        return cls(**{**cfg, **overrides})

    @classmethod
    def super_120b_a12b(cls, **overrides: Any) -> "ModelConfig":
        cfg = dict(
            vocab_size=131072, hidden_size=4096,
            hybrid_override_pattern=("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
                                     "EMEMEMEM*EMEMEMEME"),
            num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=2688,
            mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
            n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
            moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
            num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", mtp_depths=2,
            mtp_loss_scaling_factor=0.3, initializer_range=0.014,
        )
        return cls(**{**cfg, **overrides})

    @classmethod
    def ultra_550b_a55b(cls, **overrides: Any) -> "ModelConfig":
        cfg = dict(
            vocab_size=131072, hidden_size=8192,
            hybrid_override_pattern=("MEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*"
                                     "EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"),
            num_attention_heads=64, num_key_value_heads=2, head_dim=128, intermediate_size=5120,
            mamba_num_heads=256, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
            n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=5120,
            moe_shared_expert_intermediate_size=10240, moe_latent_size=2048, routed_scaling_factor=5.0,
            num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", mtp_depths=2,
            mtp_loss_scaling_factor=0.1, initializer_range=0.0099, nvfp4_bf16_last_layers=16,
        )
        return cls(**{**cfg, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """Every layer type, byte vocabulary, well under 1M parameters: for unit tests and the CPU demo."""
        cfg = dict(
            vocab_size=256, hidden_size=64, hybrid_override_pattern="M*EM-E",
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=128, moe_latent_size=None, routed_scaling_factor=2.5,
            num_nextn_predict_layers=0, initializer_range=0.02, dtype="float32",
        )
        return cls(**{**cfg, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "ModelConfig":
        """A 20-50M parameter Super-shaped model (LatentMoE, MTP) that trains on a CPU."""
        cfg = dict(
            vocab_size=256, hidden_size=512, hybrid_override_pattern="MEM*EMEM*EM-",
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
            mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=4, conv_kernel=4, chunk_size=64,
            n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
            moe_shared_expert_intermediate_size=512, moe_latent_size=256, routed_scaling_factor=2.5,
            num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", mtp_depths=2,
            mtp_loss_scaling_factor=0.3, initializer_range=0.02, dtype="float32",
        )
        return cls(**{**cfg, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return getattr(cls, name)(**overrides)


PRESETS = ("nano_30b_a3b", "super_120b_a12b", "ultra_550b_a55b", "tiny", "small")
