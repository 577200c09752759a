"""NVIDIA ModelOpt's unified HF checkpoint layout (the published NVFP4 / FP8 Nemotron 3 checkpoints).

Layout (read from ModelOpt 0.47 `modelopt/torch/export/{unified_export_hf,quant_utils,convert_hf_config}.py`
and `modelopt/torch/quantization/qtensor/nvfp4_tensor.py`; docs/quantized_checkpoints.md):

- `hf_quant_config.json` {"producer": {...}, "quantization": {"quant_algo": "NVFP4" | "FP8" |
  "MIXED_PRECISION", "group_size": 16, "exclude_modules": [patterns], "kv_cache_quant_algo": ...,
  "quantized_layers": {module: {"quant_algo", "group_size"}} (MIXED_PRECISION only)}}, and the same facts in
  config.json's `quantization_config` {"quant_method": "modelopt", "quant_algo", "ignore": [patterns],
  "config_groups": {...: {"weights": {"num_bits", "group_size"}}}, "quantized_layers" (mixed)}.
- Per quantized linear `X` (HF weight `X.weight` of shape [N, K]):
  NVFP4: `X.weight` uint8 [N, K/2], two E2M1 codes per byte, element 2j in the LOW nibble and 2j+1 in the
  HIGH nibble (`packed = (q[..., 1::2] << 4) | q[..., 0::2]`); code = sign bit 3 | magnitude index into
  (0, 0.5, 1, 1.5, 2, 3, 4, 6). `X.weight_scale` float8_e4m3fn [N, K/16]; `X.weight_scale_2` fp32 scalar;
  value = E2M1(code) * (float32(weight_scale) * weight_scale_2), all in fp32.
  FP8: `X.weight` float8_e4m3fn [N, K]; `X.weight_scale` fp32 scalar; value = float(weight) * weight_scale.
  Both may carry `X.input_scale` (fp32 scalar, the static activation scale; unused by a weight-only
  dequantizing import) and attention modules `k_scale` / `v_scale` (FP8 KV cache; not applied here).
- Quantize (ModelOpt's dynamic weight path, reproduced bit for bit, tests/convert/test_modelopt.py):
  NVFP4: weight_scale_2 = amax(|W|) / (6 * 448); per 16-block s = amax_b / (6 * weight_scale_2), 0 -> 1.0,
  clamp to [2^-9, 448], cast to E4M3 (round to nearest even); codes: W / (float(s) * weight_scale_2)
  rounded to E2M1 by round-half-to-even (bounds 0.25 0.75 1.25 1.75 2.5 3.5 5; sign from W < 0, so -0.0
  encodes as +0). FP8: weight_scale = amax / 448, W / weight_scale cast to E4M3.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from nemotron_jax.config import ConfigError

log = logging.getLogger(__name__)

# code 8 (sign bit, magnitude 0) decodes to +0.0, as in ModelOpt's table
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
E2M1_MAX, E4M3_MAX = np.float32(6.0), np.float32(448.0)
NVFP4_GROUP = 16
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
SUPPORTED_ALGOS = ("NVFP4", "FP8", "MIXED_PRECISION")
QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
KV_SUFFIXES = ("k_scale", "v_scale")


class QuantFormatError(ConfigError):
    """A quantized checkpoint that does not follow the ModelOpt layout; the message names the tensor or key."""


# ----------------------------------------------------------------------------------------- tensor formats
def unpack_e2m1(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2] -> E2M1 codes uint8 [..., K] (low nibble first)."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_e2m1(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of E2M1 codes per row")
    return ((codes[..., 1::2] << 4) | (codes[..., 0::2] & 0x0F)).astype(np.uint8)


def _e4m3_to_f32(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale)
    if scale.dtype == np.uint8:
        scale = scale.view(E4M3)
    return scale.astype(np.float32)


def nvfp4_dequantize(packed: np.ndarray, weight_scale: np.ndarray, weight_scale_2: Any,
                     group: int = NVFP4_GROUP) -> np.ndarray:
    """ModelOpt NVFP4 -> fp32 [N, K]: E2M1(code) * (f32(weight_scale) * weight_scale_2)."""
    codes = unpack_e2m1(packed)
    vals = E2M1_VALUES[codes]
    block = _e4m3_to_f32(weight_scale) * np.float32(np.asarray(weight_scale_2, np.float32).reshape(()))
    shp = vals.shape
    return (vals.reshape(shp[:-1] + (shp[-1] // group, group)) * block[..., None]).reshape(shp)


def _cast_e2m1(x: np.ndarray) -> np.ndarray:
    """fp32 -> E2M1 codes, round half to even (ModelOpt's searchsorted + odd-bound bump)."""
    sign = (x < 0).astype(np.uint8)
    a = np.abs(x)
    ordn = np.searchsorted(E2M1_BOUNDS, a, side="left").astype(np.uint8)
    ordn = ordn + np.isin(a, E2M1_BOUNDS[[1, 3, 5]]).astype(np.uint8)
    return (sign << 3) + ordn


def nvfp4_quantize(w: np.ndarray, group: int = NVFP4_GROUP, amax: Any = None
                   ) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """float [N, K] -> (packed uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/group], weight_scale_2 fp32).

    amax: the tensor amax behind weight_scale_2 (default max |w|); ModelOpt's export gives linears that an
    engine fuses (attention q/k/v) the max of their amaxes."""
    w = np.asarray(w).astype(np.float32)
    if w.shape[-1] % group:
        raise ValueError(f"NVFP4 needs the input dimension ({w.shape[-1]}) to be a multiple of {group}")
    if amax is None:
        amax = np.abs(w).max() if w.size else 0
    s2 = np.float32(amax) / np.float32(E2M1_MAX * E4M3_MAX)
    blocks = w.reshape(w.shape[:-1] + (w.shape[-1] // group, group))
    bamax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = bamax / (E2M1_MAX * s2)
    s = np.where(s == 0, np.float32(1.0), s).astype(np.float32)
    s = np.clip(s, np.float32(2.0 ** -9), E4M3_MAX).astype(E4M3)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = blocks / (s.astype(np.float32) * s2)[..., None]
    codes = _cast_e2m1(scaled.reshape(w.shape).astype(np.float32))
    return pack_e2m1(codes), s, np.float32(s2)


def fp8_quantize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """float [N, K] -> (float8_e4m3fn [N, K], per-tensor fp32 weight_scale = amax / 448).

    As torch computes ModelOpt's `(weight / weight_scale).to(float8_e4m3fn)`: for a bfloat16 weight the
    0-d fp32 scale does not promote, so the quotient is rounded to bfloat16 before the cast to E4M3."""
    w = np.asarray(w)
    bf16 = w.dtype == np.dtype(ml_dtypes.bfloat16)
    w32 = w.astype(np.float32)
    scale = np.float32(np.abs(w32).max() if w.size else 0) / E4M3_MAX
    with np.errstate(divide="ignore", invalid="ignore"):
        if bf16:
            q = (w32 / np.float32(ml_dtypes.bfloat16(scale))).astype(ml_dtypes.bfloat16).astype(E4M3)
        else:
            q = (w32 / scale).astype(E4M3)
    return q, np.float32(scale)


def fp8_dequantize(q: np.ndarray, weight_scale: Any) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype == np.uint8:
        q = q.view(E4M3)
    return q.astype(np.float32) * np.float32(np.asarray(weight_scale, np.float32).reshape(()))


# ----------------------------------------------------------------------------------------- the config
def _clean_pattern(p: str) -> str:
    # ModelOpt 0.47 with transformers 5.x writes names like "lm_head.\x00backbone.pt_name_sentinel":
    # the real module name is what precedes the NUL, less a trailing dot.
    return p.split("\x00", 1)[0].rstrip(".")


@dataclass
class QuantSpec:
    """Which HF modules are quantized, and how (parsed from hf_quant_config.json or quantization_config)."""

    algo: str  # "NVFP4", "FP8" or "MIXED_PRECISION"
    group_size: int | None = None
    exclude: list[str] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # MIXED_PRECISION only
    kv_cache_algo: str | None = None
    source: str = ""

    def module_algo(self, module: str) -> str | None:
        """"NVFP4", "FP8" or None (kept in high precision) for an HF module name (weight name less .weight)."""
        for pat in self.exclude:
            if module == pat or fnmatch.fnmatchcase(module, pat) or module.startswith(pat + "."):
                return None
        if self.algo == "MIXED_PRECISION":
            entry = self.layers.get(module)
            if entry is None:  # an expert's own name may be covered by its stacked parent's entry
                for name, e in self.layers.items():
                    if fnmatch.fnmatchcase(module, name) or module.startswith(name + "."):
                        entry = e
                        break
            return None if entry is None else entry["quant_algo"]
        return self.algo

    def to_hf_quant_config(self, producer: dict) -> dict:
        q: dict[str, Any] = {"quant_algo": self.algo, "kv_cache_quant_algo": self.kv_cache_algo}
        if self.algo == "NVFP4":
            q["group_size"] = self.group_size
        q["exclude_modules"] = list(self.exclude)
        return {"producer": producer, "quantization": q}

    def to_quantization_config(self, producer: dict) -> dict:
        """config.json's `quantization_config`, as ModelOpt's convert_hf_quant_config_format writes it."""
        if self.algo == "NVFP4":
            g = self.group_size
            group = {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": g},
                     "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": g},
                     "targets": ["Linear"]}
        else:
            group = {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                     "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}
        return {"config_groups": {"group_0": group}, "ignore": list(self.exclude), "quant_algo": self.algo,
                "producer": producer, "quant_method": "modelopt"}


def _check_algo(where: str, algo: Any, group: Any) -> None:
    if algo not in ("NVFP4", "FP8"):
        raise QuantFormatError(f"{where}: unknown quant_algo {algo!r}; nemotron-jax imports ModelOpt NVFP4 "
                               f"(group size 16), FP8 (per-tensor) and MIXED_PRECISION of those two")
    if algo == "NVFP4" and group != NVFP4_GROUP:
        raise QuantFormatError(f"{where}: NVFP4 group_size {group!r}; only {NVFP4_GROUP} is supported")


def parse_quant_config(qc: dict, source: str) -> QuantSpec:
    """hf_quant_config.json's dict, or config.json's `quantization_config`, -> QuantSpec (validated)."""
    if "quantization" in qc:  # hf_quant_config.json
        q = qc["quantization"]
        if not isinstance(q, dict):
            raise QuantFormatError(f"{source}: 'quantization' is not an object")
        algo, group = q.get("quant_algo"), q.get("group_size")
        exclude = q.get("exclude_modules") or []
        layers = q.get("quantized_layers") or {}
        kv = q.get("kv_cache_quant_algo")
    else:  # quantization_config
        if qc.get("quant_method", "modelopt") != "modelopt":
            raise QuantFormatError(f"{source}: quant_method {qc.get('quant_method')!r}; only ModelOpt ('modelopt') "
                                   "checkpoints are supported")
        algo = qc.get("quant_algo")
        group = qc.get("group_size")
        for g in (qc.get("config_groups") or {}).values():
            w = g.get("weights", {}) if isinstance(g, dict) else {}
            group = w.get("group_size", group)
        exclude = qc.get("ignore") or qc.get("exclude_modules") or []
        layers = qc.get("quantized_layers") or {}
        kv = qc.get("kv_cache_quant_algo") or (qc.get("kv_cache_scheme") and "FP8")
    if algo == "NVFP4" and group is None:
        group = NVFP4_GROUP  # ModelOpt's default when the key is absent
    if algo == "MIXED_PRECISION":
        if not isinstance(layers, dict) or not layers:
            raise QuantFormatError(f"{source}: MIXED_PRECISION without a 'quantized_layers' map")
        for name, e in layers.items():
            if not isinstance(e, dict):
                raise QuantFormatError(f"{source}: quantized_layers[{name!r}] is not an object")
            g = e.get("group_size", NVFP4_GROUP if e.get("quant_algo") == "NVFP4" else None)
            _check_algo(f"{source}: quantized_layers[{name!r}]", e.get("quant_algo"), g)
            e.setdefault("group_size", g)
    else:
        _check_algo(source, algo, group)
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise QuantFormatError(f"{source}: exclude_modules / ignore must be a list of module names")
    if kv not in (None, "FP8"):
        raise QuantFormatError(f"{source}: kv_cache_quant_algo {kv!r} is not supported")
    if kv:
        log.warning("%s: kv_cache_quant_algo=%s: the KV cache runs unquantized here (k_scale / v_scale are "
                    "read and ignored)", source, kv)
    return QuantSpec(algo=algo, group_size=group if algo == "NVFP4" else None,
                     exclude=[_clean_pattern(p) for p in exclude], layers=dict(layers), kv_cache_algo=kv,
                     source=source)


def read_quant_spec(path: str | Path, hf_config: dict | None = None) -> QuantSpec | None:
    """The checkpoint's quantization (hf_quant_config.json wins over config.json's quantization_config)."""
    d = Path(path)
    d = d.parent if d.is_file() else d
    f = d / "hf_quant_config.json"
    if f.exists():
        try:
            qc = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise QuantFormatError(f"{f}: not valid JSON ({e})") from e
        return parse_quant_config(qc, str(f))
    if hf_config is None and (d / "config.json").exists():
        hf_config = json.loads((d / "config.json").read_text())
    qc = (hf_config or {}).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantFormatError(f"{d / 'config.json'}: quantization_config is not an object")
    return parse_quant_config(qc, f"{d / 'config.json'} quantization_config")


# ----------------------------------------------------------------------------------------- export policy
def released_exclude_modules(cfg) -> list[str]:
    """Modules kept in high precision, as the published Nemotron 3 NVFP4 checkpoints keep them (model cards
    and ModelOpt's export; docs/quantized_checkpoints.md): the LM head, every attention projection, the
    Mamba layer that feeds each attention layer, and the MTP block. Embeddings, router gates, conv1d and
    norms are not linears and are never quantized."""
    pat = cfg.hybrid_override_pattern
    out = ["lm_head"]
    for i, ch in enumerate(pat):
        if ch == "*":
            out.append(f"backbone.layers.{i}.mixer")
            if i > 0 and pat[i - 1] == "M":
                out.append(f"backbone.layers.{i - 1}.mixer")
    if cfg.mtp_enabled:
        out.append("mtp*")
    return out
