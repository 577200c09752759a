"""Logical axis names used on parameters and activations, and default rules mapping them to mesh axes.

Rules are data: a tuple of (logical name, mesh axis or tuple of mesh axes or None). A logical name that maps
to a mesh axis absent from the mesh is left unsharded, so one rule set serves every mesh shape.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

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


def rules_of(cfg) -> tuple:
    """The rules a model runs under: its config's `sharding_rules`, or DEFAULT_RULES."""
    rules = getattr(cfg, "sharding_rules", None)
    return DEFAULT_RULES if rules is None else tuple((name, target) for name, target in rules)


def _divisible(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dim (tiny test models), keeping the rest of the spec."""
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)
        keep = tuple(a for a in axes if dim % math.prod(mesh.shape[b] for b in axes[: axes.index(a) + 1]) == 0)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*out)


def shardings(state, mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES):
    """The one sharding builder: NamedShardings for an nnx.State (params, other variables, or abstract ones)
    from each Variable's logical axes and `rules`; used by training, inference and tests alike."""
    from flax import nnx  # noqa: PLC0415

    def one(v):
        if isinstance(v, nnx.Variable) and v.get_value() is None:  # an empty slot (the rounding key): no leaves
            return v
        axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, rules, mesh.axis_names)
        return v.replace(NamedSharding(mesh, _divisible(spec, v.shape, mesh)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_axes(mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES) -> tuple[str, ...]:
    spec = logical_to_spec(("batch",), rules, mesh.axis_names)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def batch_sharding(mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules, mesh.axis_names))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Sequence[tuple[str, object]] = DEFAULT_RULES
              ) -> jax.Array:
    """`x` constrained to its logical axes under the current mesh (`jax.set_mesh`); unchanged without one.

    Block boundaries carry (batch, seq, embed): without them XLA guesses layouts between layers and can fall
    back to replicating whole activations (the "involuntary full rematerialization" at the embedding gather).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, _divisible(logical_to_spec(axes, rules, mesh.axis_names),
                                                          x.shape, mesh))
