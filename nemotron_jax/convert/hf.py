"""Import / export of HF NemotronH checkpoints (Hub layout safetensors + config.json).

    model = from_hf("path/to/NVIDIA-Nemotron-3-Nano-30B-A3B", dtype=jnp.bfloat16)
    logits = model(tokens)                        # [B, T, V] fp32
    to_hf(model, "out/")                          # loads with NemotronHForCausalLM.from_pretrained

Import builds the model abstractly (nnx.eval_shape: no memory), then fills it one parameter leaf at a time:
each HF tensor is read alone through `safe_open` (a single file, a sharded checkpoint with
`model.safetensors.index.json`, or every *.safetensors in the directory), transformed (transpose, conv
reshape), cast to the leaf's dtype and written into the leaf's buffer (the expert slot for routed experts);
the finished leaf becomes a device array and the buffer is dropped. Peak host memory is the model plus its
largest leaf. Errors name the tensor: missing, unexpected, wrong shape, non-floating dtype.

Numerics: with dtype=float32 the compute dtype is float32 too, and the HF dt clamp (time_step_min) is set as
our `time_step_limit`, so logits match transformers' fp32 eager forward (tests/convert/test_hf.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from nemotron_jax.config import ConfigError, ModelConfig
from nemotron_jax.convert.hf_config import config_from_hf, config_to_hf
from nemotron_jax.convert.hf_names import Entry, entries, path_str

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


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """{tensor name: file} for a checkpoint directory (index, single file, or every *.safetensors)."""
    d = Path(path)
    if d.is_file():
        files, d = [d], d.parent
    elif (d / INDEX_FILE).exists():
        index = json.loads((d / INDEX_FILE).read_text())
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict):
            raise CheckpointError(f"{d / INDEX_FILE}: no 'weight_map'")
        files = sorted({d / f for f in wmap.values()})
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
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                if k in where:
                    raise CheckpointError(f"tensor {k!r} is stored twice: in {where[k].name} and {f.name}")
                where[k] = f
    if (d / INDEX_FILE).exists() and not Path(path).is_file():
        wmap = json.loads((d / INDEX_FILE).read_text())["weight_map"]
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


def load_hf_weights(path: str | Path, cfg: ModelConfig) -> nnx.Module:
    """A NemotronModel for cfg with every parameter read from the Hub-layout safetensors under path."""
    from nemotron_jax.model import abstract_model  # noqa: PLC0415

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = dict(nnx.to_flat_state(state))
    table = entries(cfg)
    hf_shapes = expected_hf_shapes(cfg, flat)
    where = checkpoint_files(path)
    missing = set(hf_shapes) - set(where)
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor(s) {_short(missing)} "
                              f"(the config's layer pattern {cfg.hybrid_override_pattern!r} needs them)")
    unexpected = set(where) - set(hf_shapes)
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has unexpected tensor(s) {_short(unexpected)}, which the "
                              f"config (pattern {cfg.hybrid_override_pattern!r}, MTP "
                              f"{'on' if cfg.mtp_enabled else 'off'}) does not use")
    groups = _group_by_leaf(table)
    leftover = set(flat) - set(groups)
    if leftover:  # the table does not cover the model: a bug here, not in the checkpoint
        raise RuntimeError(f"no HF tensor fills {_short(path_str(p) for p in leftover)}")

    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="numpy")) for f in sorted(set(where.values()))}
        for leaf_path, group in groups.items():
            var = flat[leaf_path]
            sds = var.get_value()
            buf = np.empty(sds.shape, dtype=sds.dtype)
            filled = 0
            for e in group:
                h = handles[where[e.hf_name]]
                sl = h.get_slice(e.hf_name)
                tag = sl.get_dtype()
                if tag not in FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {e.hf_name!r} has dtype {tag}; expected a float type "
                                          f"({', '.join(FLOAT_DTYPES)})")
                shape = tuple(sl.get_shape())
                if shape != hf_shapes[e.hf_name]:
                    raise CheckpointError(f"tensor {e.hf_name!r} has shape {list(shape)}; the config needs "
                                          f"{list(hf_shapes[e.hf_name])}")
                val = e.transform.to_ours(h.get_tensor(e.hf_name))
                if e.expert is None:
                    buf[...] = val.astype(buf.dtype)
                    filled += buf.size
                else:
                    buf[e.expert] = val.astype(buf.dtype)
                    filled += val.size
                del val
            assert filled == buf.size, leaf_path
            var.set_value(jnp.asarray(buf))
            del buf
    return nnx.merge(graphdef, state)


def from_hf(path: str | Path, dtype: Any = jnp.float32, *, strict: bool = True, **config_overrides: Any):
    """Load an HF NemotronH checkpoint directory into a NemotronModel; `model(tokens)` gives [B, T, V] logits.

    dtype: parameter and compute dtype (float32 or bfloat16; the router weight and correction bias stay fp32).
    strict=False: unknown config.json keys only warn. config_overrides: ModelConfig fields to set on top
    (e.g. ssd_impl="reference"). The HF dt clamp is kept: time_step_limit=(time_step_min, inf).
    """
    cfg = config_from_hf(path, dtype=_dtype_name(dtype), strict=strict, **config_overrides)
    return load_hf_weights(path, cfg)


def _hf_array(flat: dict, e: Entry, out_dtype) -> np.ndarray:
    leaf = flat[e.path].get_value()
    a = leaf[e.expert] if e.expert is not None else leaf
    a = np.asarray(a)
    if out_dtype is not None and e.path[-2:-1] != ("gate",):  # HF keeps the router weight and bias in fp32
        a = a.astype(out_dtype)
    return np.ascontiguousarray(e.transform.to_hf(a))


def to_hf(model, path: str | Path, *, dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write `model` as an HF NemotronH checkpoint (Hub layout + config.json); returns the files written.

    dtype: cast the weights on the way out (e.g. jnp.bfloat16; the router stays fp32 as in HF); default:
    each parameter's own dtype. Above max_shard_bytes the safetensors are sharded with an index file.
    """
    cfg: ModelConfig = model.cfg
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    out_dtype = None if dtype is None else jnp.dtype(dtype)
    hf_cfg = config_to_hf(cfg, torch_dtype=(out_dtype.name if out_dtype is not None else cfg.param_dtype))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    table = entries(cfg)
    missing = set(flat) - {e.path for e in table}
    if missing:
        raise RuntimeError(f"parameters with no HF name: {_short(path_str(p) for p in missing)}")

    def nbytes(e: Entry) -> int:
        leaf = flat[e.path].get_value()
        n = math.prod(leaf.shape[1:] if e.expert is not None else leaf.shape)
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
        tensors = {e.hf_name: _hf_array(flat, e, out_dtype) for e in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({e.hf_name: fname for e in shard})
        written.append(out / fname)
        del tensors
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_FILE)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    written.append(out / "config.json")
    return written
