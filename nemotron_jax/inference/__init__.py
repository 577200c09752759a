"""Inference: decode caches, cached batched generation, sampling, MTP speculative decoding, chat, loading runs."""

from nemotron_jax.inference.engine import GenerationResult, decode_step, generate, prefill
from nemotron_jax.inference.sampling import Sampling

__all__ = ["GenerationResult", "Sampling", "decode_step", "generate", "prefill"]
