"""Making broken checkpoints for the loaders' bad-input tests: copy a fixture folder, then edit its tensors or
one of its JSON files in place. Tensors go through our safetensors reader/writer (every dtype the fixtures hold,
FP8 and packed uint8 included), which tests/convert checks against the safetensors library."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from nemotron_jax.convert.safetensors_io import SafetensorsFile, save


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy the checkpoint folder `src` to dst / src.name; returns the copy."""
    d = dst / src.name
    shutil.copytree(src, d)
    return d


def read_tensors(d: Path, file: str = "model.safetensors") -> dict[str, np.ndarray]:
    f = SafetensorsFile(d / file)
    try:
        return {k: f.get(k) for k in f.keys()}
    finally:
        f.close()


def edit_tensors(d: Path, fn: Callable[[dict[str, np.ndarray]], None], file: str = "model.safetensors") -> None:
    """Read every tensor of d / file, let `fn` change the dict in place, write it back."""
    t = read_tensors(d, file)
    fn(t)
    save(t, d / file)


def edit_json(d: Path, file: str, fn: Callable[[dict], None]) -> None:
    """Load d / file, let `fn` change it in place, write it back."""
    obj = json.loads((d / file).read_text())
    fn(obj)
    (d / file).write_text(json.dumps(obj))
