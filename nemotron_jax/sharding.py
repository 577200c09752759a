"""Logical axis names used on parameters and activations, and default rules mapping them to mesh axes.

Rules are data: a tuple of (logical name, mesh axis or tuple of mesh axes or None). A logical name that maps
to a mesh axis absent from the mesh is left unsharded, so one rule set serves every mesh shape.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> what it is
LOGICAL_AXES = {
    "batch": "batch of sequences",
    "seq": "sequence positions",
    "vocab": "vocabulary",
    "embed": "hidden size d",
    "q_heads": "query heads x head_dim (flattened)",
    "kv_heads": "key/value heads x head_dim (flattened)",
    "mlp": "dense MLP / shared expert intermediate",
    "mamba_in": "Mamba in_proj outputs (z, x, B, C, dt)",
    "mamba_inner": "Mamba d_inner = heads x head_dim",
    "mamba_conv": "Mamba conv channels (x, B, C)",
    "mamba_heads": "Mamba heads",
    "conv_kernel": "conv taps",
    "expert": "routed experts",
    "expert_in": "routed expert input (latent or d)",
    "expert_mlp": "routed expert intermediate",
    "latent": "LatentMoE latent size",
    "router": "router output (experts), kept replicated",
    "mtp_concat": "MTP [embedding, hidden] concat (2d)",
}

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("mamba_in", None),
    ("mamba_inner", None),
    ("mamba_conv", None),
    ("mamba_heads", None),
    ("conv_kernel", None),
    ("expert", "expert"),
    ("expert_in", None),
    ("expert_mlp", "tensor"),
    ("latent", None),
    ("router", None),
    ("mtp_concat", None),
)


def logical_to_spec(axes: Sequence[str | None], rules: Sequence[tuple[str, object]] = DEFAULT_RULES,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor whose dims carry `axes`; mesh axes used twice are dropped after the first."""
    table: Mapping[str, object] = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(t for t in targets if (mesh_axes is None or t in mesh_axes) and t not in used)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*out)


def param_specs(state, rules=DEFAULT_RULES, mesh_axes=None):
    """Map an nnx.State (or abstract state) of Params to PartitionSpecs from their logical axis metadata."""
    from flax import nnx

    def spec(v):
        axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(axes, rules, mesh_axes)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
