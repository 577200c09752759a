"""The precision policy at build time: which GEMM each linear is built with, and that the model trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.common import Linear
from nemotron_jax.layers.moe import RoutedExperts
from nemotron_jax.losses import total_loss
from nemotron_jax.quant.diagnostics import weight_ftz_fraction
from nemotron_jax.quant.gemm import QuantMatmul, QuantRaggedDot
from nemotron_jax.quant.policy import linear_format
from nemotron_jax.quant.recipe import NVFP4Recipe, mxfp8_matmul, nvfp4_matmul, quantizer_key


@pytest.fixture(scope="module")
def cfg():
    # 5 layers, last 1 (20%) high precision; MTP on so its linears are covered.
    return ModelConfig.tiny(hybrid_override_pattern="M*EM-", precision="nvfp4", nvfp4_bf16_last_fraction=0.2,
                            num_nextn_predict_layers=1)


def _formats(model) -> dict[str, str]:
    """{path: format} of every linear and routed-expert module, read from what each was built with."""
    out = {}
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, Linear):
            out[name] = node.gemm.fmt if node.gemm is not None else "bf16"
        elif isinstance(node, RoutedExperts):
            out[name] = node.ragged_dot.fmt if node.ragged_dot is not None else "bf16"
    return out


def test_every_linear_gets_its_policy_format(cfg):
    model = M.init_model(cfg)
    applied = _formats(model)
    assert applied["layers.0.mixer.in_proj"] == "nvfp4"
    assert applied["layers.0.mixer.out_proj"] == "mxfp8"
    assert applied["layers.1.mixer.q_proj"] == "bf16" and applied["layers.1.mixer.o_proj"] == "bf16"
    assert applied["layers.2.mixer.experts"] == "nvfp4" and applied["layers.2.mixer.shared_experts.up_proj"] == "nvfp4"
    assert applied["layers.4.mixer.up_proj"] == "bf16"  # the last 20% of layers
    assert applied["lm_head"] == "bf16" and all(f == "bf16" for n, f in applied.items() if n.startswith("mtp."))
    assert applied["layers.3.mixer.in_proj"] == linear_format(cfg, 3, "mamba.in_proj")
    # each quantized GEMM is keyed by its own path (its stochastic-rounding bits) and shares the model's key
    g = model.layers[0].mixer.in_proj
    assert isinstance(g.gemm, QuantMatmul) and g.gemm.name == "layers.0.mixer.in_proj"
    assert g.quant_key is model.quant_key and model.layers[0].mixer.out_proj.quant_key is model.quant_key
    assert isinstance(model.layers[2].mixer.experts.ragged_dot, QuantRaggedDot)
    assert model.layers[2].mixer.experts.ragged_dot.name == "layers.2.mixer.experts"
    # the weights carry their format as metadata (what the diagnostics select by)
    params = nnx.state(model, nnx.Param)
    quant = {".".join(map(str, p)): v.get_metadata().get("quant")
             for p, v in nnx.to_flat_state(params)}
    assert quant["layers.0.mixer.in_proj.kernel"] == "nvfp4" and quant["layers.0.mixer.out_proj.kernel"] == "mxfp8"
    assert quant["layers.2.mixer.experts.up_proj"] == "nvfp4" and quant["layers.1.mixer.q_proj.kernel"] is None
    assert 0.0 < weight_ftz_fraction(params) < 1.0


def test_bf16_policy_builds_plain_gemms():
    model = M.init_model(ModelConfig.tiny())
    assert set(_formats(model).values()) == {"bf16"} and model.quant_key is None
    assert weight_ftz_fraction(nnx.state(model, nnx.Param)) == 0.0


def test_padding_equals_explicit_zero_padding():
    kx, kw, kk = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (5, 24))
    w = jax.random.normal(kw, (24, 40))
    qm = QuantMatmul("nvfp4", "lin", NVFP4Recipe())
    y, vjp = jax.vjp(lambda a, b: qm(a, b, kk), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    xp, wp = jnp.pad(x, ((0, 0), (0, 8))), jnp.pad(w, ((0, 8), (0, 8)))
    ref, vjp_ref = jax.vjp(lambda a, b: nvfp4_matmul(a, b, quantizer_key(kk, "lin")), xp, wp)
    np.testing.assert_array_equal(y, ref[:, :40])
    ddx, ddw = vjp_ref(jnp.pad(jnp.ones_like(y), ((0, 0), (0, 8))))
    np.testing.assert_array_equal(dx, ddx[:, :24])
    np.testing.assert_array_equal(dw, ddw[:24, :40])
    ym = QuantMatmul("mxfp8", "m")(x, w)  # MXFP8 pads K and N to 32
    np.testing.assert_array_equal(ym, mxfp8_matmul(xp, jnp.pad(w, ((0, 8), (0, 24))))[:, :40])


def test_nvfp4_model_is_close_to_bf16_and_trains(cfg):
    model = M.init_model(cfg, seed=1)
    ref = M.init_model(cfg.replace(precision="bf16"), seed=1)
    toks = jax.random.randint(jax.random.key(2), (2, 32), 0, cfg.vocab_size, jnp.int32)
    lq, lr = model(toks), ref(toks)
    # Same params; NVFP4 (4-bit, two-level scales) on a few layers: logits differ, but stay correlated.
    assert not np.allclose(lq, lr)
    corr = np.corrcoef(np.asarray(lq).ravel(), np.asarray(lr).ravel())[0, 1]
    assert corr > 0.95, corr

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, key):
        return total_loss(cfg, M.apply(graphdef, (p, rest), toks, quant_key=key), toks)[0]

    g1 = jax.grad(loss)(params, jax.random.key(3))
    g2 = jax.grad(loss)(params, jax.random.key(4))
    leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves1)
    # stochastic rounding of dY: different keys give different gradients
    assert any(not np.array_equal(a, b) for a, b in zip(leaves1, leaves2))


def test_training_without_a_key_fails_clearly(cfg):
    model = M.init_model(cfg, seed=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    toks = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="key"):
        jax.grad(lambda p: M.apply(graphdef, (p, rest), toks).logits.sum())(params)
