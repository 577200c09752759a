"""ModelOpt unified-HF quantized checkpoints: bit-exact against ModelOpt's own output (tests/fixtures/modelopt,
made by tools/make_modelopt_goldens.py with nvidia-modelopt 0.47 on CPU), import, export, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax import ConfigError
from nemotron_jax.convert import CheckpointError, from_hf, to_hf
from nemotron_jax.convert import modelopt as mo
from nemotron_jax.convert.safetensors_io import SafetensorsFile, save
from nemotron_jax.quant import packed
from tests.helpers.checkpoints import copy_checkpoint, edit_json, edit_tensors

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"
CASES = ["normal_f32", "normal_bf16", "heavy_tail", "zeros_outlier", "ties_negzero"]


@pytest.fixture(scope="module")
def gold():
    return SafetensorsFile(FIX / "tensors.safetensors")


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


# ----------------------------------------------------------------------------- tensor goldens
def test_nibble_order_and_code_table(gold):
    # ties_negzero row 0 has weight_scale_2 = 1 and block scale 1: the codes are the inputs' E2M1 encodings
    packed = gold.get("ties_negzero.nvfp4.weight")
    assert float(gold.get("ties_negzero.nvfp4.weight_scale_2")) == 1.0
    codes = mo.unpack_e2m1(packed)[0, :16]
    # 0.25->0 0.75->1.0 1.25->1.0 1.75->2.0 2.5->2.0 3.5->4.0 5->4.0 (half to even), negatives set bit 3,
    # -0.0 -> +0 (code 0), 6 -> 7
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0, 7]
    assert packed[0, 0] == (codes[1] << 4) | codes[0]  # element 0 in the LOW nibble
    np.testing.assert_array_equal(mo.pack_e2m1(mo.unpack_e2m1(packed)), packed)


@pytest.mark.parametrize("case", CASES)
def test_nvfp4_quantize_bit_exact(gold, case):
    packed, scale, scale2 = mo.nvfp4_quantize(gold.get(f"{case}.input"))
    np.testing.assert_array_equal(packed, gold.get(f"{case}.nvfp4.weight"))
    np.testing.assert_array_equal(bits(scale), bits(gold.get(f"{case}.nvfp4.weight_scale")))
    assert bits(np.float32(scale2)) == bits(gold.get(f"{case}.nvfp4.weight_scale_2"))


@pytest.mark.parametrize("case", CASES)
def test_nvfp4_dequantize_bit_exact(gold, case):
    d = mo.nvfp4_dequantize(gold.get(f"{case}.nvfp4.weight"), gold.get(f"{case}.nvfp4.weight_scale"),
                            gold.get(f"{case}.nvfp4.weight_scale_2"))
    np.testing.assert_array_equal(bits(d), bits(gold.get(f"{case}.nvfp4.dequant")))


@pytest.mark.parametrize("case", CASES)
def test_fp8_bit_exact(gold, case):
    q, scale = mo.fp8_quantize(gold.get(f"{case}.input"))
    np.testing.assert_array_equal(bits(q), bits(gold.get(f"{case}.fp8.weight")))
    assert bits(np.float32(scale)) == bits(gold.get(f"{case}.fp8.weight_scale"))
    d = mo.fp8_dequantize(gold.get(f"{case}.fp8.weight"), gold.get(f"{case}.fp8.weight_scale"))
    np.testing.assert_array_equal(bits(d), bits(gold.get(f"{case}.fp8.dequant")))


# ----------------------------------------------------------------------------- tiny model import
def _logits(model):
    ids = SafetensorsFile(FIX / "logits.safetensors").get("input_ids")
    return np.asarray(model(jnp.asarray(ids)))


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """The quantized checkpoint with every quantized weight replaced by its fp32 value, scales and
    quantization config dropped: 'dequantize, then run'."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    f = SafetensorsFile(src / "model.safetensors")
    out = {}
    for k in f.keys():
        if k.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        m = k[: -len(".weight")]
        if k.endswith(".weight") and m + ".weight_scale_2" in f.keys():
            out[k] = mo.nvfp4_dequantize(f.get(k), f.get(m + ".weight_scale"), f.get(m + ".weight_scale_2"))
        elif k.endswith(".weight") and m + ".weight_scale" in f.keys():
            out[k] = mo.fp8_dequantize(f.get(k), f.get(m + ".weight_scale"))
        else:
            out[k] = f.get(k)
    save(out, dst / "model.safetensors")
    return dst


# relative L2 error of the logits against the fp32 model (random-init tiny model, weights only quantized;
# measured 0.21 for NVFP4 and 0.05 for FP8)
TOL = {"nvfp4": 0.3, "fp8": 0.08}


@pytest.mark.parametrize("algo", ["nvfp4", "fp8"])
def test_modelopt_checkpoint_imports(tmp_path, algo):
    ref = SafetensorsFile(FIX / "logits.safetensors").get("logits")
    q = _logits(from_hf(FIX / f"model_{algo}"))
    rel = np.linalg.norm(q - ref) / np.linalg.norm(ref)
    assert 0 < rel < TOL[algo], rel
    # exactly dequantize-then-run
    deq = _logits(from_hf(_dequantized_copy(FIX / f"model_{algo}", tmp_path / "deq")))
    np.testing.assert_array_equal(q, deq)


def test_unquantized_fixture_matches_hf():
    ref = SafetensorsFile(FIX / "logits.safetensors").get("logits")
    np.testing.assert_allclose(_logits(from_hf(FIX / "model")), ref, atol=2e-6)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("algo", ["nvfp4", "fp8"])
def test_export_equals_modelopt_export(tmp_path, algo):
    """Same fp32 model, same modules quantized: our tensors are ModelOpt's export byte for byte (ModelOpt also
    writes input_scale from its activation calibration, which to_hf does not run)."""
    model = from_hf(FIX / "model")
    to_hf(model, tmp_path / "out", quantize=algo, exclude_modules=["lm_head"])
    ours = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    theirs = SafetensorsFile(FIX / f"model_{algo}" / "model.safetensors")
    assert set(ours.keys()) == {k for k in theirs.keys() if not k.endswith(".input_scale")}
    for k in ours.keys():
        assert ours.dtype_tag(k) == theirs.dtype_tag(k), k
        assert ours.shape(k) == theirs.shape(k) or {ours.shape(k), theirs.shape(k)} <= {(), (1,)}, k
        assert ours.get(k).tobytes() == theirs.get(k).tobytes(), k
    qc = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert qc["quant_algo"] == algo.upper() and qc["exclude_modules"] == ["lm_head"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"


@pytest.mark.parametrize("algo", ["nvfp4", "fp8"])
def test_export_reimport_bit_identical(tmp_path, algo):
    model = from_hf(FIX / "model")
    to_hf(model, tmp_path / "q", quantize=algo)
    back = from_hf(tmp_path / "q")
    f = SafetensorsFile(tmp_path / "q" / "model.safetensors")
    qc = json.loads((tmp_path / "q" / "hf_quant_config.json").read_text())["quantization"]
    # the released policy: LM head, attention, the Mamba layer before attention kept high precision
    assert qc["exclude_modules"] == ["lm_head", "backbone.layers.3.mixer", "backbone.layers.2.mixer"]
    assert f.dtype_tag("backbone.layers.2.mixer.in_proj.weight") == "F32"
    assert f.dtype_tag("backbone.layers.0.mixer.in_proj.weight") == ("U8" if algo == "nvfp4" else "F8_E4M3")
    # re-imported weights are exactly dequantize(quantize(w)) of the original
    w = np.asarray(model.layers[0].mixer.in_proj.kernel.get_value()).T
    if algo == "nvfp4":
        want = mo.nvfp4_dequantize(*mo.nvfp4_quantize(w))
    else:
        want = mo.fp8_dequantize(*mo.fp8_quantize(w))
    np.testing.assert_array_equal(bits(np.asarray(back.layers[0].mixer.in_proj.kernel.get_value()).T), bits(want))
    # FP8: a second export of the re-imported model re-imports to the same weights. (NVFP4 is not
    # idempotent under ModelOpt's formula: amax/2688 of the dequantized tensor moves weight_scale_2 by ulps.)
    if algo == "nvfp4":
        return
    to_hf(back, tmp_path / "q2", quantize=algo)
    again = from_hf(tmp_path / "q2")
    a, b = dict(nnx.to_flat_state(nnx.state(back))), dict(nnx.to_flat_state(nnx.state(again)))
    for k in a:
        np.testing.assert_array_equal(bits(np.asarray(a[k].get_value())), bits(np.asarray(b[k].get_value())))


def test_export_bf16_weights(tmp_path):
    model = from_hf(FIX / "model", dtype=jnp.bfloat16)
    to_hf(model, tmp_path / "q", quantize="fp8")
    back = from_hf(tmp_path / "q", dtype=jnp.bfloat16)
    w = np.asarray(model.layers[0].mixer.out_proj.kernel.get_value()).T
    want = mo.fp8_dequantize(*mo.fp8_quantize(w)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(bits(np.asarray(back.layers[0].mixer.out_proj.kernel.get_value()).T), bits(want))


# ----------------------------------------------------------------------------- bad input
def _copy(algo, dst: Path) -> Path:
    return copy_checkpoint(FIX / f"model_{algo}", dst)


def _edit_quant(d: Path, **changes) -> None:
    edit_json(d, "hf_quant_config.json", lambda hq: hq["quantization"].update(changes))


W = "backbone.layers.1.mixer.experts.2.up_proj"


def test_missing_scale_named(tmp_path):
    d = _copy("nvfp4", tmp_path)
    edit_tensors(d, lambda t: t.pop(W + ".weight_scale_2"))
    with pytest.raises(CheckpointError, match=rf"missing.*{W}\.weight_scale_2"):
        from_hf(d)
    d = _copy("fp8", tmp_path / "b")
    edit_tensors(d, lambda t: t.pop(W + ".weight_scale"))
    with pytest.raises(CheckpointError, match=rf"missing.*{W}\.weight_scale"):
        from_hf(d)


def test_wrong_group_size_named(tmp_path):
    d = _copy("nvfp4", tmp_path)
    _edit_quant(d, group_size=32)
    with pytest.raises(ConfigError, match="group_size 32"):
        from_hf(d)
    d = _copy("nvfp4", tmp_path / "b")  # config says 16, the scales are per 32 inputs

    def halve(t):
        t[W + ".weight_scale"] = np.ascontiguousarray(t[W + ".weight_scale"][:, ::2])
    edit_tensors(d, halve)
    with pytest.raises(CheckpointError, match=rf"{W}\.weight_scale.*group size 16.*means group size 32"):
        from_hf(d)


@pytest.mark.parametrize("algo", ["INT4_AWQ", "W4A8_AWQ", "nvfp4", None])
def test_unknown_quant_algo_named(tmp_path, algo):
    d = _copy("nvfp4", tmp_path)
    _edit_quant(d, quant_algo=algo)
    with pytest.raises(ConfigError, match=f"unknown quant_algo {algo!r}"):
        from_hf(d)


def test_unknown_quant_algo_in_config_json(tmp_path):
    d = _copy("fp8", tmp_path)
    (d / "hf_quant_config.json").unlink()
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_algo"] = "FP8_BLOCK"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown quant_algo 'FP8_BLOCK'"):
        from_hf(d)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quant_method 'gptq'"):
        from_hf(d)


def test_config_json_quantization_config_alone_imports(tmp_path):
    d = _copy("fp8", tmp_path)
    (d / "hf_quant_config.json").unlink()
    a = _logits(from_hf(d))
    np.testing.assert_array_equal(a, _logits(from_hf(FIX / "model_fp8")))


def test_codes_of_wrong_shape_named(tmp_path):
    d = _copy("nvfp4", tmp_path)

    def unpacked(t):  # one code per byte instead of two
        t[W + ".weight"] = mo.unpack_e2m1(t[W + ".weight"])
    edit_tensors(d, unpacked)
    with pytest.raises(CheckpointError, match=rf"{W}\.weight.* has shape \[32, 64\].*\[32, 32\] uint8"):
        from_hf(d)
    d = _copy("nvfp4", tmp_path / "b")

    def wrong_dtype(t):
        t[W + ".weight"] = t[W + ".weight"].astype(np.int8)
    edit_tensors(d, wrong_dtype)
    with pytest.raises(CheckpointError, match=rf"{W}\.weight.*dtype I8"):
        from_hf(d)


def test_scales_without_quant_config_named(tmp_path):
    d = _copy("nvfp4", tmp_path)
    (d / "hf_quant_config.json").unlink()
    edit_json(d, "config.json", lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="weight_scale"):
        from_hf(d)


def test_excluded_module_with_scales_is_unexpected(tmp_path):
    d = _copy("nvfp4", tmp_path)
    _edit_quant(d, exclude_modules=["lm_head", "backbone.layers.0.mixer"])
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.in_proj\.weight"):
        from_hf(d)


# ----------------------------------------------------------------------------- packed NVFP4 (dequantize=False)
def _jit_logits(model):
    ids = jnp.asarray(SafetensorsFile(FIX / "logits.safetensors").get("input_ids"))
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, ids))


def _state_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_packed_import_equals_dequantized_import(dtype):
    """NVFP4 weights kept packed and dequantized inside the GEMM: logits exactly those of the model
    dequantized at load (same values, same GEMM), eager and jitted."""
    deq = from_hf(FIX / "model_nvfp4", dtype=dtype)
    pk = from_hf(FIX / "model_nvfp4", dtype=dtype, dequantize=False)
    found = packed.packed_weights(pk)
    f = SafetensorsFile(FIX / "model_nvfp4" / "model.safetensors")
    n_quantized = sum(k.endswith(".weight_scale_2") for k in f.keys())
    n_expert = sum(".experts." in k and k.endswith(".weight_scale_2") for k in f.keys())
    # one packed leaf per quantized linear, one per stacked expert projection (4 experts x up/down x 2 layers)
    assert len(found) == n_quantized - n_expert + 4 and n_expert == 16
    assert isinstance(pk.layers[0].mixer.in_proj.kernel, packed.NVFP4Weight)
    assert not isinstance(pk.layers[0].mixer.in_proj.kernel, nnx.Param)
    assert found["layers.1.mixer.experts.up_proj"].codes.shape == (4, 32, 32)  # [E, N=moe_inter, K/2 = 64/2]
    assert found["layers.1.mixer.experts.up_proj"].scale_2.shape == (4,)
    assert isinstance(pk.lm_head.kernel, nnx.Param)  # excluded from quantization: loaded as usual
    if dtype == jnp.float32:  # eager (op by op) once; jitted for both dtypes
        np.testing.assert_array_equal(bits(_logits(pk)), bits(_logits(deq)))
    np.testing.assert_array_equal(bits(_jit_logits(pk)), bits(_jit_logits(deq)))
    assert _state_bytes(pk) < _state_bytes(deq)


def test_packed_generation_equals_dequantized():
    from nemotron_jax.inference.engine import generate
    prompts = [[5, 9, 3, 7, 1], [11, 2]]
    a = generate(from_hf(FIX / "model_nvfp4"), prompts, max_new_tokens=6)
    b = generate(from_hf(FIX / "model_nvfp4", dequantize=False), prompts, max_new_tokens=6)
    assert a.tokens == b.tokens and all(len(t) == 6 for t in b.tokens)
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_array_equal(x, y)


def test_packed_model_refuses_training():
    from nemotron_jax import model as M
    from nemotron_jax.losses import total_loss
    pk = from_hf(FIX / "model_nvfp4", dequantize=False)
    with pytest.raises(packed.PackedWeightError, match="inference-only.*dequantize=True"):
        packed.check_trainable(pk)
    graphdef, params, rest = nnx.split(pk, nnx.Param, ...)
    assert not any(isinstance(v, packed.NVFP4Weight) for _, v in nnx.to_flat_state(params))  # optimizer never sees it
    toks = jnp.asarray(SafetensorsFile(FIX / "logits.safetensors").get("input_ids"))

    def loss(p):
        return total_loss(pk.cfg, M.apply(graphdef, (p, rest), toks), toks)[0]

    with pytest.raises(packed.PackedWeightError, match="dequantize=True"):
        jax.grad(loss)(params)
    # a model whose only packed weights are routed experts refuses too (the experts' own guard)
    deq = from_hf(FIX / "model_nvfp4")
    experts = pk.layers[1].mixer.experts
    deq.layers[1].mixer.experts.up_proj = experts.up_proj
    deq.layers[1].mixer.experts.down_proj = experts.down_proj
    graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
    with pytest.raises(packed.PackedWeightError):
        jax.grad(lambda p: total_loss(deq.cfg, M.apply(graphdef, (p, rest), toks), toks)[0])(params)


def test_packed_load_of_fp8_and_unquantized_checkpoints_is_the_usual_load():
    for name in ("model_fp8", "model"):
        pk = from_hf(FIX / name, dequantize=False)
        assert packed.packed_weights(pk) == {}
        np.testing.assert_array_equal(bits(_logits(pk)), bits(_logits(from_hf(FIX / name))))


def test_packed_impl_choice_and_fail_closed():
    auto = from_hf(FIX / "model_nvfp4", dequantize=False, packed_impl="auto")  # CPU: the reference
    np.testing.assert_array_equal(bits(_logits(auto)), bits(_logits(from_hf(FIX / "model_nvfp4"))))
    # the Mamba in_proj here is [196, 64]: N % 16 != 0, so the named kernel refuses (no silent fallback)
    kern = from_hf(FIX / "model_nvfp4", dequantize=False, packed_impl="pallas_interpret")
    with pytest.raises(ValueError, match=r"does not support x .*\[196, 64\]"):
        _logits(kern)
    with pytest.raises(ConfigError, match="packed_impl='cuda'"):
        from_hf(FIX / "model_nvfp4", dequantize=False, packed_impl="cuda")
    with pytest.raises(ConfigError, match="dequantize=False"):
        from_hf(FIX / "model_nvfp4", packed_impl="auto")


def test_packed_model_export_refused(tmp_path):
    with pytest.raises(ConfigError, match="dequantize=True to re-export"):
        to_hf(from_hf(FIX / "model_nvfp4", dequantize=False), tmp_path / "out")


def test_packed_nan_block_scale_named(tmp_path):
    d = _copy("nvfp4", tmp_path)

    def nan(t):
        s = t[W + ".weight_scale"].view(np.uint8).copy()
        s[0, 0] = 0x7F
        t[W + ".weight_scale"] = s.view(mo.E4M3)
    edit_tensors(d, nan)
    with pytest.raises(CheckpointError, match=rf"{W}\.weight_scale.*NaN"):
        from_hf(d, dequantize=False)


def test_mixed_precision_and_exclude_patterns():
    spec = mo.parse_quant_config({"quantization": {
        "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "mtp*", "backbone.layers.4.mixer"],
        "quantized_layers": {"backbone.layers.1.mixer.experts": {"quant_algo": "NVFP4", "group_size": 16},
                             "backbone.layers.0.mixer.in_proj": {"quant_algo": "FP8"}}}}, "test")
    assert spec.module_algo("backbone.layers.1.mixer.experts.7.up_proj") == "NVFP4"
    assert spec.module_algo("backbone.layers.0.mixer.in_proj") == "FP8"
    assert spec.module_algo("backbone.layers.0.mixer.out_proj") is None
    assert spec.module_algo("backbone.layers.4.mixer.in_proj") is None
    assert spec.module_algo("mtp.layers.0.eh_proj") is None
    with pytest.raises(ConfigError, match=r"quantized_layers\['x'\].*group_size 8"):
        mo.parse_quant_config({"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
            "x": {"quant_algo": "NVFP4", "group_size": 8}}}}, "test")
    # ModelOpt 0.47 + transformers 5 writes names with a NUL sentinel: the module name is what precedes it
    s = mo.parse_quant_config({"quantization": {"quant_algo": "FP8", "exclude_modules": [
        "lm_head.\x00backbone.pt_name_sentinel"]}}, "test")
    assert s.exclude == ["lm_head"] and s.module_algo("lm_head") is None
