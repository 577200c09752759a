import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.moe import moe_layers
from nemotron_jax.losses import total_loss
from nemotron_jax.train.optim import clip_by_global_norm, decays, make_optimizer, weight_decay_mask, wsd_schedule
from nemotron_jax.train.step import init_train_state, make_train_step


def _batch(cfg, b=2, t=16, seed=0):
    toks = jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size, jnp.int32)
    seg = jnp.concatenate([jnp.ones((b, t // 2), jnp.int32), 2 * jnp.ones((b, t - t // 2), jnp.int32)], 1)
    return {"tokens": toks, "segment_ids": seg, "loss_mask": jnp.ones((b, t), jnp.int32)}


def test_schedule_shape():
    s = wsd_schedule(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    lr = np.array([float(s(i)) for i in range(100)])
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(lr[10:80], 1.0)  # stable
    assert np.all(np.diff(lr[80:]) < 0) and lr[80] == 1.0  # decays from the peak
    np.testing.assert_allclose(lr[90], 0.1 + 0.9 * (1 - np.sqrt(0.5)), rtol=1e-6)  # minus-sqrt shape
    assert abs(float(s(100)) - 0.1) < 1e-6
    lin = wsd_schedule(1.0, 100, 10, 0.2, 0.0, decay_shape="linear")
    np.testing.assert_allclose(float(lin(90)), 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="decay_shape"):
        wsd_schedule(1.0, 100, 10, decay_shape="cosine")


def test_no_decay_mask():
    model = M.init_model(ModelConfig.tiny(num_nextn_predict_layers=1))
    params = nnx.state(model, nnx.Param)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(weight_decay_mask(params))}
    no = sorted(k for k, v in flat.items() if not v)
    # the oracle here is the names (the mask itself reads metadata set where each parameter is defined)
    exempt = ("A_log", "'D'", "dt_bias", "conv_bias", "['norm']", "['norm_f']", "['enorm']", "['hnorm']",
              "['final_layernorm']")
    assert no == sorted(k for k in flat if any(s in k for s in exempt)), no
    assert any("A_log" in k for k in no) and any("norm_f" in k for k in no) and any("enorm" in k for k in no)
    assert flat["['layers'][0]['mixer']['in_proj']['kernel'].value"]
    assert flat["['layers'][2]['mixer']['experts']['up_proj'].value"]


def test_decay_follows_the_parameter_role_not_its_name():
    from nemotron_jax.layers.common import param  # noqa: PLC0415

    class Renamed(nnx.Module):
        def __init__(self):
            self.A_log = param(jnp.ones((2,)), ("embed",))  # a name that used to mean "no decay"
            self.scale_xyz = param(jnp.ones((2,)), ("embed",), decay=False)

    mask = weight_decay_mask(nnx.state(Renamed(), nnx.Param))
    assert jax.tree.leaves(mask) == [True, False]
    assert decays(nnx.Param(jnp.ones(1))) and not decays(nnx.Param(jnp.ones(1), decay=False))


@pytest.mark.parametrize("scale", [0.1, 10.0])  # global norm below and above max_norm
def test_clip_matches_optax(scale):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    grads = {"w": scale * jax.random.normal(k1, (8, 5)), "b": scale * jax.random.normal(k2, (5,))}
    want = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
    clip = clip_by_global_norm(1.0)
    assert clip.init(grads) == optax.clip_by_global_norm(1.0).init(grads)  # same state: checkpoints carry over
    got = clip.update(grads, clip.init(grads))[0]
    given = clip.update(grads, clip.init(grads), global_norm=optax.tree.norm(grads))[0]
    for g, gv, w in zip(jax.tree.leaves(got), jax.tree.leaves(given), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6)  # t * (1 / n) vs optax's (t / n) * 1: last-bit rounding
        np.testing.assert_array_equal(gv, g)
    # a norm passed in is the norm used (the train step hands its own over): half of it scales by 2 / true norm
    half = clip.update(grads, clip.init(grads), global_norm=optax.tree.norm(grads) / 2)[0]
    expect = min(1.0, 2.0 / float(optax.tree.norm(grads)))
    np.testing.assert_allclose(half["w"], grads["w"] * expect, rtol=1e-6)


def test_step_takes_any_optax_optimizer():
    # a plain GradientTransformation (no extra arguments) gets no global_norm: the step calls it as optax would
    cfg = ModelConfig.tiny(hybrid_override_pattern="M*")
    opt = optax.GradientTransformation(optax.sgd(1e-2).init, lambda u, s, p=None: optax.sgd(1e-2).update(u, s, p))
    graphdef, state = init_train_state(M.init_model(cfg), opt, seed=0)
    new_state, metrics = jax.jit(make_train_step(cfg, graphdef, opt, lambda s: 1e-2))(state, _batch(cfg))
    assert int(new_state.step) == 1 and int(metrics["skipped"]) == 0


def test_one_step_equals_hand_assembled_update():
    cfg = ModelConfig.tiny(num_nextn_predict_layers=1, moe_router_bias_update_rate=0.01)
    model = M.init_model(cfg, seed=3)
    sched = wsd_schedule(1e-2, 10, 2)
    opt = make_optimizer(sched, weight_decay=0.1)
    graphdef, state = init_train_state(model, opt, seed=0)
    batch = _batch(cfg)
    new_state, metrics = jax.jit(make_train_step(cfg, graphdef, opt, sched))(state, batch)

    # by hand: the same loss, plain optax calls, and the bias rule b += rate * sign(mean - count)
    def loss_fn(p):
        out = M.apply(graphdef, (p, state.rest), batch["tokens"], segment_ids=batch["segment_ids"])
        return total_loss(cfg, out, batch["tokens"], batch["segment_ids"], batch["loss_mask"])[0], out

    (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
    clipped = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
    lr = float(sched(0))
    leaves_p = jax.tree.leaves(state.params)
    leaves_g = jax.tree.leaves(clipped)
    leaves_mask = jax.tree.leaves(weight_decay_mask(state.params))
    # first Adam step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected update = g / (|g| + eps')
    expect = []
    for p, g, decay in zip(leaves_p, leaves_g, leaves_mask):
        m_hat, v_hat = g, g * g
        upd = m_hat / (jnp.sqrt(v_hat) + 1e-8) + (0.1 * p if decay else 0.0)
        expect.append(p - lr * upd)
    got = jax.tree.leaves(new_state.params)
    for e, g_ in zip(expect, got):
        # Adam's first step is lr * g / (|g| + eps): where |g| ~ eps (rarely-used embedding rows) it amplifies
        # the ~1e-7 relative rounding difference between two compilations of the gradient, so allow 1e-3 * lr.
        np.testing.assert_allclose(g_, e, rtol=1e-5, atol=1e-3 * lr)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
    assert int(new_state.step) == 1

    counts = out.expert_loads
    old = {m.layer_idx: np.asarray(m.gate.e_score_correction_bias[...]) for m in moe_layers(model)}
    merged = nnx.merge(graphdef, new_state.params, new_state.rest)
    for layer in moe_layers(merged):
        c = np.asarray(counts[layer.layer_idx], np.float64)
        want = old[layer.layer_idx] + 0.01 * np.sign(c.mean() - c)
        np.testing.assert_allclose(np.asarray(layer.gate.e_score_correction_bias[...]), want, rtol=1e-6)
    # the MTP MoE layer (layer_idx = num layers + 1) sums its counts over both depths
    mtp_idx = cfg.num_hidden_layers + 1
    assert int(np.sum(counts[mtp_idx])) == 2 * 2 * 16 * cfg.num_experts_per_tok


def test_router_bias_is_not_optimized():
    cfg = ModelConfig.tiny()
    opt = make_optimizer(wsd_schedule(1e-2, 10, 2))
    graphdef, state = init_train_state(M.init_model(cfg), opt, seed=0)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    assert not any("e_score_correction_bias" in n for n in names)
    assert any("e_score_correction_bias" in jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_leaves_with_path(state.rest))
