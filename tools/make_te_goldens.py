"""Write NVFP4 golden data from TransformerEngine's pure-PyTorch reference quantizer.

Runs in a separate tool environment with torch (CPU) installed; it is not a project dependency and the
tests never import torch: they read the .npz files this script writes to tests/fixtures/nvfp4_te/.

The TE file is not vendored. Point the script at a TransformerEngine checkout (a work tree, or a bare git
directory plus a revision); the reference module
``transformer_engine/pytorch/custom_recipes/reference_nvfp4.py`` (class ``NVFP4QuantizerRef``) and its
helper ``reference_utils.py`` are loaded as they are, with the rest of the ``transformer_engine`` package
(the CUDA extension, ``quantized_tensor``, ``gemm``) replaced by minimal stand-ins that only provide the base
classes and names the reference imports. The numerics used here all live in the reference module itself
(``_apply_rht``, ``_quantize_blockwise_reference``, ``cast_to_fp4x2``), so the codes, block scales and
amax written below are TE's, computed by TE's code on the CPU.

    /tmp/hfvenv/bin/python tools/make_te_goldens.py --te-git-dir /path/to/TransformerEngine/.git
    /tmp/hfvenv/bin/python tools/make_te_goldens.py --te-root /path/to/TransformerEngine

One file per input case, ``<case>_<dtype>.npz``, holding the input (``x``: float32, or bfloat16 stored as its
uint16 bit pattern) and, for every block shape in {1x16, 16x16} and RHT in {off, on}, with prefix
``b{1|16}_r{0|1}_``: ``codes`` (uint8 [M, K/2], TE's packed layout: two E2M1 codes per byte, the even
column in the low nibble), ``scales`` (uint8 E4M3 bit patterns, [M, K/16] for 1x16, [M/16, K/16] for 16x16),
``amax`` (fp32 tensor amax TE returns), ``s_enc`` / ``s_dec`` (fp32 tensor scales, computed from that amax
with the same torch operations the reference uses inside ``_quantize_blockwise_reference``) and ``rot``
(TE's RHT-rotated tensor, in the input dtype, as fp32 / bf16 bits; the same for both block shapes).
``meta.json`` records the TE revision and torch version. The script is deterministic (seed 13): rerunning it
with the same TE revision and torch rewrites the same files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

REF = "transformer_engine/pytorch/custom_recipes/reference_nvfp4.py"
UTILS = "transformer_engine/pytorch/custom_recipes/reference_utils.py"
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nvfp4_te"
SHAPE = (32, 128)


# --------------------------------------------------------------------------------- loading TE's module
def _read(args, rel: str) -> str:
    if args.te_root:
        return (Path(args.te_root) / rel).read_text()
    return subprocess.run(["git", f"--git-dir={args.te_git_dir}", "show", f"{args.rev}:{rel}"],
                          check=True, capture_output=True, text=True).stdout


def _revision(args) -> str:
    gd = args.te_git_dir or str(Path(args.te_root) / ".git")
    try:
        return subprocess.run(["git", f"--git-dir={gd}", "rev-parse", args.rev], check=True,
                              capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a plain source tree without git metadata
        return "unknown"


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load_reference(args) -> types.ModuleType:
    """Import reference_nvfp4.py with stand-ins for the CUDA-only parts of the transformer_engine package."""

    class Quantizer:  # the base-class surface NVFP4QuantizerRef touches
        def __init__(self, *, rowwise: bool, columnwise: bool) -> None:
            self.rowwise_usage = rowwise
            self.columnwise_usage = columnwise
            self.internal = False

    class QuantizedTensorStorage:
        pass

    for pkg in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.custom_recipes"):
        _module(pkg, __path__=[])
    _module("transformer_engine.pytorch.quantized_tensor", Quantizer=Quantizer,
            QuantizedTensorStorage=QuantizedTensorStorage)
    # qgemm's default argument names GEMMType.FPROP; the GEMM itself is not used here
    _module("transformer_engine.pytorch.custom_recipes.gemm",
            GEMMType=types.SimpleNamespace(FPROP="fprop", DGRAD="dgrad", WGRAD="wgrad"), MMParams=object)
    loaded = {}
    for name, rel in (("reference_utils", UTILS), ("reference_nvfp4", REF)):
        full = f"transformer_engine.pytorch.custom_recipes.{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        setattr(sys.modules["transformer_engine.pytorch.custom_recipes"], name, mod)
        exec(compile(_read(args, rel), rel, "exec"), mod.__dict__)  # noqa: S102 - TE's own source
        loaded[name] = mod
    return loaded["reference_nvfp4"]


# ------------------------------------------------------------------------------------------- inputs
def _ties(rng) -> np.ndarray:
    """Blocks whose scaled values sit exactly on E2M1 midpoints: the tensor amax 2688 gives S_enc = 1, a
    block amax of 6 * 2**j gives s_b = 2**j exactly, so x * e_b lands on 0.25, 0.75, ..., 5."""
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    m, k = SHAPE
    x = np.zeros(SHAPE, np.float32)
    for r in range(m):
        for b in range(k // 16):
            s = np.float32(2.0 ** rng.integers(-3, 4))
            blk = rng.choice(mids, 16) * rng.choice(np.float32([-1, 1]), 16)
            blk[rng.integers(16)] = 6.0 * rng.choice([-1, 1])
            x[r, b * 16:(b + 1) * 16] = blk * s
    x[0, 0] = 2688.0  # tensor amax: S_enc = 1 (its own block gets s_b = 448)
    return x


def _neg_zero(rng) -> np.ndarray:
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x[rng.random(SHAPE) < 0.3] = -0.0
    x[:, 32:48] = -0.0  # whole blocks of -0.0 (amax 0)
    x[16:32, 64:80] = -0.0  # a whole 16x16 tile of -0.0
    x[:, 96:112] *= np.float32(1e-4)  # tiny negatives that round to -0 (code 0x8) next to -0.0 (code 0x0)
    x[:, 100] = -0.0
    x[0, 0] = 8.0
    return x


def _scale_boundary(rng) -> np.ndarray:
    """Block amaxes where TE's order amax_b * (S_enc * fp32(1/6)) and the other orders of the same product
    round to different E4M3 scales (found by search, fp32 and bf16-representable)."""
    g = np.float32(4.375)  # S_enc = 2688 / 4.375 = 614.4
    s_enc = np.float32(2688) / g
    mult = np.float32(s_enc * np.float32(1 / 6))
    cand = np.unique(rng.uniform(0.01, 4.3, 400000).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    te = torch.from_numpy(np.minimum(cand * mult, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    alt = torch.from_numpy(np.minimum((cand * np.float32(1 / 6)) * s_enc, 448)).to(
        torch.float8_e4m3fn).view(torch.uint8).numpy()
    alt2 = torch.from_numpy(np.minimum((cand / np.float32(6)) * s_enc, 448)).to(
        torch.float8_e4m3fn).view(torch.uint8).numpy()
    hard = cand[(te != alt) | (te != alt2)]
    m, k = SHAPE
    x = rng.standard_normal(SHAPE).astype(np.float32)
    xb = x.reshape(m, k // 16, 16)
    xb /= np.abs(xb).max(-1, keepdims=True)
    amb = rng.choice(hard, (m, k // 16)).astype(np.float32)
    xb *= amb[..., None]
    xb = np.round(xb.view(np.uint32).astype(np.int64) / 65536).astype(np.uint32) * 65536  # bf16-exact values
    x = xb.view(np.float32).reshape(SHAPE)
    # restore each block's amax exactly (rounding above may have moved it) and put the tensor amax in
    for r in range(m):
        for b in range(k // 16):
            j = np.argmax(np.abs(x[r, b * 16:(b + 1) * 16]))
            x[r, b * 16 + j] = np.copysign(amb[r, b], x[r, b * 16 + j])
    x[0, 0] = g
    return x


def inputs(rng) -> dict[str, np.ndarray]:
    m, k = SHAPE
    out = {}
    out["normal"] = (rng.standard_normal(SHAPE) * 2.5).astype(np.float32)
    t = rng.standard_t(2.0, SHAPE).astype(np.float32)  # heavy tails
    out["student_t"] = t
    out["lognormal"] = (rng.lognormal(0, 2.5, SHAPE) * rng.choice([-1, 1], SHAPE)).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    z[5] = 0
    z[16:32, :32] = 0  # zero 16x16 tiles
    z[:, 48:64] = 0
    out["zero_rows"] = z
    o = rng.standard_normal(SHAPE).astype(np.float32)
    o[rng.random(SHAPE) < 0.002] = np.float32(3e4)
    o[3, 7] = -1e5
    out["outliers"] = o
    out["ties"] = _ties(rng)
    out["neg_zero"] = _neg_zero(rng)
    out["scale_boundary"] = _scale_boundary(rng)
    out["all_zero"] = np.zeros(SHAPE, np.float32)
    return out


# ------------------------------------------------------------------------------------------ goldens
def _tensor_scales(amax: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """S_enc, S_dec as the reference computes them from the (fp32) amax inside
    _quantize_blockwise_reference (the module returns only the amax)."""
    e4m3_max = torch.tensor(448.0, dtype=torch.float32)
    e2m1_max = torch.tensor(6.0, dtype=torch.float32)
    s_enc = torch.div(e4m3_max * e2m1_max, amax)
    s_enc = torch.min(s_enc, torch.tensor(torch.finfo(torch.float32).max, dtype=torch.float32))
    if s_enc == torch.tensor(0.0, dtype=torch.float32):
        s_enc = torch.tensor(1.0, dtype=torch.float32)
    s_dec = torch.div(1.0, s_enc)
    return s_enc.reshape(()).numpy().astype(np.float32), s_dec.reshape(()).numpy().astype(np.float32)


def te_quantize(ref, x: torch.Tensor, block, rht: bool) -> dict[str, np.ndarray]:
    """TE's codes / scales / amax for x [M, K], blocks along K. Without RHT: the rowwise path. With RHT: TE only
    rotates the columnwise copy (of tensor.t()), so the quantizer is given x.t() and its columnwise output
    is x rotated along K and quantized along K."""
    q = ref.NVFP4QuantizerRef(dtype=ref.reference_utils.Fp4Formats.E2M1, rowwise=not rht, columnwise=rht,
                              quant_tile_shape=block, with_rht=rht)
    if rht:
        r = q.quantize(x.t().contiguous())
        data, scale, amax = r.data_t, r.scale_t, r.global_amax_col
        rot = q._apply_rht(x.contiguous())  # the same call the quantizer made on x
    else:
        r = q.quantize(x)
        data, scale, amax = r.data, r.scale, r.global_amax_row
        rot = None
    scale = scale.view(torch.uint8).numpy()
    if tuple(block) == (16, 16):
        scale = scale[::16]  # TE repeats each tile's scale on its 16 rows
    s_enc, s_dec = _tensor_scales(amax.to(torch.float32))
    out = dict(codes=data.numpy().astype(np.uint8), scales=np.ascontiguousarray(scale), amax=amax.reshape(()).numpy(),
               s_enc=s_enc, s_dec=s_dec)
    if rot is not None:
        out["rot"] = _bits(rot)
    return out


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--te-root", help="TransformerEngine work tree")
    src.add_argument("--te-git-dir", help="TransformerEngine git directory (read with git show)")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_reference(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for name, x32 in inputs(rng).items():
        for dt, tdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            x = torch.from_numpy(x32.copy()).to(tdt)
            arrays = {"x": _bits(x)}
            for block in ((1, 16), (16, 16)):
                for rht in (False, True):
                    for key, val in te_quantize(ref, x, block, rht).items():
                        if key == "rot":  # the same rotation for both block shapes: stored once
                            arrays["rot"] = val
                        else:
                            arrays[f"b{block[0]}_r{int(rht)}_{key}"] = val
            np.savez_compressed(out / f"{name}_{dt}.npz", **arrays)
    meta = dict(te_revision=_revision(args), te_file=REF, torch=torch.__version__, seed=args.seed,
                shape=list(SHAPE), generator="tools/make_te_goldens.py")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}: {sorted(p.name for p in out.glob('*.npz'))}")


if __name__ == "__main__":
    main()
