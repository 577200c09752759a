"""Activations by config name (`mlp_hidden_act` for the MLP, shared and routed experts; `mamba_hidden_act` for the
Mamba conv output)."""

import jax
import jax.numpy as jnp


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU (Nemotron 3's `relu2`): relu(x)^2, non-gated."""
    return jnp.square(jax.nn.relu(x))


ACTIVATIONS = {"relu2": relu2, "silu": jax.nn.silu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
