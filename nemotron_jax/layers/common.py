"""Parameters with logical axis names, and the plain linear every layer builds on."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.ops import matmul
from nemotron_jax.quant import packed

# Sharding is decided later from these names (nemotron_jax.sharding); creating a param never shards eagerly.
Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Sequence[str | None], *, decay: bool = True, quant: str | None = None) -> nnx.Param:
    """An nnx.Param whose metadata carries its logical axis names (one per dim) and its roles.

    decay=False: no weight decay (Mamba's per-head dynamics, norm scales, biases). quant: the low-precision
    format its GEMM runs in ("nvfp4", "mxfp8"; None: the compute dtype). The optimizer and the diagnostics read
    this metadata (`train.optim.weight_decay_mask`, `quant.diagnostics`), never the parameter's name.
    """
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"param of shape {value.shape} needs {value.ndim} axis names, got {axes}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, decay=decay, quant=quant)


def normal_init(std: float) -> Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]:
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)
    return init


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class QuantKey(nnx.Variable):
    """The stochastic-rounding key of the current step (a raw PRNG key), shared by every quantized GEMM of a
    model; None outside a training step. `NemotronModel.forward(..., quant_key=key)` sets it, like drawing from
    an nnx.Rngs stream once per step. Not a parameter: the optimizer never sees it, checkpoints hold nothing."""


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a module is built: the model config, its block's layer_idx (None in the MTP block), its path in
    the model, and the model's stochastic-rounding key variable. A linear built at a site asks the precision
    policy for its GEMM there and then; nothing is patched on afterwards. `Site()` (no config) is plain bf16."""

    cfg: Any = None
    layer_idx: int | None = None
    path: str = ""
    quant_key: Any = None  # the QuantKey shared by the whole model, or None

    def child(self, name: str) -> "Site":
        return dataclasses.replace(self, path=f"{self.path}.{name}" if self.path else name)

    def linear(self, role: str, name: str) -> dict:
        """Linear(...) keywords for the linear `name` of `role` here: the GEMM the precision policy picks
        (quant.policy.gemm_for; None is plain x @ W) and, for a quantized one, the model's rounding key."""
        if self.cfg is None or self.cfg.precision == "bf16":
            return {"gemm": None, "quant_key": None}
        from nemotron_jax.quant.policy import gemm_for  # noqa: PLC0415
        g = gemm_for(self.cfg, self.layer_idx, role, self.child(name).path)
        return {"gemm": g, "quant_key": self.quant_key if g is not None else None}


class Linear(nnx.Module):
    """y = x @ W (+ b); W is [in, out] fp32 master, cast to the compute dtype at call time.

    The kernel may instead be an inference-only packed NVFP4 weight (`quant.packed.NVFP4Weight`, HF's
    [out, in] layout, set by `from_hf(..., dequantize=False)`), dequantized inside the GEMM.

    `gemm` (from the precision policy, chosen where the linear is built) replaces x @ W, e.g. with the NVFP4
    recipe; its kernel then carries `quant=<format>` metadata. `quant_key` is the model's rounding-key variable.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 rngs: nnx.Rngs, std: float = 0.02, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, gemm=None, quant_key=None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(normal_init(std)(rngs.params(), (in_features, out_features), param_dtype), axes,
                            quant=gemm.fmt if gemm is not None else None)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],), decay=False) if use_bias else None
        self.gemm = gemm
        self.quant_key = quant_key

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if isinstance(self.kernel, packed.NVFP4Weight):
            # inference-only packed NVFP4 kernel in HF's [out, in] layout (from_hf(..., dequantize=False)):
            # dequantized inside the GEMM (quant/packed.py); the reference equals the dequantized model's GEMM
            y = packed.dequant_matmul(x, self.kernel.get_value(), dtype=self.dtype,
                                      impl=getattr(self.kernel, "impl", packed.DEFAULT_IMPL))
            if self.bias is not None:
                y = y + self.bias[...].astype(self.dtype)
            return y
        w = self.kernel[...].astype(self.dtype)
        if self.gemm is not None:
            key = self.quant_key.get_value() if self.quant_key is not None else None
            y = self.gemm(x, w, key)
        else:
            y = matmul.dense(x, w)  # one flattened GEMM; bf16 operands widened where that is faster
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
