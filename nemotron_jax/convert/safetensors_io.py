"""Safetensors files read and written by their documented layout, validated before any tensor is touched.

A safetensors file is: 8 bytes little-endian header length n, n bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the data
buffer. Only JSON and raw little-endian numbers are read: no pickle, no code.

Why not only `safetensors.safe_open`: its numpy backend cannot return FP8 tensors (F8_E4M3, used by the
ModelOpt checkpoints), cannot write them, and reports a truncated file without naming it. `read_header`
checks a file fully (size, header, every tensor's byte range inside the file, byte count = dtype x shape,
no overlaps) and every error names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype tag -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
TAGS = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A malformed safetensors file; the message names the file (and the tensor)."""


def read_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, after checking that every
    tensor lies inside the file (a truncated download fails here, naming the file)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{p}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{p}: truncated or corrupt safetensors file (header of {n} bytes, "
                                       f"file of {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{p}: cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{p}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{p}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) < {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{p}: tensor {name!r} has a malformed header entry")
        tag, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        if tag not in DTYPES:
            raise SafetensorsError(f"{p}: tensor {name!r} has unknown dtype {tag!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{p}: tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e):
            raise SafetensorsError(f"{p}: tensor {name!r} has malformed data offsets {[b, e]}")
        if e > data:
            raise SafetensorsError(f"{p}: truncated safetensors file: tensor {name!r} needs bytes {b}..{e} of "
                                   f"the data buffer, which holds only {data} bytes")
        if e - b != math.prod(shape) * DTYPES[tag].itemsize:
            raise SafetensorsError(f"{p}: tensor {name!r}: {e - b} bytes for shape {shape} of {tag}")
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{p}: tensors {n0!r} and {n1!r} overlap")
    return header


class SafetensorsFile:
    """A validated safetensors file whose tensors are read one at a time (memory-mapped, copied out)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        with open(self.path, "rb") as f:
            (self._n,) = struct.unpack("<Q", f.read(8))
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype_tag(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        b, e = info["data_offsets"]
        start = 8 + self._n
        buf = np.array(self._mm[start + b:start + e])  # a copy: the result does not pin the file
        return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self) -> None:
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (numpy, including ml_dtypes bfloat16 / float8_e4m3fn) as a safetensors file."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    arrays = []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scale into shape [1])
            a = a.copy(order="C")
        if a.dtype not in TAGS:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} has no safetensors tag")
        header[name] = {"dtype": TAGS[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data buffer 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
