import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.norms import rms_norm
from nemotron_jax.losses import cross_entropy, shifted_targets, total_loss


@pytest.fixture(scope="module")
def mtp_model():
    cfg = ModelConfig.tiny(num_nextn_predict_layers=1, mtp_depths=2, mtp_loss_scaling_factor=0.3)
    return cfg, M.init_model(cfg, seed=5)


def test_mtp_equals_manual_composition(mtp_model):
    cfg, net = mtp_model
    toks = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.vocab_size, dtype=jnp.int32)
    out = net.forward(toks)
    assert len(out.mtp_logits) == 2 and out.mtp_logits[0].shape == (2, 10, cfg.vocab_size)
    emb = np.asarray(net.embeddings[...])
    d, eps = cfg.hidden_size, cfg.layer_norm_epsilon
    w_eh = np.asarray(net.mtp.eh_proj.kernel[...])  # [2d, d]: rows 0..d-1 read the embedding (it comes first)
    h = out.hidden
    for k in (1, 2):
        nxt = np.concatenate([np.asarray(toks)[:, k:], np.zeros((2, k), np.int32)], axis=1)  # t_{i+k}
        e = rms_norm(jnp.asarray(emb[nxt]), net.mtp.enorm.weight[...], eps)
        hn = rms_norm(h, net.mtp.hnorm.weight[...], eps)
        u = np.asarray(e) @ w_eh[:d] + np.asarray(hn) @ w_eh[d:]
        u = jnp.asarray(u, jnp.float32)
        for blk in net.mtp.layers:  # '*' then 'E', each x + mixer(norm(x))
            u, _, _ = blk(u)
        h = rms_norm(u, net.mtp.final_layernorm.weight[...], eps)
        logits = np.asarray(h) @ np.asarray(net.lm_head.kernel[...])
        # fp32 composition of the same ops in another order: measured max |diff| 2.4e-7 on logits up to ~0.7
        # (seeds 0-6); at most 0.19 of this bound (5x margin).
        np.testing.assert_allclose(out.mtp_logits[k - 1], logits, rtol=1e-6, atol=1e-6)
    assert len(out.mtp_moe_aux) == 2 * cfg.mtp_hybrid_override_pattern.count("E")


def test_mtp_weights_are_shared_across_depths(mtp_model):
    """One MTP block serves every depth: the parameters do not grow with mtp_depths, and depth 2's logits are
    that same block (net.mtp) applied again to depth 1's output."""
    cfg, net = mtp_model
    assert cfg.mtp_depths == 2 and len(net.mtp.layers) == len(cfg.mtp_hybrid_override_pattern)

    def params(c):
        return {p: v.shape for p, v in nnx.to_flat_state(nnx.state(M.abstract_model(c), nnx.Param))}

    assert params(cfg) == params(cfg.replace(mtp_depths=1)) == params(cfg.replace(mtp_depths=3))
    toks = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size, dtype=jnp.int32)
    out = net.forward(toks)
    h = out.hidden
    for k in (1, 2):
        h, _, _ = net.mtp(h, net.embed(M.shift_tokens(toks, k)))
        # the same ops on the same arrays in the same order: identical
        np.testing.assert_array_equal(np.asarray(net.logits(h)), np.asarray(out.mtp_logits[k - 1]))


def test_shifted_targets_roll_and_mask():
    toks = jnp.array([[10, 11, 12, 13, 14, 15]])
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    lab, val = shifted_targets(toks, 1, seg)
    np.testing.assert_array_equal(lab, [[11, 12, 13, 14, 15, 0]])
    np.testing.assert_array_equal(val, [[1, 1, 0, 1, 1, 0]])  # no target across the document edge or past the end
    lab, val = shifted_targets(toks, 3, seg)  # MTP depth 2 predicts t_{i+3}
    np.testing.assert_array_equal(lab, [[13, 14, 15, 0, 0, 0]])
    np.testing.assert_array_equal(val, [[0, 0, 0, 0, 0, 0]])
    lab, val = shifted_targets(toks, 2, None, jnp.array([[1, 1, 1, 0, 1, 1]]))
    np.testing.assert_array_equal(lab, [[12, 13, 14, 15, 0, 0]])
    np.testing.assert_array_equal(val, [[1, 0, 1, 1, 0, 0]])  # the masked token is never a target


def test_total_loss_combines_main_mtp_and_aux(mtp_model):
    cfg, net = mtp_model
    toks = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size, dtype=jnp.int32)
    out = net.forward(toks)
    loss, metrics = total_loss(cfg, out, toks)

    def ce(logits, off):
        lab = np.asarray(toks)[:, off:]
        lg = np.asarray(logits, np.float64)[:, : 12 - off]
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        return float(np.mean(lse - np.take_along_axis(lg, lab[..., None], -1)[..., 0]))

    main, l1, l2 = ce(out.logits, 1), ce(out.mtp_logits[0], 2), ce(out.mtp_logits[1], 3)
    aux = sum(float(a["aux_loss"]) for a in (*out.moe_aux, *out.mtp_moe_aux))
    expected = main + 0.3 / 2 * (l1 + l2) + aux
    # fp32 log-sum-exp over 256 logits and a mean vs float64: measured <= 1.25e-7 relative (seeds 0-6); 5x margin
    np.testing.assert_allclose(float(metrics["loss_main"]), main, rtol=6e-7)
    np.testing.assert_allclose(float(metrics["loss_mtp_2"]), l2, rtol=6e-7)
    np.testing.assert_allclose(float(loss), expected, rtol=6e-7)
    assert aux > 0


def test_cross_entropy_ignores_masked_positions():
    logits = jnp.zeros((1, 3, 4)).at[0, 1, 2].set(100.0)
    labels = jnp.array([[0, 1, 2]])
    # fp32 log(4): within ~1.5 fp32 ulps (1.8e-7) of the float64 value by construction (measured 2.8e-9)
    np.testing.assert_allclose(cross_entropy(logits, labels, jnp.array([[1, 0, 0]])), np.log(4.0), rtol=2e-7)
    assert float(cross_entropy(logits, labels, jnp.zeros((1, 3)))) == 0.0
