"""The HF name table on the real presets, abstractly (nnx.eval_shape: no weights are allocated).

names_nano.json / names_super.json list every tensor of a Hub checkpoint (transformers on torch's meta device;
Super's mtp.* names from spec section 6), with the experts folded into "{j}" entries.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jax
import pytest
from flax import nnx

from nemotron_jax import ModelConfig
from nemotron_jax.convert import config_from_hf
from nemotron_jax.convert.hf import expected_hf_shapes
from nemotron_jax.convert.hf_names import hub_names, resolve
from nemotron_jax.model import abstract_model

REF = Path(__file__).resolve().parents[1] / "fixtures" / "hf_reference"


def expand_names(entries: list[dict]) -> dict[str, tuple]:
    """Unfold {"name": "...experts.{j}...", "count": n} entries (as tools/make_hf_reference.py does)."""
    out = {}
    for t in entries:
        for j in range(t.get("count", 1)):
            name = t["name"].replace("{j}", str(j)) if "count" in t else t["name"]
            assert name not in out, name
            out[name] = tuple(t["shape"])
    return out


@pytest.mark.parametrize("preset,fname", [("nano_30b_a3b", "names_nano.json"),
                                          ("super_120b_a12b", "names_super.json")])
def test_name_table_covers_hub_checkpoint(preset, fname):
    doc = json.loads((REF / fname).read_text())
    hub = expand_names(doc["tensors"])
    assert len(hub) == doc["num_tensors"]
    cfg = ModelConfig.preset(preset)
    model = abstract_model(cfg)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in flat.values())  # nothing allocated

    # every Hub name resolves through the regex table to a leaf (or expert slice) of the right shape
    covered: Counter = Counter()
    for name, shape in hub.items():
        e = resolve(name)
        assert e.path in flat, (name, e.path)
        leaf = flat[e.path].get_value().shape
        ours = leaf[1:] if e.expert is not None else leaf
        assert e.transform.shape_to_hf(tuple(ours)) == shape, (name, shape, leaf)
        if e.expert is not None:
            assert 0 <= e.expert < leaf[0], name
        covered[(e.path, e.expert)] += 1
    # ... exactly once, and every leaf (every expert slot) is covered
    assert max(covered.values()) == 1
    want = set()
    for path, var in flat.items():
        shape = var.get_value().shape
        if path[-2:-1] == ("experts",):
            want |= {(path, j) for j in range(shape[0])}
        else:
            want.add((path, None))
    assert set(covered) == want
    # the enumeration used by import/export gives the same names and shapes
    assert hub_names(cfg) and set(hub_names(cfg)) == set(hub)
    assert expected_hf_shapes(cfg, flat) == hub
    # HF's own config for the preset parses to the same architecture (intermediate_size: no '-' layers)
    hf_cfg = config_from_hf(doc["config"], dtype=cfg.dtype)
    arch = cfg.replace(initializer_range=hf_cfg.initializer_range, intermediate_size=hf_cfg.intermediate_size,
                       time_step_limit=hf_cfg.time_step_limit, param_dtype=hf_cfg.param_dtype)
    assert hf_cfg == arch
    if preset.startswith("super"):
        mtp = {n for n in hub if n.startswith("mtp.")}
        assert {"mtp.layers.0.eh_proj.weight", "mtp.layers.1.final_layernorm.weight",
                "mtp.layers.1.mixer.experts.511.up_proj.weight"} <= mtp
        assert doc["num_tensors"] == 42683
    else:
        assert not any(n.startswith("mtp.") for n in hub) and doc["num_tensors"] == 6243
