"""`nemotron_jax.generate(model, prompts, max_new_tokens=...)` and the generation CLI (`python -m nemotron_jax.generate`).

The function lives in `nemotron_jax.inference.engine`. This module is made callable so that the name a user
calls and the name of the CLI module can be the same (`nemotron_jax.generate`) without one shadowing the
other when the submodule is imported.

CLI:

    python -m nemotron_jax.generate --run runs/tiny --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8
    python -m nemotron_jax.generate --hf path/to/NVIDIA-Nemotron-3-Nano-30B-A3B --dtype bfloat16 \\
        --chat --reasoning on --reasoning-budget 512 --prompt "Why is the sky blue?"

The text streams to stdout as it is produced; a last line on stderr gives prefill and decode tokens/s (the
first call of a process includes compilation) and, with --speculative, the acceptance length. --run reads a
training run (nemotron_jax.inference.load) and its tokenizer; --hf an HF NemotronH checkpoint with its
tokenizer.json and chat template. --chat wraps the prompt in the checkpoint's chat template (one user turn,
generation prompt added); --reasoning on|off sets the template's reasoning switch; --reasoning-budget N
closes the thinking span (emits `</think>`) after N generated tokens if the model has not closed it. Stop
tokens default to the tokenizer's end of sequence and `<|im_end|>` when it has them (not shown in the text).
Bad input (a missing directory, --run and --hf both or neither, --speculative mtp without an MTP block, ...)
is reported in one line with exit status 2, before anything is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import types
from typing import Any

from nemotron_jax.inference.engine import GenerationResult, generate

__all__ = ["GenerationResult", "generate", "main"]

PROG = "python -m nemotron_jax.generate"


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and our exit path, not argparse's usage dump
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate text with a Nemotron 3 model, streamed to stdout.")
    src = p.add_argument_group("model (exactly one)")
    src.add_argument("--run", metavar="DIR", help="a training run directory (config.json, checkpoints/)")
    src.add_argument("--hf", metavar="DIR", help="an HF NemotronH checkpoint directory (config.json, "
                                                  "*.safetensors, tokenizer.json)")
    p.add_argument("--step", type=int, help="with --run: the checkpoint step (default: the newest)")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--stop", default=None, metavar="ID,...",
                   help="token ids that end generation (shown in the text), or 'none'; default: the "
                        "tokenizer's end of sequence and <|im_end|> when known")
    p.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    p.add_argument("--draft-len", type=int, default=3, metavar="K", help="drafted tokens per step (--speculative)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--reasoning", choices=["on", "off"], default=None,
                   help="with --chat: turn reasoning on or off (default: the template's default)")
    p.add_argument("--reasoning-budget", type=int, default=None, metavar="N",
                   help="emit the end-of-thinking marker after N generated tokens if the model has not")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter and compute dtype (default: --hf float32; --run the run's own)")
    return p


@dataclasses.dataclass
class _Job:
    model: Any
    tokenizer: Any
    prompt_ids: list[int]
    stop_ids: list[int]
    hidden_ids: list[int]  # stop ids not shown in the text (the default end-of-turn tokens)
    think_end: tuple[int, ...]
    args: argparse.Namespace


def _check_numbers(a: argparse.Namespace) -> None:
    if not a.prompt:
        raise UsageError("--prompt is empty; give the text to continue")
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1; got {a.max_new_tokens}")
    if not a.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 is greedy); got {a.temperature}")
    if a.top_k is not None and a.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 keeps every token); got {a.top_k}")
    if not 0.0 < a.top_p <= 1.0:
        raise UsageError(f"--top-p must lie in (0, 1]; got {a.top_p}")
    if a.draft_len < 1:
        raise UsageError(f"--draft-len must be >= 1; got {a.draft_len}")
    if a.reasoning is not None and not a.chat:
        raise UsageError("--reasoning goes with --chat (it is a switch of the chat template)")
    if a.reasoning_budget is not None:
        if a.reasoning_budget < 0:
            raise UsageError(f"--reasoning-budget must be >= 0; got {a.reasoning_budget}")
        if a.reasoning == "off":
            raise UsageError("--reasoning-budget with --reasoning off: there is no thinking span to close")
        if a.speculative is not None:
            raise UsageError("--reasoning-budget does not work with --speculative yet; drop one of them")


def _parse_stop(text: str, vocab_size: int) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--stop {text!r}: expected token ids separated by commas (e.g. 2,11) or 'none'") from None
    if not ids:
        raise UsageError("--stop is empty; give token ids (e.g. 2,11) or 'none'")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"--stop id(s) {bad} outside the model's vocabulary [0, {vocab_size})")
    return ids


def _find_template(dirs: list[pathlib.Path]):
    from nemotron_jax.inference.chat import ChatTemplateError, load_chat_template  # noqa: PLC0415

    first = None
    for d in dirs:
        try:
            return load_chat_template(d), d
        except ChatTemplateError as e:
            first = first or e
    raise first


def _prepare(a: argparse.Namespace) -> _Job:
    """Every check and every load, in order of cost; nothing here compiles."""
    import numpy as np  # noqa: PLC0415

    from nemotron_jax.data.tokenizer import HFTokenizer  # noqa: PLC0415
    from nemotron_jax.inference import chat  # noqa: PLC0415

    _check_numbers(a)
    if a.run is not None and a.hf is not None:
        raise UsageError("give one of --run DIR or --hf DIR, not both")
    if a.run is None and a.hf is None:
        raise UsageError("give the model: --run DIR (a training run) or --hf DIR (an HF checkpoint)")
    flag, src = ("--run", pathlib.Path(a.run)) if a.run is not None else ("--hf", pathlib.Path(a.hf))
    if not src.exists():
        raise UsageError(f"{flag} {str(src)!r}: no such directory")
    if not src.is_dir():
        raise UsageError(f"{flag} {str(src)!r} is not a directory")
    if a.step is not None and a.run is None:
        raise UsageError("--step goes with --run")

    if a.run is not None:
        from nemotron_jax.inference import load  # noqa: PLC0415

        cfg = load.with_dtype(load.run_model_config(src), a.dtype)
        steps = load.checkpoint_steps(src)
        if not steps:
            raise UsageError(f"--run {str(src)!r} has no complete checkpoint in checkpoints/")
        if a.step is not None and a.step not in steps:
            raise UsageError(f"--run {str(src)!r} has no checkpoint at step {a.step}; it has steps {steps}")
        tokenizer = load.run_tokenizer(src)
        meta_dirs = [src] + ([pathlib.Path(tokenizer.path).parent] if isinstance(tokenizer, HFTokenizer) else [])
    else:
        from nemotron_jax.convert.hf_config import config_from_hf  # noqa: PLC0415

        if not (src / "config.json").is_file():
            raise UsageError(f"--hf {str(src)!r} is not an HF checkpoint: it has no config.json")
        if not (src / "tokenizer.json").is_file():
            raise UsageError(f"--hf {str(src)!r} has no tokenizer.json; the CLI needs the checkpoint's tokenizer")
        cfg = config_from_hf(src, dtype=a.dtype or "float32")
        tokenizer = HFTokenizer(src / "tokenizer.json")
        meta_dirs = [src]

    if a.speculative == "mtp" and not cfg.mtp_enabled:
        raise UsageError(f"--speculative mtp needs a model with an MTP block; {str(src)!r} has none "
                         f"(num_nextn_predict_layers=0)")

    template_dir = meta_dirs[0]
    text = a.prompt
    if a.chat:
        template, template_dir = _find_template(meta_dirs)
        if a.reasoning is not None and not template.mentions_reasoning:
            raise UsageError(f"--reasoning {a.reasoning}: the chat template ({template.origin}) has no reasoning "
                             f"switch ({chat.REASONING_VARIABLE}); drop --reasoning")
        reasoning = None if a.reasoning is None else a.reasoning == "on"
        text = template.render([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                               reasoning=reasoning)
    think_end: tuple[int, ...] = ()
    if a.reasoning_budget is not None:
        think_end = chat.think_end_ids(tokenizer)
        if max(think_end) >= cfg.vocab_size:
            raise UsageError(f"the end-of-thinking marker's ids {list(think_end)} lie outside the model's "
                             f"vocabulary [0, {cfg.vocab_size})")

    if a.stop is not None:
        stops, hidden = _parse_stop(a.stop, cfg.vocab_size), []
    else:
        stops = [i for i in chat.default_stop_ids(template_dir, tokenizer) if i < cfg.vocab_size]
        hidden = list(stops)

    ids = [int(i) for i in np.asarray(tokenizer.encode(text)).reshape(-1)]
    if not ids:
        raise UsageError(f"the prompt {a.prompt!r} encodes to no tokens")
    if max(ids) >= cfg.vocab_size:
        raise UsageError(f"the prompt encodes to token id {max(ids)}, outside the model's vocabulary "
                         f"[0, {cfg.vocab_size}): the tokenizer does not belong to this model")

    if a.run is not None:
        from nemotron_jax.inference.load import load_run  # noqa: PLC0415

        model = load_run(src, step=a.step, dtype=a.dtype)
    else:
        from nemotron_jax.convert.hf import load_hf_weights  # noqa: PLC0415

        model = load_hf_weights(src, cfg)
    return _Job(model, tokenizer, ids, stops, hidden, think_end, a)


def _write(stream, text: str) -> None:
    if not text:
        return
    try:
        stream.write(text)
    except UnicodeEncodeError:  # a terminal that cannot show some character: show what it can
        enc = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(enc, "replace").decode(enc))
    stream.flush()


def _one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def _run(job: _Job) -> int:
    from nemotron_jax.inference.detokenize import TextStream  # noqa: PLC0415

    a = job.args
    out = sys.stdout
    stream = TextStream(job.tokenizer, skip=job.hidden_ids)

    def on_tokens(tokens, live):
        _write(out, stream.push(tokens[0][live[0]]))

    res = generate(job.model, [job.prompt_ids], max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                   top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_tokens=job.stop_ids,
                   reasoning_budget=a.reasoning_budget, think_end=job.think_end, speculative=a.speculative,
                   draft_len=a.draft_len, on_tokens=on_tokens)
    _write(out, stream.flush() + "\n")
    line = (f"prefill: {res.prompt_tokens} tokens, {res.prefill_tokens_per_s:,.1f} tokens/s | "
            f"decode: {res.generated_tokens} tokens, {res.decode_tokens_per_s:,.1f} tokens/s")
    if a.speculative is not None:
        acc = res.acceptance_length
        line += f" | acceptance length {acc:.2f}" if acc is not None else " | acceptance length n/a"
    line += f" | stop: {res.stop_reasons[0]}"
    print(line, file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 for bad input, reported in one line on stderr)."""
    try:
        job = _prepare(_parser().parse_args(argv))
    except (ValueError, OSError) as e:  # UsageError, ConfigError, RunError, ChatTemplateError, CheckpointError
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    try:
        return _run(job)
    except KeyboardInterrupt:
        _write(sys.stdout, "\n")
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        try:  # point stdout at devnull so that the interpreter's final flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> GenerationResult:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
