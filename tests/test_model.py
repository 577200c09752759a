import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.losses import cross_entropy, shifted_targets


@pytest.fixture(scope="module")
def tiny():
    return ModelConfig.tiny()


def _tokens(cfg, b=2, t=24, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size, dtype=jnp.int32)


def test_forward_shapes_dtypes_finite(tiny):
    model = M.init_model(tiny, seed=0)
    toks = _tokens(tiny)
    out = model.forward(toks)
    assert out.logits.shape == (2, 24, tiny.vocab_size) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (2, 24, tiny.hidden_size)
    assert len(out.moe_aux) == tiny.hybrid_override_pattern.count("E")
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert model(toks).shape == (2, 24, tiny.vocab_size)


def test_jit_equals_eager_through_pure_boundary(tiny):
    model = M.init_model(tiny, seed=1)
    toks = _tokens(tiny, seed=1)
    eager = model(toks)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, t: M.apply(graphdef, s, t).logits)(state, toks)
    # Same fp32 graph, jit vs op-by-op: only fusion-order rounding differs.
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_fp32_params(tiny):
    cfg = tiny.replace(dtype="bfloat16")
    model = M.init_model(cfg, seed=2)
    out = model.forward(_tokens(cfg))
    assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in leaves)
    ref = M.init_model(tiny, seed=2)(_tokens(cfg))
    # bf16 activations (8 mantissa bits) through 6 layers: logits agree to a few 1e-2.
    np.testing.assert_allclose(out.logits, ref, atol=5e-2)


def test_every_param_has_logical_axes(tiny):
    model = M.abstract_model(tiny.replace(num_nextn_predict_layers=1))
    for path, v in jax.tree.leaves_with_path(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(v.shape), path


def test_tiny_is_small_and_fast(tiny):
    model = M.init_model(tiny)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n < 1_000_000
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t: M.apply(graphdef, s, t).logits)
    toks = _tokens(tiny, b=1, t=64)
    f(state, toks).block_until_ready()
    t0 = time.perf_counter()
    f(state, toks).block_until_ready()
    assert time.perf_counter() - t0 < 0.5


def test_segment_ids_separate_documents(tiny):
    model = M.init_model(tiny, seed=3)
    toks = _tokens(tiny, b=1, t=20, seed=4)
    seg = jnp.array([[0] * 8 + [1] * 12])
    packed = model(toks, segment_ids=seg)
    # MoE routing is per token, Mamba and attention are masked: each document alone gives the same logits.
    np.testing.assert_allclose(packed[:, :8], model(toks[:, :8]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(packed[:, 8:], model(toks[:, 8:]), rtol=1e-4, atol=1e-4)


def test_tiny_overfits_one_batch(tiny):
    """A real learning check: loss on one fixed batch falls by more than half within 100 Adam steps."""
    model = M.init_model(tiny, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    toks = _tokens(tiny, b=4, t=32, seed=7)
    labels, valid = shifted_targets(toks, 1)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p):
        return cross_entropy(M.apply(graphdef, (p, rest), toks, mtp=False).logits, labels, valid)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    losses = []
    for _ in range(100):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
