"""Reference data for the ModelOpt unified-HF checkpoint import/export (nemotron_jax.convert.modelopt).

Run from the repository root with the separate Python 3.11 tool venv (torch CPU, transformers, and
`pip install nvidia-modelopt requests`; see tools/README.md):

    /tmp/hfvenv/bin/python tools/make_modelopt_goldens.py

Writes, under tests/fixtures/modelopt/:
  tensors.safetensors   per case <c>: <c>.input (the float tensor, as given to ModelOpt),
                        NVFP4: <c>.nvfp4.weight (uint8, two E2M1 codes per byte), <c>.nvfp4.weight_scale
                        (float8_e4m3fn, one per 16 inputs), <c>.nvfp4.weight_scale_2 (fp32 scalar),
                        <c>.nvfp4.dequant (fp32, ModelOpt's NVFP4QTensor.dequantize);
                        FP8: <c>.fp8.weight (float8_e4m3fn), <c>.fp8.weight_scale (fp32 scalar),
                        <c>.fp8.dequant (fp32, modelopt.torch.export.quant_utils.from_quantized_weight).
  model/                a tiny NemotronH (transformers 5.24, fp32, random init) saved with save_pretrained
  model_nvfp4/, model_fp8/   the same model after modelopt.torch.quantization.quantize (NVFP4_DEFAULT_CFG /
                        FP8_DEFAULT_CFG, calibrated on random tokens) and export_hf_checkpoint (unified layout:
                        hf_quant_config.json, quantization_config in config.json).
  logits.safetensors    input ids and the BF16/fp32 model's logits on them.
  meta.json             versions, cases, what each file holds.

Every quantized value comes from ModelOpt's own code, run on CPU: nothing here reimplements its formula.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "modelopt"


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    cases = {
        "normal_f32": torch.randn(8, 64, generator=g),
        "normal_bf16": (torch.randn(8, 64, generator=g) * 0.05).to(torch.bfloat16),
        "heavy_tail": torch.distributions.StudentT(2.0).sample((6, 48)) * 0.02,
    }
    z = torch.randn(4, 64, generator=g)
    z[1] = 0.0  # whole row of zero blocks (block scale 1.0)
    z[2, 16:32] = 0.0
    z[3, 5] = 80.0  # outlier
    cases["zeros_outlier"] = z
    # amax 2688 -> weight_scale_2 = 2688 / (6 * 448) = 1; a block with amax 6 -> block scale 1: the scaled
    # values are the inputs, so the E2M1 rounding boundaries and -0.0 are hit exactly.
    t = torch.zeros(2, 32)
    t[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                              -0.0, 6.0])
    t[0, 16:] = torch.tensor([0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -6.0, 0.26, 0.74, 2.4, 2.6, 4.9, 5.1, 2688.0])
    t[1] = torch.linspace(-3, 3, 32)
    cases["ties_negzero"] = t
    return cases


def tensor_goldens(out: dict) -> dict:
    from modelopt.torch.export.model_config import QUANTIZATION_FP8
    from modelopt.torch.export.quant_utils import from_quantized_weight, to_quantized_weight
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    meta = {}
    for name, x in _cases().items():
        out[f"{name}.input"] = x.clone()
        q, s, s2 = NVFP4QTensor.quantize(x.clone(), 16)
        out[f"{name}.nvfp4.weight"] = q._quantized_data.clone()
        out[f"{name}.nvfp4.weight_scale"] = s.clone()
        out[f"{name}.nvfp4.weight_scale_2"] = s2.float().reshape(()).clone()
        deq = q.dequantize(dtype=torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16})
        out[f"{name}.nvfp4.dequant"] = deq
        amax = x.float().abs().amax()
        fs = (amax / 448.0).float()  # modelopt.torch.export.quant_utils.get_scaling_factor: amax / maxbound
        fq = to_quantized_weight(x.clone(), fs, QUANTIZATION_FP8)
        out[f"{name}.fp8.weight"] = fq
        out[f"{name}.fp8.weight_scale"] = fs.reshape(()).clone()
        out[f"{name}.fp8.dequant"] = from_quantized_weight(fq, fs, QUANTIZATION_FP8, torch.float32)
        meta[name] = {"shape": list(x.shape), "dtype": str(x.dtype)}
    return meta


TINY = dict(
    vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
    conv_kernel=4, chunk_size=8, intermediate_size=64, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, layers_block_type=["mamba", "moe", "mamba", "attention",
                                                                       "mlp", "moe"],
    num_nextn_predict_layers=0, time_step_min=1e-3, use_conv_bias=True, tie_word_embeddings=False,
)


def model_goldens(meta: dict) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = NemotronHConfig(**TINY)
    model = NemotronHForCausalLM(cfg).float().eval()
    for d in ("model", "model_nvfp4", "model_fp8"):
        shutil.rmtree(OUT / d, ignore_errors=True)
    model.save_pretrained(OUT / "model")
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids).logits.float()
    calib = [torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(100 + i))
             for i in range(4)]

    def loop(m):
        with torch.no_grad():
            for c in calib:
                m(c)

    logs = {}
    for tag, qcfg in (("nvfp4", mtq.NVFP4_DEFAULT_CFG), ("fp8", mtq.FP8_DEFAULT_CFG)):
        m = NemotronHForCausalLM.from_pretrained(OUT / "model", dtype=torch.float32).eval()
        # ModelOpt 0.47's NVFP4 fake-quant forward asserts a CUDA tensor (tensor_quant.py,
        # _dynamic_block_quantize_impl), so on CPU NVFP4 is calibrated without a forward loop (weights
        # only: no input_scale is exported); FP8 runs the calibration loop.
        m = mtq.quantize(m, qcfg, loop if tag == "fp8" else None)
        if tag == "fp8":
            with torch.no_grad():
                logs[f"{tag}.fake_quant_logits"] = m(ids).logits.float()
        export_hf_checkpoint(m, export_dir=str(OUT / f"model_{tag}"))
    from safetensors.torch import save_file

    save_file({"input_ids": ids.to(torch.int32), "logits": logits, **logs}, str(OUT / "logits.safetensors"))
    meta["model"] = {"config": TINY, "calibration": "4 batches of random ids [2, 16], seeds 100..103",
                     "input_ids": "[2, 12] seed 7"}


def main() -> None:
    import modelopt
    import transformers
    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    meta = {"versions": {"modelopt": modelopt.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
            "cases": tensor_goldens(tensors)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "tensors.safetensors"))
    try:
        model_goldens(meta)
    except Exception as e:  # recorded, not hidden: the tests skip the model part when it is absent
        meta["model_error"] = f"{type(e).__name__}: {e}"
        print("model export failed:", meta["model_error"])
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
