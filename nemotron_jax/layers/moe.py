"""MoE / LatentMoE block mixer (spec section 2): fp32 sigmoid router with correction bias, dropless routed
squared-ReLU experts (grouped GEMMs via ragged_dot, or expert-parallel all-to-all on a mesh), shared expert.

`MoE(cfg, rngs=...)(h_btd) -> (y_btd, None, aux)` (the mixer call shape; token-wise, no cache), h the pre-normed block input; y = routed + shared (the residual
block adds x). Parameter names follow HF NemotronH (gate, experts.up_proj/down_proj, shared_experts,
fc1_latent_proj / fc2_latent_proj) so a converter maps them one to one (HF stores [out, in]; we store [in, out]).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.common import Linear, Site, dtype_of, normal_init, param
from nemotron_jax.layers.mlp import MLP, out_proj_std
from nemotron_jax.ops import expert_parallel as ep_ops
from nemotron_jax.ops import moe_dispatch as md
from nemotron_jax.quant import packed
from nemotron_jax.sharding import rules_of


class RouterBias(nnx.Variable):
    """The aux-loss-free correction bias: model state, not an nnx.Param, so the optimizer never sees it.

    Changed only by `update_router_biases` (b_i += rate * sign(mean_load - load_i)) outside the gradient.
    """


class Router(nnx.Module):
    """kernel [d, e] fp32 (axes embed, router); e_score_correction_bias [e] (RouterBias, zeros)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e = cfg.hidden_size, cfg.n_routed_experts
        self.kernel = param(normal_init(cfg.initializer_range)(rngs.params(), (d, e), jnp.float32),
                            ("embed", "router"))
        self.e_score_correction_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=("router",),
                                                  eager_sharding=False)

    def scores(self, h: jax.Array) -> jax.Array:
        return md.router_scores(h, self.kernel[...])

    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gates [.., k] fp32, idx [.., k] int32, unbiased scores [.., e] fp32)."""
        cfg = self.cfg
        s = self.scores(h)
        gates, idx = md.route(s, self.e_score_correction_bias[...], k=cfg.num_experts_per_tok,
                              n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                              routed_scaling_factor=cfg.routed_scaling_factor)
        return gates, idx, s


class RoutedExperts(nnx.Module):
    """Stacked non-gated relu^2 experts: up_proj [e, i, m], down_proj [e, m, i] (i = latent size or d); or,
    loaded with `from_hf(..., dequantize=False)`, inference-only packed NVFP4 stacks in HF's [e, out, in]
    layout (`quant.packed.NVFP4Weight`), dequantized inside the jitted forward (`weights`).

    `ragged_dot` is the grouped GEMM the precision policy picked where the layer was built: None
    (`moe_dispatch.default_ragged_dot`) or a quantized one, fn(x_mk, w_gkn, group_sizes_g, state=key, shard=i).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, site: Site = Site()):
        e, i, m = cfg.n_routed_experts, cfg.moe_expert_input_size, cfg.moe_intermediate_size
        pdt = dtype_of(cfg.param_dtype)
        self.ragged_dot = None
        if site.cfg is not None and site.cfg.precision != "bf16":
            from nemotron_jax.quant.policy import ragged_dot_for  # noqa: PLC0415
            self.ragged_dot = ragged_dot_for(site.cfg, site.layer_idx, site.path)
        fmt = self.ragged_dot.fmt if self.ragged_dot is not None else None
        self.up_proj = param(normal_init(cfg.initializer_range)(rngs.params(), (e, i, m), pdt),
                             ("expert", "expert_in", "expert_mlp"), quant=fmt)
        self.down_proj = param(normal_init(out_proj_std(cfg))(rngs.params(), (e, m, i), pdt),
                               ("expert", "expert_mlp", "expert_in"), quant=fmt)
        self.dtype = dtype_of(cfg.dtype)
        self.quant_key = site.quant_key if self.ragged_dot is not None else None

    @property
    def grouped_gemm(self) -> md.RaggedDot:
        return self.ragged_dot if self.ragged_dot is not None else md.default_ragged_dot

    @property
    def is_packed(self) -> bool:
        """True when the stacked weights are inference-only packed NVFP4 (`from_hf(..., dequantize=False)`)."""
        return isinstance(self.up_proj, packed.NVFP4Weight) or isinstance(self.down_proj, packed.NVFP4Weight)

    def weights(self, dtype) -> tuple[jax.Array, jax.Array]:
        """(up [e, i, m], down [e, m, i]) in `dtype`. A packed NVFP4 stack (HF's [e, out, in] codes, blocks along
        `in`) is dequantized here, inside the jitted forward, in fp32 then cast: the values the
        dequantize-at-load model holds, so the grouped GEMM and its output are the same."""
        return tuple(packed.dequantize_stacked(w.get_value(), dtype) if isinstance(w, packed.NVFP4Weight)
                     else w[...].astype(dtype) for w in (self.up_proj, self.down_proj))


class MoE(nnx.Module):
    """Routed (optionally latent) experts + shared expert. `layer_idx` keys this layer's bias update.

    `mesh`: an explicit Mesh for expert/data parallel dispatch; None uses the mesh of `jax.set_mesh` if any.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer_idx: int = 0, mesh=None, site: Site = Site()):
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.mesh = mesh
        self.dtype = dtype_of(cfg.dtype)
        kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype))
        self.gate = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, rngs=rngs, site=site.child("experts"))
        has_shared = cfg.n_shared_experts > 0 and cfg.moe_shared_expert_intermediate_size > 0
        # the shared expert is a dense relu^2 MLP on the full-width h
        self.shared_experts = (MLP(cfg, rngs=rngs, intermediate_size=cfg.moe_shared_expert_intermediate_size,
                                   site=site.child("shared_experts"), roles=("moe.shared", "moe.shared"))
                               if has_shared else None)
        if cfg.moe_latent_size is not None:
            d, lat = cfg.hidden_size, cfg.moe_latent_size
            self.fc1_latent_proj = Linear(d, lat, axes=("embed", "latent"), std=cfg.initializer_range, **kw,
                                          **site.linear("moe.latent", "fc1_latent_proj"))
            self.fc2_latent_proj = Linear(lat, d, axes=("latent", "embed"), std=out_proj_std(cfg), **kw,
                                          **site.linear("moe.latent", "fc2_latent_proj"))
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def _mesh(self):
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        sizes = ep_ops.mesh_axis_sizes(mesh)
        return mesh if sizes and math.prod(sizes.values()) > 1 else None

    def __call__(self, h_btd: jax.Array, *, segment_ids=None, cache=None,
                 index=None) -> tuple[jax.Array, None, dict[str, jax.Array]]:
        cfg = self.cfg
        b, t, _ = h_btd.shape
        k = cfg.num_experts_per_tok
        gates_btk, idx_btk, scores_bte = self.gate(h_btd)
        aux_loss = cfg.moe_aux_loss_coeff * md.sequence_aux_loss(scores_bte, k)

        x = h_btd.astype(self.dtype)
        u = self.fc1_latent_proj(x) if self.fc1_latent_proj is not None else x
        u_ni = u.reshape(b * t, -1)
        gates_nk, idx_nk = gates_btk.reshape(b * t, k), idx_btk.reshape(b * t, k)
        w_up, w_down = self.experts.weights(self.dtype)
        gemm = self.experts.grouped_gemm
        # the quantized GEMM's state: this step's rounding key (None outside a training step)
        key = self.experts.quant_key.get_value() if self.experts.quant_key is not None else None
        mesh = self._mesh()
        if mesh is None:
            if key is not None:
                gemm = functools.partial(gemm, state=key)
            r_ni, counts = md.dropless_experts(u_ni, idx_nk, gates_nk, w_up, w_down, gemm)
            dropped = jnp.zeros((), jnp.int32)
        else:
            r_ni, counts, dropped = ep_ops.sharded_experts(
                u_ni, idx_nk, gates_nk, w_up, w_down, mesh=mesh,
                capacity_factor=cfg.moe_capacity_factor, ragged_dot=gemm, gemm_state=key, rules=rules_of(cfg))
        if self.experts.is_packed:
            r_ni = packed.inference_only(r_ni)  # no backward through packed weights (PackedWeightError)
        r = r_ni.reshape(b, t, -1)
        if self.fc2_latent_proj is not None:
            r = self.fc2_latent_proj(r)
        y = r if self.shared_experts is None else r + self.shared_experts.ffn(x)
        aux = {"aux_loss": aux_loss, "expert_counts": counts, "dropped": dropped}
        return y.astype(self.dtype), None, aux


# ----------------------------------------------------------------------------- load balancing helpers
def moe_layers(model: nnx.Module) -> list[MoE]:
    """Every distinct MoE module under `model`, sorted by layer_idx (a shared MTP MoE appears once)."""
    found = [node for _, node in nnx.iter_graph(model) if isinstance(node, MoE)]
    unique = list({id(m): m for m in found}.values())
    return sorted(unique, key=lambda m: m.layer_idx)


def update_router_biases(model: nnx.Module, counts: Mapping[int, jax.Array] | Sequence[jax.Array],
                         rate: float | None = None) -> None:
    """In place, outside the gradient: each MoE layer's bias b += rate * sign(mean(counts) - counts).

    counts: {layer_idx: expert_counts [e]} (sum the counts of a layer applied several times, e.g. MTP depths,
    before calling), or a sequence aligned with `moe_layers(model)` (ascending layer_idx). rate defaults to
    cfg.moe_router_bias_update_rate; a rate of 0 leaves the biases unchanged.
    """
    layers = moe_layers(model)
    if isinstance(counts, Mapping):
        by_idx = {m.layer_idx: m for m in layers}
        if len(by_idx) != len(layers):
            raise ValueError("two MoE modules share a layer_idx; give each its own or pass counts as a sequence")
        missing = set(counts) - set(by_idx)
        if missing:
            raise KeyError(f"counts for layer_idx {sorted(missing)} but the model's MoE layers are {sorted(by_idx)}")
        pairs = [(by_idx[i], c) for i, c in counts.items()]
    else:
        counts = list(counts)
        if len(counts) != len(layers):
            raise ValueError(f"{len(counts)} count vectors for {len(layers)} MoE layers")
        pairs = list(zip(layers, counts))
    for layer, c in pairs:
        r = layer.cfg.moe_router_bias_update_rate if rate is None else rate
        bias = layer.gate.e_score_correction_bias
        bias[...] = md.update_router_bias(bias[...], jax.lax.stop_gradient(c), r)
