"""Low-precision formats and the NVFP4 training recipe (spec section 4).

nvfp4       NVFP4 jnp reference: quantize / dequantize / qdq, RHT, stochastic rounding
mxfp8       MXFP8 reference (E4M3, 32-blocks, E8M0 scales)
dispatch    qdq(impl="auto"|"reference"|"pallas"): Pallas kernel on GPU, reference elsewhere
recipe      custom_vjp GEMMs: nvfp4_matmul, nvfp4_ragged_dot, mxfp8_matmul, NVFP4Recipe
policy      which linear runs in which format, from a ModelConfig
diagnostics flush-to-zero fraction and relative error per tensor
"""

from nemotron_jax.quant import diagnostics, dispatch, mxfp8, nvfp4, policy, recipe
from nemotron_jax.quant.dispatch import qdq
from nemotron_jax.quant.nvfp4 import NVFP4Tensor, dequantize, quantize
from nemotron_jax.quant.policy import format_precision_table, linear_format, precision_table
from nemotron_jax.quant.recipe import (NVFP4Recipe, mxfp8_matmul, nvfp4_matmul, nvfp4_ragged_dot,
                                       quantizer_key)

__all__ = ["NVFP4Recipe", "NVFP4Tensor", "dequantize", "diagnostics", "dispatch", "format_precision_table",
           "linear_format", "mxfp8", "mxfp8_matmul", "nvfp4", "nvfp4_matmul", "nvfp4_ragged_dot",
           "policy", "precision_table", "qdq", "quantize", "quantizer_key", "recipe"]
