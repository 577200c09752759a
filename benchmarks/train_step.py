"""Training-step speed on the fixed "bench" model (issue 14), side by side with HF transformers' PyTorch NemotronH.

    python benchmarks/train_step.py                          # full run: 8 interleaved rounds, fp32 / bf16 / nvfp4, HF
    python benchmarks/train_step.py --quick                  # plumbing check: 2 rounds, short profile
    python benchmarks/train_step.py --compile-only           # compile time of the train step: tiny, small, bench
    python benchmarks/train_step.py --preset 1b --variants bf16 --kinds step --no-hf   # the ~1B model (GPU)

The model is `configs/bench.py` (hidden 512, pattern MEM*EMEM*EME, 33.8M parameters, batch 4 x 512 tokens) built
in nemotron_jax. For each variant (fp32 compute, the default bf16 compute, the emulated NVFP4 recipe) it compiles
and times three jitted functions of the same random batch:

  fwd     the loss (main cross-entropy + MoE aux) from the parameters, no gradient
  fwdbwd  the loss and its gradient w.r.t. every parameter
  step    the full train step of nemotron_jax.train.step (AdamW with clipping and weight-decay mask, the
          aux-loss-free router-bias update, metrics), as the trainer jits it (state donated)

HF transformers (NemotronHForCausalLM, fp32, torch with 2 threads, its pure-torch Mamba path) runs in the tool venv
of tools/README.md as a long-lived worker (benchmarks/hf_train_worker.py) built from the same architecture
(nemotron_jax.convert.config_to_hf; random weights, nothing shared but the config) and times fwd and fwdbwd on the
same batch shape. Every round each timed thing is called once, in turn: HF fwd, ours fwd per variant, HF fwdbwd,
ours fwdbwd per variant, ours step per variant, then the machine's matmul peak (the best of a few jnp.dot of
--peak-n square matrices, fp32 and bf16), so that all of them see the same machine noise. Medians / min / max over
the rounds; the ratio to HF is the median of the per-round ratios.

Also reported: FLOPs of each compiled function (XLA cost analysis) and MFU against the peak measured for the dtype
the variant computes in (bf16 for nvfp4, which is an emulation with bf16 GEMMs); XLA memory analysis (arguments +
outputs + temporaries - aliased) for ours, max RSS of the worker process for torch; compile time (trace + lower +
compile, and the first call); and a per-layer-kind breakdown of the train step from a jax profiler trace: each
executed XLA op (thunk) of the trace is mapped to its HLO instruction, whose metadata gives the named scope of its
block (`layer{i}_{kind}`) and the Python stack it was traced from, which says the part (Mamba: SSD, conv,
projections, norms; MoE: routing, dispatch, grouped GEMMs, combine, shared expert; attention; head and loss;
optimizer). Times are the ops' own (self) time summed per step, shares of that sum.

Writes a markdown table to stdout and everything as JSON to --out (default runs/bench/train_step.json).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import linecache
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

# The ~1B model for the GPU run (benchmarks/gpu_all.sh): 1.11B parameters, 18 blocks (8 Mamba-2, 8 MoE, 2
# attention), Nano-shaped Mamba heads; on top of the `tiny` preset like the bench model.
PRESET_1B = dict(
    vocab_size=32768, hidden_size=2048, hybrid_override_pattern="MEMEM*EMEMEM*EMEME",
    num_attention_heads=16, num_key_value_heads=2, head_dim=128,
    mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
    n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=640, moe_shared_expert_intermediate_size=1536,
    routed_scaling_factor=2.5, initializer_range=0.02,
)
VARIANTS = {  # name -> (compute dtype, precision policy, dtype of the matmul peak it is measured against)
    "fp32": ("float32", "bf16", "float32"),
    "bf16": ("bfloat16", "bf16", "bfloat16"),
    "nvfp4": ("bfloat16", "nvfp4", "bfloat16"),
}
KINDS = ("fwd", "fwdbwd", "step")


def _load_module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def preset_model(preset: str) -> tuple[str, dict, int, int]:
    """(base ModelConfig preset, overrides, seq_len, batch) of a benchmark preset."""
    if preset == "bench":
        b = _load_module(REPO / "configs" / "bench.py", "_bench_config")
        return b.BASE_PRESET, dict(b.BENCH_MODEL), b.SEQ_LEN, b.BATCH_SIZE
    if preset == "1b":
        return "tiny", dict(PRESET_1B), 4096, 4
    if preset == "tiny":  # the main job's model and batch (configs/tiny.py)
        return "tiny", {"vocab_size": 256}, 128, 16
    raise SystemExit(f"unknown --preset {preset!r}: bench, tiny or 1b")


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend has it)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def _memory(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    get = lambda k: int(getattr(m, k, 0) or 0)  # noqa: E731
    arg, out, tmp, alias = (get("argument_size_in_bytes"), get("output_size_in_bytes"), get("temp_size_in_bytes"),
                            get("alias_size_in_bytes"))
    return {"argument_mb": arg / 2**20, "output_mb": out / 2**20, "temp_mb": tmp / 2**20, "alias_mb": alias / 2**20,
            "peak_mb": (arg + out + tmp - alias) / 2**20}


# ----------------------------------------------------------------------------- the JAX side
class Ours:
    """One variant of the bench model: compiled fwd / fwdbwd / step on one batch, timed one call at a time."""

    def __init__(self, base: str, overrides: dict, variant: str, tokens_np: np.ndarray, kinds: tuple[str, ...]):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        from nemotron_jax import ModelConfig  # noqa: PLC0415
        from nemotron_jax import model as M  # noqa: PLC0415
        from nemotron_jax.losses import total_loss  # noqa: PLC0415
        from nemotron_jax.train.optim import make_optimizer, wsd_schedule  # noqa: PLC0415
        from nemotron_jax.train.step import init_train_state, make_train_step  # noqa: PLC0415

        dtype, precision, self.peak_dtype = VARIANTS[variant]
        self.variant, self.kinds = variant, kinds
        self.cfg = cfg = ModelConfig.preset(base, **overrides, dtype=dtype, precision=precision)
        # the trainer's optimizer (configs/tiny.py's settings; the values do not change the work done)
        schedule = wsd_schedule(1e-3, 1000, 50, 0.2, 0.1, "minus_sqrt")
        optimizer = make_optimizer(schedule, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)
        model = M.init_model(cfg, seed=0)
        graphdef, self.state = init_train_state(model, optimizer, 0)
        del model
        self.n_params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
        self.tokens = jnp.asarray(tokens_np)
        self.batch = {"tokens": self.tokens}
        qkey = jax.random.PRNGKey(1) if precision != "bf16" else None

        def loss(params, rest, tokens):
            out = M.apply(graphdef, (params, rest), tokens, quant_key=qkey)
            return total_loss(cfg, out, tokens)[0]

        fns = {"fwd": (jax.jit(loss), lambda: (self.state.params, self.state.rest, self.tokens)),
               "fwdbwd": (jax.jit(jax.value_and_grad(loss)), lambda: (self.state.params, self.state.rest, self.tokens)),
               "step": (jax.jit(make_train_step(cfg, graphdef, optimizer, schedule), donate_argnums=0),
                        lambda: (self.state, self.batch))}
        self.compiled, self.args_of, self.info = {}, {}, {}
        for kind in kinds:
            fn, args_of = fns[kind]
            t0 = time.perf_counter()
            lowered = fn.lower(*args_of())
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            self.compiled[kind], self.args_of[kind] = compiled, args_of
            self.info[kind] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "flops": _cost_flops(compiled),
                               "memory": _memory(compiled)}
            self.info[kind]["first_call_s"] = self.call(kind)  # warm-up
            print(f"  {variant} {kind}: compiled in {t2 - t0:.1f} s, first call {self.info[kind]['first_call_s']:.2f} s",
                  flush=True)

    def call(self, kind: str) -> float:
        import jax  # noqa: PLC0415
        args = self.args_of[kind]()
        t0 = time.perf_counter()
        out = self.compiled[kind](*args)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        if kind == "step":
            self.state = out[0]  # the old state was donated
        return dt


class Peak:
    """The machine's matmul rate: jnp.dot of two [n, n] matrices, best of `reps` back-to-back calls."""

    def __init__(self, n: int, reps: int = 3):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
        self.n, self.reps = n, reps
        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        self.fns = {}
        for name, dt, pref in (("float32", jnp.float32, None), ("bfloat16", jnp.bfloat16, None),
                               ("bfloat16_acc_f32", jnp.bfloat16, jnp.float32)):
            a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
            b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
            f = jax.jit(lambda x, y, pref=pref: jnp.dot(x, y, preferred_element_type=pref)).lower(a, b).compile()
            jax.block_until_ready(f(a, b))
            self.fns[name] = (f, a, b)

    def measure(self) -> dict:
        import jax  # noqa: PLC0415
        res = {}
        for name, (f, a, b) in self.fns.items():
            best = math.inf
            for _ in range(self.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(a, b))
                best = min(best, time.perf_counter() - t0)
            res[name] = 2 * self.n ** 3 / best
        return res


# ----------------------------------------------------------------------------- the HF side
class HFWorker:
    def __init__(self, python: str, config_dir: str, threads: int):
        self.p = subprocess.Popen([python, str(REPO / "benchmarks" / "hf_train_worker.py"), config_dir, str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the HF worker ({python}) exited before it was ready")
        self.info = json.loads(line)

    def call(self, op: str, ids: np.ndarray) -> dict:
        self.p.stdin.write(json.dumps({"op": op, "ids": ids.tolist()}) + "\n")
        self.p.stdin.flush()
        ans = json.loads(self.p.stdout.readline())
        if "error" in ans:
            raise RuntimeError(f"HF worker: {ans['error']}\n{ans.get('trace', '')}")
        return ans

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.p.kill()


def start_hf(a, base: str, overrides: dict):
    if a.no_hf:
        print("HF column skipped (--no-hf)", flush=True)
        return None
    if not (a.hf_python and os.path.exists(a.hf_python)):
        print(f"no HF python at {a.hf_python!r}: HF column skipped (see tools/README.md for the tool venv)", flush=True)
        return None
    from nemotron_jax import ModelConfig  # noqa: PLC0415
    from nemotron_jax.convert import config_to_hf  # noqa: PLC0415
    cfg = ModelConfig.preset(base, **overrides, dtype="float32")
    with warnings.catch_warnings():  # the dt clamp note: HF's lower clamp only changes numerics, not the work
        warnings.simplefilter("ignore")
        hf_cfg = config_to_hf(cfg)
    d = tempfile.mkdtemp(prefix="bench-hf-train-")
    (pathlib.Path(d) / "config.json").write_text(json.dumps(hf_cfg, indent=1, sort_keys=True) + "\n")
    try:
        w = HFWorker(a.hf_python, d, a.hf_threads)
    except Exception as e:  # noqa: BLE001
        print(f"HF worker failed to start ({e}): HF column skipped", flush=True)
        return None
    print(f"HF worker: torch {w.info['torch']}, transformers {w.info['transformers']}, {w.info['params']:,} params, "
          f"{w.info['threads']} threads", flush=True)
    return w


# ----------------------------------------------------------------------------- the profile breakdown
_NAME = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_SRC = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')
_LAYER = re.compile(r"layer(\d+)_(mamba|attention|moe|mlp)")


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, list[tuple[str, str, int]]]]:
    """{instruction name: (op_name, [(file, function, line), ...] innermost first)} from compiled HLO text."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in hlo_text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if not s or s.startswith(("%", "ENTRY", "HloModule", "}")):
            section = None
            continue
        if section == "FileNames" and (m := re.match(r'(\d+)\s+"(.*)"$', s)):
            files[int(m[1])] = m[2]
        elif section == "FunctionNames" and (m := re.match(r'(\d+)\s+"(.*)"$', s)):
            funcs[int(m[1])] = m[2]
        elif section == "FileLocations" and (m := re.match(r"(\d+)\s+\{(.*)\}", s)):
            kv = dict(re.findall(r"(\w+)=(\d+)", m[2]))
            locs[int(m[1])] = (files.get(int(kv.get("file_name_id", 0)), "?"),
                               funcs.get(int(kv.get("function_name_id", 0)), "?"), int(kv.get("line", 0)))
        elif section == "StackFrames" and (m := re.match(r"(\d+)\s+\{(.*)\}", s)):
            kv = dict(re.findall(r"(\w+)=(\d+)", m[2]))
            # printed parent_frame_id is the parent's id + 1 (0: no parent)
            frames[int(m[1])] = (int(kv.get("file_location_id", 0)), int(kv.get("parent_frame_id", 0)) - 1)

    def stack(fid: int) -> list[tuple[str, str, int]]:
        out, seen = [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            if loc in locs:
                out.append(locs[loc])
            fid = parent
        return out

    # every instruction: its own metadata (if any), the computation it calls, its operands
    own, calls, operands, comps, roots = {}, {}, {}, defaultdict(list), {}
    comp = None
    for line in hlo_text.splitlines():
        if (c := _COMP.match(line)):
            comp = c[1]
            continue
        m = _NAME.match(line)
        if not m:
            continue
        name, rest = m[1], m[2]
        comps[comp].append(name)
        if line.lstrip().startswith("ROOT"):
            roots[comp] = name
        md = re.search(r"metadata=\{([^}]*)\}", rest)
        if md:
            op = _OP_NAME.search(md[1])
            fr = _FRAME_ID.search(md[1])
            st = stack(int(fr[1])) if fr else []
            if not st and (src := _SRC.search(md[1])):
                st = [(src[1], "?", int(src[2]))]
            if op or st:
                own[name] = (op[1] if op else "", st)
        if (cm := re.search(r"calls=%([\w.\-]+)", rest)):
            calls[name] = cm[1]
        body = rest.split("metadata=")[0]
        body = re.sub(r"(calls|to_apply|body|condition|branch_computations)=\{?[%\w.\-, ]+\}?", "", body)
        operands[name] = re.findall(r"%([\w.\-]+)", body)

    def resolve(name: str, depth: int = 0):
        """Own metadata; else the called computation's (root first); else the first operand's that has one
        (layout copies and some wrapped ops carry none)."""
        if name in own:
            return own[name]
        if depth > 4:
            return None
        if name in calls:
            c = calls[name]
            if roots.get(c) in own:
                return own[roots[c]]
            for n in comps.get(c, ()):
                if n in own:
                    return own[n]
        for op in operands.get(name, ()):
            r = resolve(op, depth + 1)
            if r is not None:
                return r
        return None

    meta = {}
    for names in comps.values():
        for n in names:
            r = resolve(n)
            if r is not None:
                meta[n] = r
    return meta


_SSD_FILES = ("ssd.py", "ssd_chunked.py", "ssd_mosaic.py")
_ROUTING = {"router_scores", "select_experts", "route", "sequence_aux_loss", "expert_counts", "scores"}


def classify(op_name: str, stack: list[tuple[str, str, int]]) -> str:
    """'<layer kind>: <part>' for one HLO op, from its named scope and the Python stack it was traced from."""
    ours = [(f, fn, ln) for f, fn, ln in stack if ("nemotron_jax" in f or "pallas_kernels" in f or "optax" in f)]
    base = [(os.path.basename(f), fn, ln, f) for f, fn, ln in ours]
    names = {fn for _, fn, _, _ in base}
    fbase = {b for b, _, _, _ in base}

    def text(kind: str) -> str:
        for b, fn, ln, f in base:
            if fn == kind:
                return linecache.getline(f, ln)
        return ""

    all_files = " ".join(f for f, _, _ in stack)
    lm = _LAYER.search(op_name)
    if lm:
        kind = lm[2]
        if kind == "mamba":
            if fbase & set(_SSD_FILES) or "pallas_kernels" in " ".join(f for *_, f in base):
                return "mamba: SSD"
            if names & {"causal_conv1d", "_conv_in"} or "causal_conv.py" in fbase:
                return "mamba: conv"
            if "norms.py" in fbase:
                return "mamba: norms"
            if "common.py" in fbase:
                return "mamba: in/out proj"
            return "mamba: other"
        if kind == "moe":
            if "expert_mlp" in names or "grouped_gemm.py" in fbase or names & {"default_ragged_dot",
                                                                               "reference_ragged_dot"}:
                return "moe: grouped GEMMs"
            if "sort_by_expert" in names:
                return "moe: dispatch"
            if "combine" in names:
                return "moe: combine"
            if "dropless_experts" in names:
                t = text("dropless_experts")
                if "inverse" in t:
                    return "moe: combine"
                if "order" in t:
                    return "moe: dispatch"
            if names & _ROUTING or "Router" in text("__call__"):
                return "moe: routing"
            if "mlp.py" in fbase:
                return "moe: shared expert"
            if "norms.py" in fbase:
                return "moe: norms"
            return "moe: other"
        if kind == "attention":
            if names & {"causal_attention", "cached_attention"} or "tokamax" in all_files:
                return "attention: core"
            if "norms.py" in fbase:
                return "attention: norms"
            if "common.py" in fbase:
                return "attention: proj"
            return "attention: other"
        return f"{kind}: all"
    if "losses.py" in fbase or "logits" in names or names & {"total_loss", "cross_entropy"}:
        return "head and loss"
    if "norms.py" in fbase:
        return "head and loss"  # norm_f, the only norm outside a block
    if "embed" in names:
        return "embedding"
    if names & {"updated_router_biases", "update_router_bias", "update_router_biases", "load_stats"}:
        return "router bias update"
    if any("optax" in f for *_, f in base) or "optim.py" in fbase:
        return "optimizer"
    if "_all_finite" in names or ("step.py" in fbase and "select_n" in op_name):
        return "non-finite check + skip select"  # train.step: a non-finite step leaves the state as it was
    if op_name.startswith(("state", "params", "batch", "tokens")) and not stack:
        return "argument copies"
    return "other"


def profile_breakdown(ours: Ours, kind: str, calls: int) -> dict:
    """Per-part self time (ms per call) of `kind` from a jax profiler trace of `calls` calls."""
    import jax  # noqa: PLC0415
    compiled = ours.compiled[kind]
    text = compiled.as_text()
    module = re.match(r"HloModule\s+([\w.\-]+)", text)
    module = module[1] if module else None
    meta = hlo_metadata(text)
    d = tempfile.mkdtemp(prefix="bench-prof-")
    with jax.profiler.trace(d):
        for _ in range(calls):
            ours.call(kind)
    traces = list(pathlib.Path(d).rglob("*.trace.json.gz"))
    if not traces:
        return {"error": f"no *.trace.json.gz under {d} (only {[p.name for p in pathlib.Path(d).rglob('*')]})"}
    events = json.load(gzip.open(traces[0]))["traceEvents"]
    pnames = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {p for p, n in pnames.items() if "/device:" in n}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
           and (module is None or e["args"].get("hlo_module") in (module, None))]
    if any(e["pid"] in dev_pids for e in ops):  # a GPU: its kernels, not the host-side launches
        ops = [e for e in ops if e["pid"] in dev_pids]
    # self time: an op event's duration less that of the op events nested in it on the same thread (while/call)
    by_tid = defaultdict(list)
    for e in ops:
        by_tid[(e["pid"], e["tid"])].append(e)
    self_us = defaultdict(float)
    unmapped = defaultdict(float)
    by_op = defaultdict(lambda: defaultdict(float))  # part -> op_name -> self time: what a part is made of
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, event, child_time]

        def close(item):
            e, child = item[1], item[2]
            name = e["args"]["hlo_op"]
            own = max(e["dur"] - child, 0.0)
            if name in meta:
                part = classify(*meta[name])
                self_us[part] += own
                by_op[part][re.sub(r"^jit\([^)]*\)/", "", meta[name][0])[:100]] += own
            else:
                unmapped[name] += own
                self_us["unmapped"] += own

        for e in evs:
            while stack and e["ts"] >= stack[-1][0] - 1e-3:
                close(stack.pop())
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e["ts"] + e["dur"], e, 0.0])
        while stack:
            close(stack.pop())
    total = sum(self_us.values())
    parts = {k: {"ms": v / 1e3 / calls, "share": v / total if total else 0.0,
                 "top_ops": [(op, t / 1e3 / calls) for op, t in sorted(by_op[k].items(), key=lambda kv: -kv[1])[:8]]}
             for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])}
    top_unmapped = sorted(unmapped.items(), key=lambda kv: -kv[1])[:5]
    return {"calls": calls, "op_time_ms_per_call": total / 1e3 / calls, "parts": parts,
            "unmapped_top": [(k, v / 1e3 / calls) for k, v in top_unmapped], "ops_seen": len(ops)}


# ----------------------------------------------------------------------------- compile-only
def compile_one(config_path: str) -> dict:
    """Trace + compile + first call of the train step of one experiment config, as the trainer builds it."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from nemotron_jax import model as M  # noqa: PLC0415
    from nemotron_jax.experiment import model_config_from  # noqa: PLC0415
    from nemotron_jax.train.optim import make_optimizer, wsd_schedule  # noqa: PLC0415
    from nemotron_jax.train.step import init_train_state, make_train_step  # noqa: PLC0415
    exp = _load_module(pathlib.Path(config_path), "_exp_config").get_config()
    cfg = model_config_from(exp).replace(precision=exp.precision)
    o = exp.optim
    schedule = wsd_schedule(o.lr, exp.steps, o.warmup_steps, o.decay_fraction, o.min_lr_ratio, o.decay_shape)
    optimizer = make_optimizer(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
    t0 = time.perf_counter()
    graphdef, state = init_train_state(M.init_model(cfg, seed=exp.seed), optimizer, exp.seed)
    t_init = time.perf_counter() - t0
    b, t = exp.data.batch_size, exp.data.seq_len
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)).astype(np.int32))
    batch = {"tokens": tokens, "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32)}
    step = jax.jit(make_train_step(cfg, graphdef, optimizer, schedule), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t3 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t4 = time.perf_counter()
    return {"config": os.path.relpath(config_path, REPO), "dtype": cfg.dtype, "precision": cfg.precision,
            "batch": [b, t], "init_s": t_init, "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
            "first_step_s": t3 - t2, "second_step_s": t4 - t3, "to_first_step_done_s": t3 - t0}


def cmd_compile_only(a) -> list[dict]:
    """Each config in a fresh process (nothing cached in memory from another compile)."""
    rows = []
    for path in a.compile_configs.split(","):
        path = str(REPO / path) if not os.path.isabs(path) else path
        print(f"compiling the train step of {os.path.relpath(path, REPO)} in a fresh process ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--_compile-one", path], capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not lines:
            rows.append({"config": os.path.relpath(path, REPO), "error": (p.stderr or p.stdout)[-2000:]})
            print(f"  FAILED: {rows[-1]['error'][-500:]}", flush=True)
        else:
            rows.append(json.loads(lines[-1]))
    print("\n| config | compute dtype | precision | batch | trace + lower s | compile s | first step s | "
          "second step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['config']}` | failed | | | | | | |")
        else:
            print(f"| `{r['config']}` | {r['dtype']} | {r['precision']} | {r['batch'][0]}x{r['batch'][1]} | "
                  f"{r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | {r['first_step_s']:.2f} | "
                  f"{r['second_step_s']:.2f} |")
    return rows


# ----------------------------------------------------------------------------- main benchmark
def _fmt(x, spec=",.0f", none="n/a"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def cmd_bench(a) -> dict:
    import jax  # noqa: PLC0415
    base, overrides, seq, batch = preset_model(a.preset)
    seq, batch = a.seq_len or seq, a.batch or batch
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: choose from {sorted(VARIANTS)}")
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k!r}: choose from {KINDS}")
    tokens = np.random.default_rng(0).integers(0, overrides["vocab_size"], (batch, seq)).astype(np.int32)
    ntok = batch * seq
    from nemotron_jax.platform import host_allocator  # noqa: PLC0415

    dev = jax.devices()[0]
    report = {"preset": a.preset, "model": {"base": base, **overrides}, "batch": [batch, seq], "rounds": a.rounds,
              "jax": jax.__version__, "backend": jax.default_backend(), "device": dev.device_kind,
              "cpu_count": os.cpu_count(), "malloc": host_allocator(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "variants": {}, "hf": None}
    print(f"# {a.preset}: batch {batch} x {seq} = {ntok} tokens; jax {jax.__version__} on {dev.device_kind} "
          f"({jax.default_backend()}), {os.cpu_count()} CPUs", flush=True)

    hf = None if "fwd" not in kinds and "fwdbwd" not in kinds else start_hf(a, base, overrides)
    hf_ops = [k for k in ("fwd", "fwdbwd") if k in kinds] if hf else []
    hf_times = {k: [] for k in hf_ops}
    hf_first, hf_rss, hf_loss = {}, 0.0, None
    if hf is not None:
        for k in hf_ops:  # warm-up (the first torch calls allocate and pick kernels)
            ans = hf.call(k, tokens)
            hf_first[k], hf_rss, hf_loss = ans["s"], max(hf_rss, ans["max_rss_mb"]), ans["loss"]
            print(f"  HF {k}: first call {ans['s']:.2f} s (loss {ans['loss']:.4f})", flush=True)

    ours = {}
    for v in variants:
        print(f"building and compiling ours, {v} ...", flush=True)
        ours[v] = Ours(base, overrides, v, tokens, kinds)
    report["compiled"] = {v: {k: ours[v].info[k] for k in kinds} for v in variants}
    _dump(a.out_path, {**report, "stage": "compiled"})
    peak = Peak(a.peak_n)
    times = {v: {k: [] for k in kinds} for v in variants}
    peaks = defaultdict(list)
    # the full step against HF's forward + backward (HF runs no optimizer): issue 14's train-step target
    ratio_kinds = hf_ops + (["step"] if "fwdbwd" in hf_ops and "step" in kinds else [])
    ratios = {v: {k: [] for k in ratio_kinds} for v in variants}
    for r in range(a.rounds):
        t_round = time.perf_counter()
        this = {}
        for k in kinds:
            if k in hf_ops:
                ans = hf.call(k, tokens)
                hf_times[k].append(ans["s"])
                hf_rss = max(hf_rss, ans["max_rss_mb"])
                this[("hf", k)] = ans["s"]
            for v in variants:
                this[(v, k)] = dt = ours[v].call(k)
                times[v][k].append(dt)
        for v in variants:
            for k in ratio_kinds:  # > 1: ours faster
                ratios[v][k].append(this[("hf", "fwdbwd" if k == "step" else k)] / this[(v, k)])
        for name, flops in peak.measure().items():
            peaks[name].append(flops)
        print(f"round {r + 1}/{a.rounds} ({time.perf_counter() - t_round:.0f} s): " + ", ".join(
            f"{v} {k} {times[v][k][-1] * 1e3:.0f} ms" for v in variants for k in kinds) +
              "".join(f", HF {k} {hf_times[k][-1] * 1e3:.0f} ms" for k in hf_ops), flush=True)

    # the peak of a dtype: the best of the rounds (the least disturbed), bf16 the better of its two forms
    peak_best = {"float32": max(peaks["float32"]),
                 "bfloat16": max(max(peaks["bfloat16"]), max(peaks["bfloat16_acc_f32"]))}
    report["peak_flops"] = {"n": a.peak_n, "best": peak_best, "per_round": dict(peaks),
                            "median": {k: statistics.median(v) for k, v in peaks.items()}}

    if hf is not None:
        report["hf"] = {"worker": hf.info, "first_call_s": hf_first, "max_rss_mb": hf_rss, "loss": hf_loss,
                        **{k: {"s": _stats(hf_times[k]), "tokens_per_s": ntok / statistics.median(hf_times[k])}
                           for k in hf_ops}}
        hf.close()

    for v in variants:
        o = ours[v]
        rv = {"compute_dtype": o.cfg.dtype, "precision": o.cfg.precision, "params": o.n_params,
              "peak_dtype": o.peak_dtype}
        for k in kinds:
            st = _stats(times[v][k])
            info = o.info[k]
            med = st["median"]
            flops = info["flops"]
            rv[k] = {"s": st, "tokens_per_s": ntok / med, **info,
                     "flops_per_token": flops / ntok if flops else None,
                     "achieved_flops": flops / med if flops else None,
                     "mfu": flops / med / peak_best[o.peak_dtype] if flops else None,
                     "mfu_median_peak": (flops / med / statistics.median(
                         peaks[o.peak_dtype] if o.peak_dtype == "float32" else
                         [max(x, y) for x, y in zip(peaks["bfloat16"], peaks["bfloat16_acc_f32"])]))
                     if flops else None}
            if k in ratio_kinds:
                rv[k]["vs_hf"] = _stats(ratios[v][k])
        report["variants"][v] = rv

    _dump(a.out_path, {**report, "stage": "timed"})
    if a.profile_calls > 0 and "step" in kinds:
        for v in variants:
            print(f"profiling the {v} train step ({a.profile_calls} calls) ...", flush=True)
            try:
                report["variants"][v]["breakdown"] = profile_breakdown(ours[v], "step", a.profile_calls)
            except Exception as e:  # noqa: BLE001  (the timings stand without it)
                report["variants"][v]["breakdown"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  profile failed: {type(e).__name__}: {e}", flush=True)
    print_report(report, variants, kinds, hf_ops)
    return report


def _dump(path: pathlib.Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def print_report(rep: dict, variants: list[str], kinds: tuple[str, ...], hf_ops: list[str]) -> None:
    b, t = rep["batch"]
    pk = rep["peak_flops"]["best"]
    print(f"\n{rep['preset']} model, batch {b} x {t}, medians of {rep['rounds']} interleaved rounds "
          f"({rep['device']}, {rep['cpu_count']} CPUs, host malloc {rep.get('malloc', 'system')}, jax {rep['jax']}"
          + (f", torch {rep['hf']['worker']['torch']} with {rep['hf']['worker']['threads']} threads" if rep["hf"] else "")
          + f"); matmul peak (jnp.dot {rep['peak_flops']['n']}^2, best round): fp32 {pk['float32'] / 1e9:,.0f} "
            f"GFLOP/s, bf16 {pk['bfloat16'] / 1e9:,.0f} GFLOP/s\n")
    names = {"fwd": "forward", "fwdbwd": "forward + backward", "step": "full train step (AdamW, aux, router bias)"}
    head = "| tokens/s (min-max) |" + (" HF torch fp32 |" if rep["hf"] else "") + "".join(
        f" ours {v} |" for v in variants)
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    b_t = b * t
    for k in kinds:
        row = f"| {names[k]} |"
        if rep["hf"]:
            if k in hf_ops:
                s = rep["hf"][k]["s"]
                row += f" {b_t / s['median']:,.0f} ({b_t / s['max']:,.0f}-{b_t / s['min']:,.0f}) |"
            else:
                row += " |"
        for v in variants:
            d = rep["variants"][v][k]
            s = d["s"]
            cell = f" {d['tokens_per_s']:,.0f} ({b_t / s['max']:,.0f}-{b_t / s['min']:,.0f})"
            if "vs_hf" in d:
                cell += f", {d['vs_hf']['median']:.2f}x HF" + (" fwd+bwd" if k == "step" else "")
            row += cell + " |"
        print(row)

    print("\n| variant | kind | ms (median) | GFLOP/call (XLA) | MFLOP/token | MFU (peak of dtype) | "
          "peak memory MB (temp) | compile s (trace+lower / compile) | first call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        for k in kinds:
            d = rep["variants"][v][k]
            mem = d["memory"] or {}
            fl = d["flops"]
            print(f"| {v} | {k} | {d['s']['median'] * 1e3:,.1f} | {_fmt(fl / 1e9 if fl else None, ',.1f')} | "
                  f"{_fmt(d['flops_per_token'] / 1e6 if d['flops_per_token'] else None, ',.1f')} | "
                  f"{_fmt(d['mfu'] * 100 if d['mfu'] else None, '.1f')}% ({rep['variants'][v]['peak_dtype']}) | "
                  f"{_fmt(mem.get('peak_mb'), ',.0f')} ({_fmt(mem.get('temp_mb'), ',.0f')}) | "
                  f"{d['trace_lower_s']:.1f} / {d['compile_s']:.1f} | {d['first_call_s']:.2f} |")
    if rep["hf"]:
        h = rep["hf"]
        print(f"\nHF torch: max RSS {h['max_rss_mb']:,.0f} MB (whole worker process: torch, model, activations); "
              "first calls " + ", ".join(f"{k} {s:.2f} s" for k, s in h["first_call_s"].items()))

    bd = {v: rep["variants"][v].get("breakdown") for v in variants}
    bd = {v: x for v, x in bd.items() if x and "parts" in x}
    if bd:
        parts = []
        for x in bd.values():
            for p in x["parts"]:
                if p not in parts:
                    parts.append(p)
        parts.sort(key=lambda p: (p.split(":")[0], -max(x["parts"].get(p, {}).get("ms", 0) for x in bd.values())))
        print("\nWhere the train step's time goes (jax profiler trace: self time of each XLA op, grouped by block "
              "scope and source; ms per step, share of the op time)\n")
        head = "| part |" + "".join(f" {v} ms | {v} % |" for v in bd)
        print(head)
        print("|---" * (head.count("|") - 1) + "|")
        for p in parts:
            row = f"| {p} |"
            for x in bd.values():
                q = x["parts"].get(p)
                row += f" {q['ms']:,.1f} | {q['share'] * 100:.1f} |" if q else " | |"
            print(row)
        print("| **sum of op time** |" + "".join(f" {x['op_time_ms_per_call']:,.1f} | 100 |" for x in bd.values()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench",
                    help="bench (configs/bench.py), tiny (the main job's model and batch) or 1b (the GPU model)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 8; --quick: 2)")
    ap.add_argument("--variants", default="fp32,bf16,nvfp4")
    ap.add_argument("--kinds", default="fwd,fwdbwd,step", help="which of fwd, fwdbwd, step to time")
    ap.add_argument("--hf-python", default="/tmp/hfvenv/bin/python")
    ap.add_argument("--hf-threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--peak-n", type=int, default=1024, help="size of the square jnp.dot of the matmul peak")
    ap.add_argument("--profile-calls", type=int, default=None,
                    help="train-step calls in the profiler trace (default 3; --quick: 1; 0: no breakdown)")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--quick", action="store_true", help="plumbing check: 2 rounds, 1 profiled call")
    ap.add_argument("--compile-only", action="store_true",
                    help="only the compile time of the train step of --compile-configs, each in a fresh process")
    ap.add_argument("--compile-configs", default="configs/tiny.py,configs/small.py,configs/bench.py")
    ap.add_argument("--with-compile-configs", action="store_true",
                    help="also run the --compile-only measurement after the benchmark (one JSON for both)")
    ap.add_argument("--out", default=None, help="JSON output (default runs/bench/train_step.json)")
    ap.add_argument("--_compile-one", dest="compile_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.compile_one:
        print(json.dumps(compile_one(a.compile_one)), flush=True)
        return
    if a.rounds is None:
        a.rounds = 2 if a.quick else 8
    if a.profile_calls is None:
        a.profile_calls = 1 if a.quick else 3
    out = pathlib.Path(a.out) if a.out else REPO / "runs" / "bench" / (
        "train_step_compile.json" if a.compile_only else "train_step.json")
    a.out_path = out
    report = {"command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]), "quick": a.quick,
              "stage": "done"}
    if a.compile_only:
        report["compile_only"] = cmd_compile_only(a)
    else:
        report.update(cmd_bench(a))
        if a.with_compile_configs:
            report["compile_only"] = cmd_compile_only(a)
    _dump(out, report)
    print(f"\nwrote {out}", flush=True)


if __name__ == "__main__":
    main()
