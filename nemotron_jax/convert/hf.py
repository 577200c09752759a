"""Import / export of HF NemotronH checkpoints (Hub layout safetensors + config.json).

    model = from_hf("path/to/NVIDIA-Nemotron-3-Nano-30B-A3B", dtype=jnp.bfloat16)
    logits = model(tokens)                        # [B, T, V] fp32
    to_hf(model, "out/")                          # loads with NemotronHForCausalLM.from_pretrained

Import builds the model abstractly (nnx.eval_shape: no memory), then fills it one parameter leaf at a time:
each HF tensor is read alone from a validated safetensors file (nemotron_jax.convert.safetensors_io: a single file, a sharded checkpoint with
`model.safetensors.index.json`, or every *.safetensors in the directory), transformed (transpose, conv
reshape), cast to the leaf's dtype and written into the leaf's buffer (the expert slot for routed experts);
the finished leaf becomes a device array and the buffer is dropped. Peak host memory is the model plus its
largest leaf. Errors name the tensor: missing, unexpected, wrong shape, non-floating dtype.

Numerics: with dtype=float32 the compute dtype is float32 too, and the HF dt clamp (time_step_min) is set as
our `time_step_limit`, so logits match transformers' fp32 eager forward (tests/convert/test_hf.py).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.config import ConfigError, ModelConfig
from nemotron_jax.convert.hf_config import config_from_hf, config_to_hf
from nemotron_jax.convert.hf_names import Entry, entries, path_str
from nemotron_jax.convert.modelopt import (KV_SUFFIXES, E4M3, NVFP4_GROUP, QuantSpec, fp8_dequantize,
                                           fp8_quantize, nvfp4_dequantize, nvfp4_quantize, read_quant_spec,
                                           released_exclude_modules)
from nemotron_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile
from nemotron_jax.convert.safetensors_io import save as save_file

# safetensors dtype tags we read (cast to the parameter dtype); anything else is refused.
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The safetensors content does not fit the config: the message names the tensor."""


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"from_hf dtype={name!r}: use float32 or bfloat16")
    return name


def _short(names: Iterable[str], n: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def _shard_path(d: Path, fname: Any, index: Path) -> Path:
    """A shard named by the index, refused unless it is a plain file name inside the checkpoint folder."""
    if not isinstance(fname, str) or not fname:
        raise CheckpointError(f"{index} names shard {fname!r}: not a file name")
    p = Path(fname)
    if p.is_absolute() or ".." in p.parts or "\\" in fname or fname.startswith("~"):
        raise CheckpointError(f"{index} names shard {fname!r}, outside the checkpoint folder {d}: refused")
    full = d / p
    try:
        inside = full.resolve().is_relative_to(d.resolve())
    except OSError:
        inside = False
    if not inside:  # e.g. a symlink pointing out of the folder
        raise CheckpointError(f"{index} names shard {fname!r}, which resolves outside the checkpoint folder "
                              f"{d}: refused")
    return full


def _open(f: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(f)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """{tensor name: file} for a checkpoint directory (index, single file, or every *.safetensors).

    Every file is validated (header, each tensor's byte range inside the file: a truncated file is named);
    an index may only name files inside the folder (no absolute paths, no `..`, no symlink out)."""
    d = Path(path)
    wmap = None
    if d.is_file():
        files, d = [d], d.parent
    elif (d / INDEX_FILE).exists():
        try:
            index = json.loads((d / INDEX_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{d / INDEX_FILE}: not valid JSON ({e})") from e
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict):
            raise CheckpointError(f"{d / INDEX_FILE}: no 'weight_map'")
        shard = {f: _shard_path(d, f, d / INDEX_FILE) for f in sorted(set(wmap.values()), key=str)}
        files = sorted(set(shard.values()))
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{d / INDEX_FILE} names shard {f.name!r}, which does not exist")
    elif (d / SINGLE_FILE).exists():
        files = [d / SINGLE_FILE]
    else:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{d}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file")
    where: dict[str, Path] = {}
    for f in files:
        for k in _open(f).keys():
            if k in where:
                raise CheckpointError(f"tensor {k!r} is stored twice: in {where[k].name} and {f.name}")
            where[k] = f
    if wmap is not None:
        for k, f in wmap.items():
            if where.get(k) != d / f:
                raise CheckpointError(f"tensor {k!r}: the index says {f!r} but the shards "
                                      f"{'hold it in ' + where[k].name if k in where else 'do not hold it'}")
    return where


def _group_by_leaf(table: list[Entry]) -> "OrderedDict[tuple, list[Entry]]":
    groups: OrderedDict[tuple, list[Entry]] = OrderedDict()
    for e in table:
        groups.setdefault(e.path, []).append(e)
    return groups


def expected_hf_shapes(cfg: ModelConfig, flat_abstract: dict | None = None) -> dict[str, tuple]:
    """{HF name: HF shape} for cfg, derived from the abstract model through the name table."""
    if flat_abstract is None:
        from nemotron_jax.model import abstract_model  # noqa: PLC0415
        flat_abstract = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg))))
    out = {}
    for e in entries(cfg):
        if e.path not in flat_abstract:
            raise KeyError(f"name table maps {e.hf_name!r} to {path_str(e.path)}, which the model does not have")
        shape = tuple(flat_abstract[e.path].get_value().shape)
        out[e.hf_name] = e.transform.shape_to_hf(shape[1:] if e.expert is not None else shape)
    return out


# HF linear weights that ModelOpt may quantize (nn.Linear modules); routers, embeddings, conv1d and norms never are
_QUANTIZABLE = re.compile(r".*\.(in_proj|out_proj|[qkvo]_proj|up_proj|down_proj|fc1_latent_proj|fc2_latent_proj|"
                          r"eh_proj)\.weight|lm_head\.weight")


def _quantized_names(table: list[Entry], hf_shapes: dict, spec: QuantSpec | None) -> dict[str, str]:
    """{HF weight name: "NVFP4" | "FP8"} of the weights the quantization config says are quantized."""
    out = {}
    if spec is None:
        return out
    for e in table:
        if _QUANTIZABLE.fullmatch(e.hf_name):
            algo = spec.module_algo(e.hf_name[: -len(".weight")])
            if algo is not None:
                out[e.hf_name] = algo
    return out


def _expected_quant_tensors(name: str, algo: str, hf_shape: tuple) -> dict[str, tuple[tuple, tuple[str, ...]]]:
    """{tensor name: (shape, allowed dtype tags)} stored for one quantized weight (input_scale optional)."""
    m = name[: -len(".weight")]
    n, k = hf_shape
    if algo == "NVFP4":
        return {name: ((n, k // 2), ("U8",)), m + ".weight_scale": ((n, k // NVFP4_GROUP), ("F8_E4M3", "U8")),
                m + ".weight_scale_2": ((), ("F32",))}
    return {name: ((n, k), ("F8_E4M3",)), m + ".weight_scale": ((), ("F32",))}


def _scalar_ok(shape: tuple) -> bool:
    return shape in ((), (1,))


def _read_quant_tensors(name: str, algo: str, hf_shape: tuple, handles, where) -> dict[str, np.ndarray]:
    """The stored tensors of one quantized linear ({name: array}), each checked (presence, dtype, shape)."""
    want = _expected_quant_tensors(name, algo, hf_shape)
    vals = {}
    for t, (shape, tags) in want.items():
        if t not in where:
            raise CheckpointError(f"quantized checkpoint is missing tensor {t!r} ({algo} weight {name!r} needs it)")
        f = handles[where[t]]
        tag, got = f.dtype_tag(t), f.shape(t)
        if tag not in tags:
            raise CheckpointError(f"tensor {t!r} has dtype {tag}; {algo} stores it as {' or '.join(tags)}")
        if (got != shape) and not (shape == () and _scalar_ok(got)):
            if t == name and algo == "NVFP4":
                why = f"NVFP4 codes for a [{hf_shape[0]}, {hf_shape[1]}] weight are [{shape[0]}, {shape[1]}] uint8"
            elif t.endswith(".weight_scale") and algo == "NVFP4":
                why = (f"NVFP4 with group size {NVFP4_GROUP} needs [{shape[0]}, {shape[1]}] block scales "
                       f"(one per {NVFP4_GROUP} inputs); [{', '.join(map(str, got))}] means group size "
                       f"{hf_shape[1] // got[-1] if got and got[-1] else '?'}")
            else:
                why = f"expected {list(shape)}"
            raise CheckpointError(f"tensor {t!r} has shape {list(got)}: {why}")
        vals[t] = f.get(t)
    return vals


def _read_quantized(h: SafetensorsFile, name: str, algo: str, hf_shape: tuple, handles, where) -> np.ndarray:
    """The dequantized fp32 HF weight [N, K] of one quantized linear; every check names the tensor."""
    vals = _read_quant_tensors(name, algo, hf_shape, handles, where)
    m = name[: -len(".weight")]
    if algo == "NVFP4":
        s2 = vals[m + ".weight_scale_2"].reshape(())
        if not np.isfinite(s2) or s2 <= 0:
            raise CheckpointError(f"tensor {m + '.weight_scale_2'!r} = {s2}: must be finite and positive")
        return nvfp4_dequantize(vals[name], vals[m + ".weight_scale"], s2)
    s = vals[m + ".weight_scale"].reshape(())
    if not np.isfinite(s) or s <= 0:
        raise CheckpointError(f"tensor {m + '.weight_scale'!r} = {s}: must be finite and positive")
    return fp8_dequantize(vals[name], s)


def _read_nvfp4_packed(name: str, hf_shape: tuple, handles, where) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(codes uint8 [N, K/2], block scales [N, K/16] E4M3, scale_2) of one NVFP4 linear, as stored (no copy,
    no transpose); checked as for dequantizing, and the block scales must not hold the E4M3 NaN byte."""
    vals = _read_quant_tensors(name, "NVFP4", hf_shape, handles, where)
    m = name[: -len(".weight")]
    s2 = np.float32(vals[m + ".weight_scale_2"].reshape(()))
    if not np.isfinite(s2) or s2 <= 0:
        raise CheckpointError(f"tensor {m + '.weight_scale_2'!r} = {s2}: must be finite and positive")
    scales = vals[m + ".weight_scale"]
    if np.any((scales.view(np.uint8) & 0x7F) == 0x7F):
        raise CheckpointError(f"tensor {m + '.weight_scale'!r} holds NaN block scales (E4M3 byte 0x7F/0xFF)")
    return vals[name], scales.view(np.uint8), s2


def _packed_target(model, leaf_path: tuple):
    """(module, attribute) of a leaf that may hold a packed NVFP4 weight: a Linear's kernel or the routed
    experts' stacked up_proj / down_proj."""
    from nemotron_jax.layers.common import Linear  # noqa: PLC0415
    from nemotron_jax.layers.moe import RoutedExperts  # noqa: PLC0415

    obj = model
    for p in leaf_path[:-1]:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    attr = leaf_path[-1]
    if not ((isinstance(obj, Linear) and attr == "kernel")
            or (isinstance(obj, RoutedExperts) and attr in ("up_proj", "down_proj"))):
        raise RuntimeError(f"{path_str(leaf_path)}: an NVFP4 weight outside a Linear or the routed experts")
    return obj, attr


def load_hf_weights(path: str | Path, cfg: ModelConfig, *, quant: QuantSpec | None | str = "auto",
                    packed: bool = False, packed_impl: str | None = None) -> nnx.Module:
    """A NemotronModel for cfg with every parameter read from the Hub-layout safetensors under path.

    A ModelOpt-quantized checkpoint (hf_quant_config.json or quantization_config; quant="auto" reads it) is
    dequantized at load: each NVFP4 / FP8 weight becomes its exact fp32 value, then the parameter dtype.
    packed=True: NVFP4 weights stay packed instead (`quant.packed.NVFP4Weight` in place of the Linear's
    kernel or the routed experts' stack, in the checkpoint's [out, in] layout, dequantized inside the GEMM
    by `packed_impl`, default `quant.packed.DEFAULT_IMPL`); FP8 and unquantized weights load as usual, and
    so does a stacked expert leaf whose experts are not all NVFP4 (dequantized at load)."""
    from nemotron_jax.model import abstract_model  # noqa: PLC0415
    from nemotron_jax.quant import packed as pk  # noqa: PLC0415

    packed_impl = pk.DEFAULT_IMPL if packed_impl is None else packed_impl
    if packed_impl not in pk.IMPLS:
        raise ConfigError(f"packed_impl={packed_impl!r}: use one of {pk.IMPLS}")

    spec = read_quant_spec(path) if quant == "auto" else quant
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = dict(nnx.to_flat_state(state))
    table = entries(cfg)
    hf_shapes = expected_hf_shapes(cfg, flat)
    where = checkpoint_files(path)
    qnames = _quantized_names(table, hf_shapes, spec)
    expected = set(hf_shapes)
    optional: set[str] = set()
    for n, algo in qnames.items():
        m = n[: -len(".weight")]
        expected |= set(_expected_quant_tensors(n, algo, hf_shapes[n]))
        optional.add(m + ".input_scale")
        if spec is not None and spec.kv_cache_algo:
            optional |= {m + "." + s for s in KV_SUFFIXES}
    if spec is not None and spec.kv_cache_algo:  # FP8 KV cache scales sit on the attention k/v projections
        optional |= {n[: -len(".weight")] + "." + s for n in hf_shapes for s in KV_SUFFIXES
                     if re.search(r"\.[kv]_proj\.weight$", n)}
    missing = expected - set(where)
    if missing:
        scale_missing = sorted(x for x in missing if not x.endswith(".weight") or x in qnames)
        if scale_missing and qnames:
            raise CheckpointError(f"quantized checkpoint {path} is missing tensor(s) {_short(scale_missing)} "
                                  f"(its {spec.algo} quantization config says these modules are quantized)")
        raise CheckpointError(f"checkpoint {path} is missing tensor(s) {_short(missing)} "
                              f"(the config's layer pattern {cfg.hybrid_override_pattern!r} needs them)")
    unexpected = set(where) - expected - optional
    if unexpected:
        hint = ""
        if spec is None and any(x.endswith((".weight_scale", ".weight_scale_2", ".input_scale")) for x in unexpected):
            hint = " (quantization scales, but the checkpoint has no hf_quant_config.json / quantization_config)"
        elif spec is not None:
            hint = f" (not quantized according to {spec.source})"
        raise CheckpointError(f"checkpoint {path} has unexpected tensor(s) {_short(unexpected)}, which the "
                              f"config (pattern {cfg.hybrid_override_pattern!r}, MTP "
                              f"{'on' if cfg.mtp_enabled else 'off'}) does not use{hint}")
    groups = _group_by_leaf(table)
    leftover = set(flat) - set(groups)
    if leftover:  # the table does not cover the model: a bug here, not in the checkpoint
        raise RuntimeError(f"no HF tensor fills {_short(path_str(p) for p in leftover)}")

    handles = {f: _open(f) for f in sorted(set(where.values()))}
    packed_leaves: dict[tuple, Any] = {}
    try:
        for leaf_path, group in groups.items():
            var = flat[leaf_path]
            sds = var.get_value()
            if packed and all(qnames.get(e.hf_name) == "NVFP4" for e in group):
                packed_leaves[leaf_path] = _load_packed_leaf(group, hf_shapes, handles, where)
                continue
            buf = np.empty(sds.shape, dtype=sds.dtype)
            filled = 0
            for e in group:
                h = handles[where[e.hf_name]]
                if e.hf_name in qnames:
                    raw = _read_quantized(h, e.hf_name, qnames[e.hf_name], hf_shapes[e.hf_name], handles, where)
                else:
                    tag = h.dtype_tag(e.hf_name)
                    if tag not in FLOAT_DTYPES:
                        raise CheckpointError(f"tensor {e.hf_name!r} has dtype {tag}; expected a float type "
                                              f"({', '.join(FLOAT_DTYPES)})")
                    shape = h.shape(e.hf_name)
                    if shape != hf_shapes[e.hf_name]:
                        raise CheckpointError(f"tensor {e.hf_name!r} has shape {list(shape)}; the config needs "
                                              f"{list(hf_shapes[e.hf_name])}")
                    raw = h.get(e.hf_name)
                val = e.transform.to_ours(raw)
                if e.expert is None:
                    buf[...] = val.astype(buf.dtype)
                    filled += buf.size
                else:
                    buf[e.expert] = val.astype(buf.dtype)
                    filled += val.size
                del val, raw
            assert filled == buf.size, leaf_path
            var.set_value(jnp.asarray(buf))
            del buf
    finally:
        for h in handles.values():
            h.close()
    model = nnx.merge(graphdef, state)
    for leaf_path, p in packed_leaves.items():
        obj, attr = _packed_target(model, leaf_path)
        setattr(obj, attr, pk.NVFP4Weight(p, impl=packed_impl))
    return model


def _load_packed_leaf(group: list[Entry], hf_shapes: dict, handles, where):
    """One leaf's NVFP4 weight(s) kept packed: a PackedNVFP4 [N, K] for a linear, [E, N, K] stacked for the
    routed experts (expert j's codes in slot j, scale_2 [E])."""
    from nemotron_jax.quant.packed import PackedNVFP4  # noqa: PLC0415

    if group[0].expert is None:
        assert len(group) == 1, group
        e = group[0]
        return PackedNVFP4.from_arrays(*_read_nvfp4_packed(e.hf_name, hf_shapes[e.hf_name], handles, where))
    n_exp = len(group)
    n, k = hf_shapes[group[0].hf_name]
    codes = np.empty((n_exp, n, k // 2), np.uint8)
    scales = np.empty((n_exp, n, k // NVFP4_GROUP), np.uint8)
    s2 = np.empty((n_exp,), np.float32)
    seen = set()
    for e in group:
        c, s, s2[e.expert] = _read_nvfp4_packed(e.hf_name, hf_shapes[e.hf_name], handles, where)
        codes[e.expert], scales[e.expert] = c, s
        seen.add(e.expert)
    assert seen == set(range(n_exp)), (group[0].path, sorted(seen))
    return PackedNVFP4.from_arrays(codes, scales, s2)


def from_hf(path: str | Path, dtype: Any = jnp.float32, *, strict: bool = True, dequantize: bool = True,
            packed_impl: str | None = None, **config_overrides: Any):
    """Load an HF NemotronH checkpoint directory into a NemotronModel; `model(tokens)` gives [B, T, V] logits.

    dtype: parameter and compute dtype (float32 or bfloat16; the router weight and correction bias stay fp32).
    strict=False: unknown config.json keys only warn. config_overrides: ModelConfig fields to set on top
    (e.g. ssd_impl="reference"). The HF dt clamp is kept: time_step_limit=(time_step_min, inf).
    A ModelOpt NVFP4 / FP8 checkpoint (docs/quantized_checkpoints.md) is dequantized at load
    (dequantize=True, exact: each weight is E2M1/E4M3 code x scales in fp32, then `dtype`).
    dequantize=False keeps NVFP4 weights packed in memory (4.5 bits per weight, ModelOpt's layout) and
    dequantizes them inside each GEMM (nemotron_jax/quant/packed.py; `packed_impl` "reference" (default),
    "auto" or "pallas"): with the reference the logits equal the dequantize=True model's exactly. Such a
    model is for inference: a backward pass through a packed weight raises PackedWeightError.
    FP8 weights are dequantized at load either way.
    """
    cfg = config_from_hf(path, dtype=_dtype_name(dtype), strict=strict, **config_overrides)
    if dequantize and packed_impl is not None:
        raise ConfigError("from_hf: packed_impl applies to dequantize=False (packed NVFP4 weights) only")
    return load_hf_weights(path, cfg, packed=not dequantize, packed_impl=packed_impl)


def _hf_array(flat: dict, e: Entry, out_dtype) -> np.ndarray:
    leaf = flat[e.path].get_value()
    a = leaf[e.expert] if e.expert is not None else leaf
    a = np.asarray(a)
    if out_dtype is not None and e.path[-2:-1] != ("gate",):  # HF keeps the router weight and bias in fp32
        a = a.astype(out_dtype)
    return np.ascontiguousarray(e.transform.to_hf(a))


def _quantize_entry(a: np.ndarray, name: str, algo: str, amax: Any = None) -> dict[str, np.ndarray]:
    m = name[: -len(".weight")]
    if algo == "NVFP4":
        packed, scale, scale2 = nvfp4_quantize(a, amax=amax)
        return {name: packed, m + ".weight_scale": scale, m + ".weight_scale_2": np.asarray(scale2, np.float32)}
    q, scale = fp8_quantize(a)
    return {name: q, m + ".weight_scale": np.asarray(scale, np.float32)}


def to_hf(model, path: str | Path, *, dtype: Any = None, max_shard_bytes: int = 5 * 2**30,
          quantize: str | None = None, exclude_modules: list[str] | None = None) -> list[Path]:
    """Write `model` as an HF NemotronH checkpoint (Hub layout + config.json); returns the files written.

    dtype: cast the weights on the way out (e.g. jnp.bfloat16; the router stays fp32 as in HF); default:
    each parameter's own dtype. Above max_shard_bytes the safetensors are sharded with an index file.
    quantize="nvfp4" | "fp8": post-training weight quantization into NVIDIA ModelOpt's unified HF layout
    (hf_quant_config.json + quantization_config; per linear weight / weight_scale [/ weight_scale_2]),
    bit for bit as ModelOpt's dynamic weight quantizer. The quantizer sees each weight in the dtype it is
    written in (`dtype`, default the parameter's). exclude_modules: HF module names / fnmatch patterns
    kept in high precision; default `released_exclude_modules(cfg)` (LM head, attention, the Mamba layer
    before each attention layer, MTP), plus any NVFP4 weight whose input width is not a multiple of 16.
    No activation calibration is run, so no `input_scale` is written.
    """
    cfg: ModelConfig = model.cfg
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    out_dtype = None if dtype is None else jnp.dtype(dtype)
    hf_cfg = config_to_hf(cfg, torch_dtype=(out_dtype.name if out_dtype is not None else cfg.param_dtype))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    from nemotron_jax.quant.packed import NVFP4Weight  # noqa: PLC0415
    if any(isinstance(v, NVFP4Weight) for v in flat.values()):
        raise ConfigError("to_hf of a model with packed NVFP4 weights (from_hf(..., dequantize=False)) is not "
                          "supported; load the checkpoint with dequantize=True to re-export it")
    table = entries(cfg)
    missing = set(flat) - {e.path for e in table}
    if missing:
        raise RuntimeError(f"parameters with no HF name: {_short(path_str(p) for p in missing)}")
    spec = None
    qnames: dict[str, str] = {}
    if quantize is not None:
        if quantize not in ("nvfp4", "fp8"):
            raise ConfigError(f"to_hf quantize={quantize!r}: use 'nvfp4', 'fp8' or None")
        algo = quantize.upper()
        exclude = list(released_exclude_modules(cfg) if exclude_modules is None else exclude_modules)
        spec = QuantSpec(algo=algo, group_size=NVFP4_GROUP if algo == "NVFP4" else None, exclude=exclude)
        hf_shapes = expected_hf_shapes(cfg, flat)
        qnames = _quantized_names(table, hf_shapes, spec)
        for n in sorted(qnames):
            if algo == "NVFP4" and hf_shapes[n][1] % NVFP4_GROUP:
                del qnames[n]
                spec.exclude.append(n[: -len(".weight")])

    # ModelOpt's export (preprocess_linear_fusion) gives the NVFP4 q/k/v projections of one attention layer,
    # which engines fuse, one weight_scale_2: from the max of their amaxes. (Its FP8 export keeps them apart.)
    shared_amax: dict[str, Any] = {}
    by_name = {e.hf_name: e for e in table}
    for n in [n for n in qnames if n.endswith(".q_proj.weight") and qnames[n] == "NVFP4"]:
        trio = [n.replace(".q_proj.", f".{p}_proj.") for p in "qkv"]
        if all(qnames.get(t) == "NVFP4" for t in trio):
            amax = max(np.float32(np.abs(_hf_array(flat, by_name[t], out_dtype).astype(np.float32)).max())
                       for t in trio)
            shared_amax.update({t: amax for t in trio})

    def nbytes(e: Entry) -> int:
        leaf = flat[e.path].get_value()
        n = math.prod(leaf.shape[1:] if e.expert is not None else leaf.shape)
        if e.hf_name in qnames:
            return n // 2 + n // NVFP4_GROUP if qnames[e.hf_name] == "NVFP4" else n
        return n * (out_dtype.itemsize if out_dtype is not None else leaf.dtype.itemsize)

    shards: list[list[Entry]] = [[]]
    size = 0
    for e in table:
        b = nbytes(e)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    written = []
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tensors = {}
        for e in shard:
            a = _hf_array(flat, e, out_dtype)
            if e.hf_name in qnames:
                tensors.update(_quantize_entry(a, e.hf_name, qnames[e.hf_name], shared_amax.get(e.hf_name)))
            else:
                tensors[e.hf_name] = a
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: fname for k in tensors})
        written.append(out / fname)
        del tensors
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_FILE)
    if spec is not None:
        from nemotron_jax import __version__ as version  # noqa: PLC0415

        producer = {"name": "nemotron-jax", "version": str(version)}
        (out / "hf_quant_config.json").write_text(json.dumps(spec.to_hf_quant_config(producer), indent=4) + "\n")
        written.append(out / "hf_quant_config.json")
        hf_cfg["quantization_config"] = spec.to_quantization_config(producer)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    written.append(out / "config.json")
    return written
