"""Activations shared by the dense MLP, the shared expert and the routed experts."""

import jax
import jax.numpy as jnp


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU (Nemotron 3's `relu2`): relu(x)^2, non-gated."""
    return jnp.square(jax.nn.relu(x))
