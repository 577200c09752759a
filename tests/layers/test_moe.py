"""MoE on one device: router (hand examples), dropless dispatch vs a per-token loop, ragged_dot vs lax, balancing.

Tolerances: everything runs in fp32 with jax_default_matmul_precision=highest (conftest), so the only
differences from the oracles are summation order (sorting, grouped GEMM vs per-token dots): measured 1e-7 to
3e-7 of the largest value (seeds 0-6). RTOL, ATOL (rtol=1e-5, atol=1e-6 on O(1) values) stay where the
measured error takes 10-60% of that allowance (dropless gradients, ragged_dot vs lax; the hook test, which
came out identical, shares them with its ragged_dot sibling); the dropless forward has its own, tighter bound.
Hand-computed fp32 values are held to 4e-7 relative (~3 fp32 ulps; measured <= 0.7 ulp).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.moe import MoE, RouterBias, moe_layers, update_router_biases
from nemotron_jax.ops import moe_dispatch as md

RTOL, ATOL = 1e-5, 1e-6


def small_cfg(**kw):
    base = dict(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                moe_shared_expert_intermediate_size=12, initializer_range=0.3, routed_scaling_factor=2.5)
    return ModelConfig.tiny(**{**base, **kw})


# ----------------------------------------------------------------------------- router
def test_route_hand_example_bias_selects_weights_do_not():
    s = jnp.array([[0.9, 0.8, 0.1, 0.5]])
    bias = jnp.array([0.0, 0.0, 0.0, 0.5])  # biased: [0.9, 0.8, 0.1, 1.0] -> picks {3, 0}
    gates, idx = md.route(s, bias, k=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    assert sorted(idx[0].tolist()) == [0, 3]
    got = dict(zip(idx[0].tolist(), gates[0].tolist()))
    np.testing.assert_allclose([got[0], got[3]], [0.9 / 1.4 * 2.5, 0.5 / 1.4 * 2.5], rtol=4e-7)  # measured 5.7e-8
    # without the bias the plain top-2 is {0, 1}
    gates0, idx0 = md.route(s, jnp.zeros(4), k=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    assert sorted(idx0[0].tolist()) == [0, 1]
    np.testing.assert_allclose(sorted(gates0[0].tolist()), sorted([0.9 / 1.7 * 2.5, 0.8 / 1.7 * 2.5]), rtol=4e-7)
    # no renormalisation: raw unbiased scores times the scaling factor
    gates1, idx1 = md.route(s, bias, k=2, norm_topk_prob=False, routed_scaling_factor=2.5)
    got1 = dict(zip(idx1[0].tolist(), gates1[0].tolist()))
    np.testing.assert_allclose([got1[0], got1[3]], [0.9 * 2.5, 0.5 * 2.5], rtol=4e-7)


def test_router_module_sigmoid_fp32():
    cfg = small_cfg(hidden_size=4, n_routed_experts=4, dtype="bfloat16")
    m = MoE(cfg, rngs=nnx.Rngs(0))
    target = np.array([0.9, 0.8, 0.1, 0.5], np.float32)
    logits = np.log(target / (1 - target))
    m.gate.kernel[...] = jnp.asarray(np.stack([logits, np.zeros(4), np.zeros(4), np.zeros(4)]))
    m.gate.e_score_correction_bias[...] = jnp.array([0.0, 0.0, 0.0, 0.5])
    h = jnp.array([[[1.0, 0.0, 0.0, 0.0]]], jnp.bfloat16)
    gates, idx, s = m.gate(h)
    assert s.dtype == gates.dtype == jnp.float32
    np.testing.assert_allclose(s[0, 0], target, rtol=4e-7)  # measured identical
    assert sorted(idx[0, 0].tolist()) == [0, 3]
    np.testing.assert_allclose(gates[0, 0].sum(), 2.5, rtol=4e-7)


def test_group_limited_routing_hand_example():
    # 8 experts, 4 groups of 2; group score = sum of top-2 biased scores:
    # g0 [.90, .10] = 1.00, g1 [.60, .60] = 1.20, g2 [.55, .50] = 1.05, g3 [.20, .20] = 0.40
    s = jnp.array([[0.90, 0.10, 0.60, 0.60, 0.55, 0.50, 0.20, 0.20]])
    zero = jnp.zeros(8)
    assert sorted(md.select_experts(s, zero, 2)[0].tolist()) in ([0, 2], [0, 3])  # ungrouped: 0.9 wins
    # topk_group=2 keeps g1, g2 -> expert 0 (0.9) is masked out; top-2 of {2,3,4,5} = {2,3}
    assert sorted(md.select_experts(s, zero, 2, n_group=4, topk_group=2)[0].tolist()) == [2, 3]
    assert sorted(md.select_experts(s, zero, 3, n_group=4, topk_group=2)[0].tolist()) == [2, 3, 4]
    # the bias enters the group scores: +0.3 on expert 1 lifts g0 to 1.3 > g1 -> groups g0, g1
    bias = jnp.zeros(8).at[1].set(0.3)
    assert sorted(md.select_experts(s, bias, 2, n_group=4, topk_group=2)[0].tolist()) in ([0, 2], [0, 3])
    assert sorted(md.select_experts(s, bias, 4, n_group=4, topk_group=2)[0].tolist()) == [0, 1, 2, 3]
    # gates still come from unbiased scores of the chosen experts
    gates, idx = md.route(s, zero, k=2, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    np.testing.assert_allclose(gates[0], [0.5, 0.5], rtol=4e-7)


# ----------------------------------------------------------------------------- dropless vs loop
def _params(m: MoE):
    p = {"router": m.gate.kernel[...], "up": m.experts.up_proj[...], "down": m.experts.down_proj[...],
         "s_up": m.shared_experts.up_proj.kernel[...], "s_down": m.shared_experts.down_proj.kernel[...]}
    if m.fc1_latent_proj is not None:
        p["fc1"] = m.fc1_latent_proj.kernel[...]
        p["fc2"] = m.fc2_latent_proj.kernel[...]
    return p


def _loop_reference(p, h, bias, idx, cfg):
    """Per token, per chosen expert, written out; idx (no gradient) is chosen by the caller in numpy."""
    hp = jax.lax.Precision.HIGHEST
    b, t, d = h.shape
    x = h.reshape(b * t, d)
    s = jax.nn.sigmoid(jnp.dot(x, p["router"], precision=hp))
    u = jnp.dot(x, p["fc1"], precision=hp) if "fc1" in p else x
    rows = []
    for n in range(b * t):
        chosen = [int(e) for e in idx[n]]
        g = jnp.stack([s[n, e] for e in chosen])
        g = g / (g.sum() + 1e-20) * cfg.routed_scaling_factor
        acc = 0.0
        for j, e in enumerate(chosen):
            hid = jnp.square(jax.nn.relu(jnp.dot(u[n], p["up"][e], precision=hp)))
            acc = acc + g[j] * jnp.dot(hid, p["down"][e], precision=hp)
        rows.append(acc)
    r = jnp.stack(rows)
    if "fc2" in p:
        r = jnp.dot(r, p["fc2"], precision=hp)
    sh = jnp.dot(jnp.square(jax.nn.relu(jnp.dot(x, p["s_up"], precision=hp))), p["s_down"], precision=hp)
    return (r + sh).reshape(b, t, d)


@pytest.mark.parametrize("latent", [None, 8])
def test_dropless_matches_loop_forward_and_grads(latent):
    cfg = small_cfg(moe_latent_size=latent)
    m = MoE(cfg, rngs=nnx.Rngs(1))
    bias = jax.random.normal(jax.random.key(7), (cfg.n_routed_experts,)) * 0.2  # makes bias matter
    m.gate.e_score_correction_bias[...] = bias
    h = jax.random.normal(jax.random.key(2), (2, 3, cfg.hidden_size))
    probe = jax.random.normal(jax.random.key(3), (2, 3, cfg.hidden_size))

    # selection computed independently in numpy: top-k of sigmoid(h W) + bias
    s_np = 1 / (1 + np.exp(-(np.asarray(h).reshape(6, -1).astype(np.float64) @ np.asarray(m.gate.kernel[...]))))
    idx = np.argsort(-(s_np + np.asarray(bias)), axis=-1)[:, :cfg.num_experts_per_tok]

    y, _, aux = nnx.jit(lambda m, h: m(h))(m, h)
    y_ref = jax.jit(lambda p, h: _loop_reference(p, h, bias, idx, cfg))(_params(m), h)
    # measured max |err| 4.8e-7 on outputs up to ~2.8 (seeds 0-6, both variants): at most 0.2 of this bound (5x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=2.5e-7)
    np.testing.assert_array_equal(aux["expert_counts"], np.bincount(idx.ravel(), minlength=cfg.n_routed_experts))
    assert int(aux["dropped"]) == 0

    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss_mod(params, h):
        y, _, _ = nnx.merge(graphdef, params, rest)(h)
        return jnp.sum(y * probe)

    g_params, g_h = jax.jit(jax.grad(loss_mod, argnums=(0, 1)))(params, h)
    m_g = nnx.merge(graphdef, g_params, rest)
    ref_g_params, ref_g_h = jax.jit(jax.grad(lambda p, h: jnp.sum(_loop_reference(p, h, bias, idx, cfg) * probe),
                                             argnums=(0, 1)))(_params(m), h)
    got = _params(m_g)
    assert set(got) == set(ref_g_params)
    for name in got:
        scale = float(jnp.abs(ref_g_params[name]).max())
        np.testing.assert_allclose(got[name], ref_g_params[name], rtol=RTOL, atol=ATOL * max(scale, 1.0),
                                   err_msg=name)
    np.testing.assert_allclose(g_h, ref_g_h, rtol=RTOL, atol=ATOL)


def test_ragged_dot_matches_lax_reference():
    x = jax.random.normal(jax.random.key(0), (12, 6))
    w = jax.random.normal(jax.random.key(1), (4, 6, 5))
    gs = jnp.array([3, 0, 7, 2], jnp.int32)  # includes an empty group
    y, vjp = jax.vjp(lambda a, b: md.default_ragged_dot(a, b, gs), x, w)
    y_ref, vjp_ref = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    ct = jax.random.normal(jax.random.key(2), y.shape)
    for a, b in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # the whole expert MLP through the default path vs lax.ragged_dot
    w_down = jax.random.normal(jax.random.key(3), (4, 5, 6))
    np.testing.assert_allclose(md.expert_mlp(x, w, w_down, gs),
                               md.expert_mlp(x, w, w_down, gs, md.reference_ragged_dot), rtol=RTOL, atol=ATOL)


def test_ragged_dot_hook_is_used():
    cfg = small_cfg()
    m = MoE(cfg, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(2), (2, 3, cfg.hidden_size))
    y0, _, _ = m(h)
    calls = []

    def hook(x, w, gs):
        calls.append(x.shape)
        return jax.lax.ragged_dot(x, w, gs)

    m.experts.ragged_dot = hook
    y1, _, _ = m(h)
    assert len(calls) == 2  # up and down
    np.testing.assert_allclose(y1, y0, rtol=RTOL, atol=ATOL)


def test_bfloat16_compute_keeps_router_fp32():
    cfg = small_cfg(dtype="bfloat16", moe_latent_size=8)
    m = MoE(cfg, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(2), (2, 3, cfg.hidden_size), jnp.bfloat16)
    y, _, aux = m(h)
    assert y.dtype == jnp.bfloat16 and aux["aux_loss"].dtype == jnp.float32
    y32, _, _ = MoE(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0))(h.astype(jnp.float32))
    # bf16 has 8 mantissa bits: each rounding (latent, up, relu^2, down, gate product, shared + routed sum) is
    # <= 2^-8 = 0.4% relative. Measured max |diff| 0.92% of max|y32| (seeds 0-6); 2% (~5 aligned roundings) is 4x.
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2e-2, atol=2e-2 * float(jnp.abs(y32).max()))


# ----------------------------------------------------------------------------- load balancing
def test_update_router_bias_hand():
    b = md.update_router_bias(jnp.zeros(4), jnp.array([3, 1, 2, 2]), 1e-3)
    np.testing.assert_allclose(b, [-1e-3, 1e-3, 0.0, 0.0])


def test_bias_update_moves_load_toward_balance():
    e, k = 8, 2
    h = jax.random.normal(jax.random.key(0), (256, 16))
    kernel = jax.random.normal(jax.random.key(1), (16, e)) * 0.3
    skew = jnp.array([2.0, 1.5, 1.0, 0.0, 0.0, -0.5, -1.0, -1.5])
    scores = jax.nn.sigmoid(h @ kernel + skew)  # experts 0-2 get most tokens

    @jax.jit
    def step(bias, _):
        _, idx = md.route(scores, bias, k=k)
        counts = md.expert_counts(idx, e)
        return md.update_router_bias(bias, counts, 0.01), md.load_stats(counts)["max_over_mean"]

    _, ratios = jax.lax.scan(step, jnp.zeros(e), None, length=150)
    assert ratios[0] > 2.5, ratios[0]
    assert ratios[-20:].max() < 1.4, ratios[-20:]
    assert ratios[-20:].mean() < 0.5 * ratios[0]


def test_sequence_aux_loss_hand():
    # one sequence, T=2, E=3, k=1: picks expert 0 then 1 -> f = [.5, .5, 0]
    # P = mean_t(s/sum s) = mean([.8,.1,.1], [.2,.6,.2]) = [.5, .35, .15]; E*sum f P = 3 * .425 = 1.275
    s1 = jnp.array([[[0.8, 0.1, 0.1], [0.2, 0.6, 0.2]]])
    np.testing.assert_allclose(md.sequence_aux_loss(s1, 1), 1.275, rtol=4e-7)  # measured 7.5e-8
    # rows whose scores do not sum to 1: P normalises each row first
    # k=2 picks {0,1} in both rows (row 1 is [.9,.35,.25], sum 1.5)
    s2 = jnp.array([[[0.4, 0.4, 0.2], [0.9, 0.35, 0.25]]])
    p = (np.array([0.4, 0.4, 0.2]) + np.array([0.9, 0.35, 0.25]) / 1.5) / 2
    f = np.array([2, 2, 0]) / 4
    np.testing.assert_allclose(md.sequence_aux_loss(s2, 2), 3 * (f * p).sum(), rtol=4e-7)
    both = jnp.concatenate([s1, s1], 0)
    np.testing.assert_allclose(md.sequence_aux_loss(both, 1), 1.275, rtol=4e-7)  # mean over sequences


def test_module_aux_loss_ignores_bias_and_has_coeff():
    cfg = small_cfg(moe_aux_loss_coeff=0.5)
    m = MoE(cfg, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(2), (2, 5, cfg.hidden_size))
    _, _, aux0 = m(h)
    s = m.gate.scores(h)
    np.testing.assert_allclose(aux0["aux_loss"], 0.5 * md.sequence_aux_loss(s, cfg.num_experts_per_tok), rtol=1e-6)
    m.gate.e_score_correction_bias[...] = jnp.arange(8.0)  # changes selection, not the aux loss
    _, _, aux1 = m(h)
    np.testing.assert_allclose(aux1["aux_loss"], aux0["aux_loss"], rtol=1e-6)
    assert not np.array_equal(aux1["expert_counts"], aux0["expert_counts"])


class _TwoMoE(nnx.Module):
    def __init__(self, cfg, rngs):
        self.blocks = nnx.List([MoE(cfg, rngs=rngs, layer_idx=4), MoE(cfg, rngs=rngs, layer_idx=1)])


def test_update_router_biases_on_model_and_bias_is_not_a_param():
    cfg = small_cfg(moe_router_bias_update_rate=0.1)
    model = _TwoMoE(cfg, nnx.Rngs(0))
    assert [m.layer_idx for m in moe_layers(model)] == [1, 4]
    assert len(jax.tree.leaves(nnx.state(model, RouterBias))) == 2
    assert all(not isinstance(v, RouterBias) for v in jax.tree.leaves(nnx.state(model, nnx.Param),
                                                                     is_leaf=lambda x: isinstance(x, nnx.Variable)))
    counts = jnp.array([4, 0, 2, 2, 2, 2, 2, 2])
    update_router_biases(model, {4: counts})
    # exact in fp32: the only difference from the decimal values is fp32(0.1) / fp32(0.9) itself (<= 2.7e-8 rel)
    np.testing.assert_allclose(model.blocks[0].gate.e_score_correction_bias[...],
                               [-0.1, 0.1, 0, 0, 0, 0, 0, 0], rtol=1e-7, atol=0)
    np.testing.assert_allclose(model.blocks[1].gate.e_score_correction_bias[...], np.zeros(8))
    update_router_biases(model, [counts, -counts], rate=1.0)  # sequence in ascending layer_idx: [1, 4]
    np.testing.assert_allclose(model.blocks[1].gate.e_score_correction_bias[...], [-1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(model.blocks[0].gate.e_score_correction_bias[...],
                               [0.9, -0.9, 0, 0, 0, 0, 0, 0], rtol=1e-7, atol=0)


def test_init_scales():
    cfg = small_cfg(initializer_range=0.02, hidden_size=64, moe_intermediate_size=64, n_routed_experts=16,
                    moe_shared_expert_intermediate_size=128, moe_latent_size=32)
    m = MoE(cfg, rngs=nnx.Rngs(0))
    out_std = 0.02 / np.sqrt(2 * cfg.num_hidden_layers)
    # The sample std of n normal draws has relative standard error 1/sqrt(2n): each bound is >= ~5 standard
    # errors (measured deviations over seeds 0-6 were <= 1.6 standard errors).
    np.testing.assert_allclose(np.std(m.experts.up_proj[...]), 0.02, rtol=0.02)  # n=32768: SE 0.4%
    np.testing.assert_allclose(np.std(m.gate.kernel[...]), 0.02, rtol=0.1)  # n=1024: SE 2.2%
    np.testing.assert_allclose(np.std(m.experts.down_proj[...]), out_std, rtol=0.02)  # n=32768
    np.testing.assert_allclose(np.std(m.shared_experts.down_proj.kernel[...]), out_std, rtol=0.04)  # n=8192: SE 0.8%
    np.testing.assert_allclose(np.std(m.fc2_latent_proj.kernel[...]), out_std, rtol=0.1)  # n=2048: SE 1.6%
    assert m.experts.up_proj[...].shape == (16, 32, 64) and m.experts.down_proj[...].shape == (16, 64, 32)
    assert float(jnp.abs(m.gate.e_score_correction_bias[...]).max()) == 0.0
