"""Generation speed, side by side in one run: our cached path, the old full-forward sampler, HF transformers.

    python benchmarks/generate.py decode [--preset small --new 32 --rounds 3 --hf-python /tmp/hfvenv/bin/python]
    python benchmarks/generate.py flat [--preset small --new 512]
    python benchmarks/generate.py speculative [--run runs/bench-mtp --steps 1500 --new 256]
    python benchmarks/generate.py long [--lengths 4096,8192,16384,32768,65536]
    python benchmarks/generate.py round-parts [--run runs/bench-mtp-small --draft 3]

decode: tokens/s at batch 1 and 8 with 128- and 2048-token prompts, fp32, greedy, same weights (ours exported
with `to_hf` and loaded by HF transformers in the tool venv of tools/README.md; the HF side is a long-lived
worker, benchmarks/hf_generate_worker.py, and the two take turns each round). flat: per-token decode time along
a long generation. speculative: MTP speculative decoding vs plain greedy on a model trained with MTP (trains
`configs/tiny.py` + an MTP block when --run has no checkpoint). long: prefill time and peak memory (max RSS of a
fresh process per length) for long prompts on `tiny`. round-parts: where a speculative round's time goes (a
plain step, the draft, the verify, the MTP commit, a whole round), each inside a fori_loop so that the hoisted
weight casts are paid once as in the real loops; process CPU time per iteration (steadier than wall time on a
shared machine; run with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false for one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


def _model(preset: str, seed: int = 0, **overrides):
    from flax import nnx  # noqa: PLC0415

    from nemotron_jax import ModelConfig, NemotronModel  # noqa: PLC0415
    return NemotronModel(ModelConfig.preset(preset, dtype="float32", **overrides), rngs=nnx.Rngs(seed))


def _prompts(b: int, t: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


class HFWorker:
    def __init__(self, python: str, ckpt: str):
        self.p = subprocess.Popen([python, str(REPO / "benchmarks" / "hf_generate_worker.py"), ckpt, "2"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.info = json.loads(self.p.stdout.readline())

    def run(self, ids: np.ndarray, new: int) -> dict:
        self.p.stdin.write(json.dumps({"ids": ids.tolist(), "new": new}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def cmd_decode(a) -> dict:
    import nemotron_jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from nemotron_jax.inference.naive import sample as naive_sample  # noqa: PLC0415
    net = _model(a.preset)
    vocab = net.cfg.vocab_size
    hf = None
    if a.hf_python and os.path.exists(a.hf_python):
        ckpt = tempfile.mkdtemp(prefix="bench-hf-")
        nemotron_jax.to_hf(net, ckpt)
        hf = HFWorker(a.hf_python, ckpt)
        print(f"HF worker: torch {hf.info['torch']}", flush=True)
    else:
        print(f"no HF python at {a.hf_python!r}: HF column skipped", flush=True)
    gd, st = nnx.split(net)
    settings = [(b, t) for t in (128, 2048) for b in (1, 8)]
    res = {f"b{b}_p{t}": {"ours": [], "hf": [], "naive": [], "ours_prefill": [], "hf_prefill": [], "same": None}
           for b, t in settings}
    for b, t in settings:  # warm-up: compile ours once per shape; HF's first calls are slow too
        nemotron_jax.generate(net, _prompts(b, t, vocab), max_new_tokens=a.new)
        if hf is not None:
            hf.run(_prompts(b, t, vocab), 2)
    for r in range(a.rounds):
        for b, t in settings:
            key, ids = f"b{b}_p{t}", _prompts(b, t, vocab, seed=r)
            out = nemotron_jax.generate(net, ids, max_new_tokens=a.new)
            res[key]["ours"].append(out.decode_s / a.new)
            res[key]["ours_prefill"].append(out.prefill_s)
            if hf is not None:
                h = hf.run(ids, a.new)
                res[key]["hf"].append(h["decode_s"] / (a.new - 1))
                res[key]["hf_prefill"].append(h["prefill_s"])
                same = h["tokens"] == out.tokens
                res[key]["same"] = same if res[key]["same"] is None else res[key]["same"] and same
            if b == 1 and a.naive_new:  # the old sampler: one row, a few tokens (each re-runs the whole sequence)
                if r == 0:
                    naive_sample(gd, st, ids[0], max_new_tokens=1, temperature=0.0)  # compile
                t0 = time.perf_counter()
                naive_sample(gd, st, ids[0], max_new_tokens=a.naive_new, temperature=0.0)
                res[key]["naive"].append((time.perf_counter() - t0) / a.naive_new)
            print(f"round {r}: {key} done", flush=True)
    if hf is not None:
        hf.close()
    print(f"\n{a.preset} ({net.cfg.dtype}), greedy, {a.new} new tokens, medians of {a.rounds} interleaved rounds\n")
    print("| batch | prompt | ours decode tok/s | HF decode tok/s | ours / HF | old sampler tok/s | ours prefill s | "
          "HF prefill s | same tokens as HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, t in settings:
        d = res[f"b{b}_p{t}"]
        med = {k: statistics.median(v) if v else float("nan") for k, v in d.items() if isinstance(v, list)}
        ours, hf_t = b / med["ours"], b / med["hf"]
        naive = 1 / med["naive"] if d["naive"] else float("nan")
        print(f"| {b} | {t} | {ours:,.1f} | {hf_t:,.1f} | {ours / hf_t:.2f}x | {naive:,.2f} | {med['ours_prefill']:.3f} | "
              f"{med['hf_prefill']:.3f} | {d['same']} |")
    return res


def cmd_flat(a) -> dict:
    import nemotron_jax  # noqa: PLC0415
    net = _model(a.preset)
    ids = _prompts(1, 128, net.cfg.vocab_size)
    nemotron_jax.generate(net, ids, max_new_tokens=a.new, decode_chunk=a.chunk)  # compile
    stamps = []
    out = nemotron_jax.generate(net, ids, max_new_tokens=a.new, decode_chunk=a.chunk,
                                on_tokens=lambda toks, live: stamps.append(time.perf_counter()))
    t_start = stamps[0] - out.decode_s * a.chunk / a.new  # ~ start of the first chunk
    per = np.diff([t_start] + stamps) / a.chunk * 1e3
    print(f"\n{a.preset}: ms per decode step in chunks of {a.chunk} tokens (tokens already generated at chunk start)")
    print("| tokens generated | " + " | ".join(str(i * a.chunk) for i in range(len(per))) + " |")
    print("|---" * (len(per) + 1) + "|")
    print("| ms / token | " + " | ".join(f"{x:.2f}" for x in per) + " |")
    print(f"last chunk / second chunk: {per[-1] / per[1]:.2f}")
    return {"ms_per_token": per.tolist()}


def _train_mtp_run(run: pathlib.Path, steps: int) -> None:
    cmd = [sys.executable, str(REPO / "experiments" / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(run), f"--config.steps={steps}", "--config.model.overrides.num_nextn_predict_layers=1"]
    print("training the MTP model:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def cmd_speculative(a) -> dict:
    import nemotron_jax  # noqa: PLC0415
    from nemotron_jax.data import make_tokenizer  # noqa: PLC0415
    run = pathlib.Path(a.run)
    if not (run / "checkpoints").exists():
        _train_mtp_run(run, a.steps)
    net = nemotron_jax.load_run(run)
    tok = make_tokenizer(None)  # the bench runs train on the bundled corpus with bytes
    prompt = [tok.encode(a.prompt)]
    samp = dict(temperature=a.temperature, seed=0)
    base = nemotron_jax.generate(net, prompt, max_new_tokens=a.new, **samp)
    rows, res = [], {}
    for k in a.drafts:
        nemotron_jax.generate(net, prompt, max_new_tokens=a.new, speculative="mtp", draft_len=k, **samp)  # compile
    for r in range(a.rounds):
        plain = nemotron_jax.generate(net, prompt, max_new_tokens=a.new, **samp)
        res.setdefault("plain", []).append(plain.decode_s)
        for k in a.drafts:
            s = nemotron_jax.generate(net, prompt, max_new_tokens=a.new, speculative="mtp", draft_len=k, **samp)
            # greedy: token-for-token equal to plain; sampling draws other random numbers (same distribution)
            same = s.tokens == base.tokens if a.temperature == 0 else "n/a (sampled)"
            res.setdefault(k, []).append((s.decode_s, s.acceptance_length, same))
    plain_s = statistics.median(res["plain"])
    kind = "greedy" if a.temperature == 0 else f"temperature {a.temperature}"
    print(f"\nMTP speculative decoding, {run}, batch 1, {a.new} {kind} tokens, medians of {a.rounds} rounds")
    print(f"plain decoding: {a.new / plain_s:,.1f} tok/s\n")
    print("| draft length | tok/s | speedup vs plain | mean acceptance length | output == plain greedy |")
    print("|---|---|---|---|---|")
    for k in a.drafts:
        ds = statistics.median(x[0] for x in res[k])
        acc = statistics.median(x[1] for x in res[k])
        same = all(x[2] is True for x in res[k]) if a.temperature == 0 else "n/a (sampled)"
        rows.append({"draft": k, "tok_s": a.new / ds, "speedup": plain_s / ds, "acceptance": acc, "same": same})
        print(f"| {k} | {a.new / ds:,.1f} | {plain_s / ds:.2f}x | {acc:.2f} | {same} |")
    print("\nsample:", repr(a.prompt + tok.decode(base.tokens[0])[:200]))
    return {"plain_tok_s": a.new / plain_s, "rows": rows}


def cmd_round_parts(a) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    import nemotron_jax  # noqa: PLC0415
    from nemotron_jax.data import make_tokenizer  # noqa: PLC0415
    from nemotron_jax.inference import engine as E  # noqa: PLC0415
    from nemotron_jax.inference import speculative as S  # noqa: PLC0415
    from nemotron_jax.inference.sampling import Sampling  # noqa: PLC0415
    from nemotron_jax.layers.cache import CacheIndex, MambaCache  # noqa: PLC0415
    from nemotron_jax.model import DecodeCache  # noqa: PLC0415
    gd, st = E.split_model(nemotron_jax.load_run(a.run))
    k, n = a.draft, a.iters
    samp = Sampling(0.0, None, 1.0)
    prompt = np.asarray([make_tokenizer(None).encode(a.prompt)], np.int32)
    logits, hidden, cache = S.prefill_mtp((gd, st), prompt, np.array([prompt.shape[1]]), max_len=256)
    c = S.start((gd, st), logits, hidden, cache, max_new_tokens=4 * n * (k + 1) + 64, sampling=samp)
    c = S.run_rounds((gd, st), c, max_new_tokens=10 ** 6, sampling=samp, draft_len=k, max_rounds=4)
    cache, ones = c.cache, jnp.ones((1,), jnp.int32)

    def loop(body):  # n iterations of body(model, carry) in one jitted fori_loop
        return jax.jit(lambda st, carry: jax.lax.fori_loop(0, n, lambda i, cr: body(E.merge(gd, st), cr), carry))

    def plain(m, cr):
        x, layers = cr
        h, cc = m.extend(x[:, None], DecodeCache(layers, cache.lengths, None))
        return jnp.argmax(m.logits(h[:, 0]), -1).astype(jnp.int32), cc.layers

    def draft(m, cr):  # draft steps 2..K (step 1 comes with the commit)
        h, d, mtp = cr
        for s in range(k - 1):
            hh, mtp = m.mtp_extend(h[:, None], d[:, None], mtp, CacheIndex(cache.lengths + s, ones))
            h = hh[:, 0]
            d = jnp.argmax(m.logits(h), -1).astype(jnp.int32)
        return h, d, mtp

    def verify(m, cr):  # extend keep_steps over K+1 tokens, logits, pick a Mamba step state
        toks, layers = cr
        h, ver = m.extend(toks, DecodeCache(layers, cache.lengths, None), keep_steps=True)
        toks = jnp.argmax(m.logits(h), -1).astype(jnp.int32)
        live = jnp.ones((1,), bool)
        return toks, tuple(S._pick_steps(new, old, toks[:, 0] % (k + 1), live) if isinstance(new, MambaCache)
                           else new for new, old in zip(ver.layers, layers))

    def commit(m, cr):  # the width-(K+1) MTP call
        h, toks, mtp = cr
        h1, mtp = m.mtp_extend(h, toks, mtp, CacheIndex(cache.lengths, ones * (k + 1)))
        return h1, toks, mtp

    def one_round(m, cr):
        return S._round(m, cr, jnp.zeros((0,), jnp.int32), jnp.int32(10 ** 6), samp, k)

    toks = jnp.tile(c.x[:, None], (1, k + 1))
    h_k = jnp.broadcast_to(c.h1[:, None], (1, k + 1, c.h1.shape[-1]))
    cases = {"plain decode step": (loop(plain), (c.x, cache.layers)),
             f"draft ({k - 1} MTP steps + logits)": (loop(draft), (c.h1, c.x, cache.mtp)),
             f"verify (extend {k + 1} tokens keep_steps, logits, pick)": (loop(verify), (toks, cache.layers)),
             f"commit (MTP width {k + 1})": (loop(commit), (h_k, toks, cache.mtp)),
             "whole round": (loop(one_round), c)}
    times = {name: [] for name in cases}
    for f, carry in cases.values():
        jax.block_until_ready(f(st, carry))
    for _ in range(a.rounds):  # interleaved
        for name, (f, carry) in cases.items():
            t0 = time.process_time()
            jax.block_until_ready(f(st, carry))
            times[name].append((time.process_time() - t0) / n * 1e3)
    plain_ms = statistics.median(times["plain decode step"])
    print(f"\n{a.run}, draft length {k}, batch 1: CPU ms per iteration, medians of {a.rounds} interleaved rounds\n")
    print("| part | ms | plain steps |")
    print("|---|---|---|")
    out = {}
    for name, v in times.items():
        out[name] = statistics.median(v)
        print(f"| {name} | {out[name]:.2f} | {out[name] / plain_ms:.2f} |")
    return out


def _one_long(n: int) -> None:
    import nemotron_jax  # noqa: PLC0415
    from nemotron_jax.inference import engine as E  # noqa: PLC0415
    net = _model("tiny")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = _prompts(1, n, net.cfg.vocab_size)
    t0 = time.perf_counter()
    E.generate(net, ids[:, :4096], max_new_tokens=1, max_len=E.bucket(n + 1))  # compiles the slice for this max_len
    compile_s = time.perf_counter() - t0
    out = nemotron_jax.generate(net, ids, max_new_tokens=1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "prefill_s": out.prefill_s, "rss_mb": rss / 1024, "rss_before_mb": rss0 / 1024,
                      "first_call_s": compile_s}))


def cmd_long(a) -> dict:
    rows = []
    for n in a.lengths:
        p = subprocess.run([sys.executable, __file__, "_one_long", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"{n} tokens: {rows[-1]}", flush=True)
    print("\ntiny, one prompt, prefill in 4096-token slices (fresh process per length; max RSS includes jax itself)\n")
    print("| prompt tokens | prefill s | ms / 1k tokens | max RSS MB | RSS over the model's MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['prefill_s']:.2f} | {r['prefill_s'] / r['n'] * 1e6:.1f} | {r['rss_mb']:.0f} | "
              f"{r['rss_mb'] - r['rss_before_mb']:.0f} |")
    return {"rows": rows}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_one_long":
        _one_long(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--preset", default="small")
    d.add_argument("--new", type=int, default=32)
    d.add_argument("--naive-new", type=int, default=3)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--hf-python", default="/tmp/hfvenv/bin/python")
    f = sub.add_parser("flat")
    f.add_argument("--preset", default="small")
    f.add_argument("--new", type=int, default=512)
    f.add_argument("--chunk", type=int, default=64)
    s = sub.add_parser("speculative")
    s.add_argument("--run", default=str(REPO / "runs" / "bench-mtp"))
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--new", type=int, default=256)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--drafts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 3, 4])
    s.add_argument("--prompt", default="ROMEO:\n")
    s.add_argument("--temperature", type=float, default=0.0)
    rp = sub.add_parser("round-parts")
    rp.add_argument("--run", default=str(REPO / "runs" / "bench-mtp-small"))
    rp.add_argument("--draft", type=int, default=3)
    rp.add_argument("--iters", type=int, default=16)
    rp.add_argument("--rounds", type=int, default=5)
    rp.add_argument("--prompt", default="ROMEO:\n")
    lg = sub.add_parser("long")
    lg.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")],
                    default=[4096, 8192, 16384, 32768, 65536])
    for p in (d, f, s, rp, lg):
        p.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args()
    res = {"decode": cmd_decode, "flat": cmd_flat, "speculative": cmd_speculative,
           "round-parts": cmd_round_parts, "long": cmd_long}[a.cmd](a)
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
