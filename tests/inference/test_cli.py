"""`python -m nemotron_jax.generate` and load_run: a trained tiny run (in process and as a module), the
restored model against the trainer's own restore, an HF checkpoint with its tokenizer and chat template,
and every bad input answered in one line with exit status 2 before anything compiles."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemotron_jax
from nemotron_jax import generate as generate_module
from nemotron_jax.generate import main
from nemotron_jax.inference.load import RunError, RunMismatchError, load_run, load_run_with_tokenizer
from tests.helpers import runs
from tests.helpers.chat import write_chat_files

ROOT = pathlib.Path(__file__).resolve().parents[2]
HF_CASE = ROOT / "tests" / "fixtures" / "hf_reference" / "moe"
PROMPT = "ROMEO:\n"
ERROR_PREFIX = "python -m nemotron_jax.generate: error: "


def small_exp():
    # checkpoints at steps 3 and 5; every layer kind, fewer layers to compile; a greedy sample, which the CLI
    # must reproduce
    return runs.small_exp(steps=5, log_every=5, eval_every=0, eval_batches=1,
                          **{"model.overrides.hybrid_override_pattern": "M*E-", "sample.prompt": PROMPT,
                             "sample.temperature": 0.0})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from nemotron_jax.train.loop import train

    d = tmp_path_factory.mktemp("run")
    train(small_exp(), d, progress=False)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "moe"
    shutil.copytree(HF_CASE, d)
    write_chat_files(d)
    return d


def _params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def _continuation(run_dir) -> str:
    return (run_dir / "sample.txt").read_text()[len(PROMPT):]


# ----------------------------------------------------------------------------- load_run
def test_load_run_matches_the_trained_state(run_dir):
    from nemotron_jax.experiment import model_config_from
    from nemotron_jax.model import init_model
    from nemotron_jax.train.checkpoint import Checkpointer
    from nemotron_jax.train.optim import make_optimizer, wsd_schedule
    from nemotron_jax.train.step import init_train_state

    # the trainer's own restore (a full TrainState, optimizer included) is the reference
    exp = small_exp()
    cfg = model_config_from(exp).replace(precision=exp.precision)
    o = exp.optim
    opt = make_optimizer(wsd_schedule(o.lr, exp.steps, o.warmup_steps, o.decay_fraction, o.min_lr_ratio,
                                      o.decay_shape), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                         clip_norm=o.clip_norm)
    graphdef, template = nnx.eval_shape(lambda: init_train_state(init_model(cfg, seed=exp.seed), opt, exp.seed))
    ckpt = Checkpointer(run_dir / "checkpoints", every=0)
    step, state, _, _ = ckpt.restore_latest(template)
    ckpt.close()
    assert step == 5
    trained = nnx.merge(graphdef, *jax.device_get((state.params, state.rest)))

    model = nemotron_jax.load_run(run_dir)
    assert model.cfg == trained.cfg
    ours, theirs = _params(model), _params(trained)
    assert ours.keys() == theirs.keys()
    for k in ours:  # every weight and router bias, bit for bit
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    bias = ours["layers/2/mixer/gate/e_score_correction_bias"]
    assert np.any(bias != 0)  # router biases moved in training and were restored with the weights
    # identical logits along a greedy continuation (the compile is shared with the CLI test below)
    prompt = list(PROMPT.encode())
    a, b = (nemotron_jax.generate(m, [prompt], max_new_tokens=8) for m in (model, trained))
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(a.logprobs[0], b.logprobs[0])

    older, tok = load_run_with_tokenizer(run_dir, step=3)
    assert tok.vocab_size == 256
    assert not np.array_equal(_params(older)["lm_head/kernel"], ours["lm_head/kernel"])
    with pytest.raises(RunError, match=r"no checkpoint at step 4; it has steps \[3, 5\]"):
        load_run(run_dir, step=4)
    bf = load_run(run_dir, dtype="bfloat16")
    assert bf.embeddings[...].dtype == jnp.bfloat16 and bf.cfg.dtype == "bfloat16"
    assert bf.layers[2].mixer.gate.e_score_correction_bias[...].dtype == jnp.float32


def test_load_run_errors(run_dir, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(RunError, match="is not a training run"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(RunError, match="has no checkpoint"):
        load_run(tmp_path)
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model"]["overrides"]["hidden_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunMismatchError, match="was not written by the model that config.json describes"):
        load_run(tmp_path)
    # a corrupt newest checkpoint: a clear error that names an older step, which still loads
    bad = tmp_path / "corrupt"
    shutil.copytree(run_dir / "checkpoints", bad / "checkpoints")
    shutil.copy(run_dir / "config.json", bad / "config.json")
    for f in (bad / "checkpoints" / "5" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"checkpoint step 5 .* is unreadable .*; an older one: step=3"):
        load_run(bad)
    assert load_run(bad, step=3).cfg.vocab_size == 256


# ----------------------------------------------------------------------------- the CLI on a run
def test_cli_on_a_run_reproduces_the_trainers_sample(run_dir, capsys):
    argv = ["--run", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out == _continuation(run_dir) + "\n"
    last = cap.err.strip().splitlines()[-1]
    assert "prefill: 7 tokens" in last and "decode: 8 tokens" in last and last.count("tokens/s") == 2



def test_module_entry_point(run_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    # an explicit stop id (shown in the text: the user chose it) ends generation at its first occurrence
    first = _continuation(run_dir).encode()[0]
    r = subprocess.run([sys.executable, "-m", "nemotron_jax.generate", "--run", str(run_dir), "--prompt", PROMPT,
                        "--max-new-tokens", "8", "--stop", f"{first},255"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == chr(first) + "\n"
    last = r.stderr.strip().splitlines()[-1]
    assert "decode: 1 tokens" in last and "tokens/s" in last and "stop: stop_token" in last
    r = subprocess.run([sys.executable, "-m", "nemotron_jax.generate", "--prompt", "x"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(ERROR_PREFIX) and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the CLI on an HF checkpoint
def test_cli_hf_checkpoint_with_chat_template(hf_dir, capsys):
    from nemotron_jax.convert.hf import from_hf
    from nemotron_jax.data.tokenizer import HFTokenizer
    from nemotron_jax.inference.chat import default_stop_ids, load_chat_template
    from nemotron_jax.inference.detokenize import safe_decode

    tok = HFTokenizer(hf_dir / "tokenizer.json")
    assert tok.vocab_size < 256  # the model's vocabulary is larger: ids past the tokenizer show as U+FFFD
    text = load_chat_template(hf_dir).render([{"role": "user", "content": "why is the sky blue?"}], reasoning=False)
    assert text.endswith("<|im_start|>assistant\n<think></think>")
    stops = default_stop_ids(hf_dir, tok)
    assert stops == [tok.token_to_id("</s>"), tok.token_to_id("<|im_end|>")]
    ref = nemotron_jax.generate(from_hf(hf_dir), [tok.encode(text)], max_new_tokens=12, stop_tokens=stops)
    shown = [t for t in ref.tokens[0] if t not in stops]

    assert main(["--hf", str(hf_dir), "--chat", "--reasoning", "off", "--prompt", "why is the sky blue?",
                 "--max-new-tokens", "12"]) == 0
    cap = capsys.readouterr()
    assert cap.out == safe_decode(tok, shown) + "\n"
    assert f"prefill: {len(tok.encode(text))} tokens" in cap.err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("bad input reached generation")
    monkeypatch.setattr(generate_module, "generate", refuse)


def _bad_cases(run, hf, tmp):
    no_tok = tmp / "no_tokenizer"
    shutil.copytree(HF_CASE, no_tok)
    no_think = write_chat_files(tmp / "no_think", think_token=False)
    for f in HF_CASE.iterdir():
        shutil.copy(f, no_think / f.name)
    not_run = tmp / "not_a_run"
    not_run.mkdir()
    no_ckpt = tmp / "no_checkpoint"
    no_ckpt.mkdir()
    shutil.copy(run / "config.json", no_ckpt / "config.json")
    mismatch = tmp / "mismatch"
    shutil.copytree(run / "checkpoints", mismatch / "checkpoints")
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["overrides"]["hybrid_override_pattern"] = "M*E"  # a prefix: every entry it needs is saved
    (mismatch / "config.json").write_text(json.dumps(cfg))
    no_switch = write_chat_files(tmp / "no_switch", template="{{ messages[0]['content'] }}")
    for f in HF_CASE.iterdir():
        shutil.copy(f, no_switch / f.name)
    r, h, p = ["--run", str(run)], ["--hf", str(hf)], ["--prompt", "hi"]
    return {
        "neither": (p, "give the model: --run DIR"),
        "both": (r + h + p, "not both"),
        "missing run dir": (["--run", str(tmp / "absent")] + p, "no such directory"),
        "missing hf dir": (["--hf", str(tmp / "absent")] + p, "no such directory"),
        "not a run": (["--run", str(not_run)] + p, "is not a training run"),
        "no checkpoint": (["--run", str(no_ckpt)] + p, "has no checkpoint"),
        "config mismatch": (["--run", str(mismatch)] + p, "was not written by the model"),
        "unknown step": (r + p + ["--step", "4"], "no checkpoint at step 4"),
        "not an hf dir": (["--hf", str(not_run)] + p, "has no config.json"),
        "hf without tokenizer": (["--hf", str(no_tok)] + p, "has no tokenizer.json"),
        "speculative without mtp (run)": (r + p + ["--speculative", "mtp"], "needs a model with an MTP block"),
        "speculative without mtp (hf)": (h + p + ["--speculative", "mtp"], "needs a model with an MTP block"),
        "draft len": (r + p + ["--speculative", "mtp", "--draft-len", "0"], "--draft-len must be >= 1"),
        "empty prompt": (r + ["--prompt", ""], "--prompt is empty"),
        "no prompt": (r, "the following arguments are required: --prompt"),
        "max new tokens": (r + p + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        "temperature": (r + p + ["--temperature", "-1"], "--temperature must be >= 0"),
        "top p": (r + p + ["--top-p", "0"], "--top-p must lie in (0, 1]"),
        "stop ids": (r + p + ["--stop", "1,x"], "expected token ids separated by commas"),
        "stop out of vocab": (r + p + ["--stop", "256"], "outside the model's vocabulary"),
        "unknown flag": (r + p + ["--bogus"], "unrecognized arguments: --bogus"),
        "bad dtype": (r + p + ["--dtype", "float16"], "invalid choice"),
        "chat without template": (r + p + ["--chat"], "has no chat template"),
        "reasoning without chat": (h + p + ["--reasoning", "on"], "--reasoning goes with --chat"),
        "template without reasoning switch": (["--hf", str(no_switch), "--chat", "--reasoning", "off"] + p,
                                              "has no reasoning switch (enable_thinking)"),
        "budget with reasoning off": (h + p + ["--chat", "--reasoning", "off", "--reasoning-budget", "4"],
                                      "no thinking span to close"),
        "budget without marker": (["--hf", str(no_think), "--chat", "--reasoning-budget", "4"] + p,
                                  "has no '</think>' token"),
        "budget with speculative": (h + p + ["--reasoning-budget", "4", "--speculative", "mtp"],
                                    "does not work with --speculative"),
    }


def test_bad_input_one_line_exit_2(run_dir, hf_dir, tmp_path, capsys, no_generation):
    failures = []
    for name, (argv, expect) in _bad_cases(run_dir, hf_dir, tmp_path).items():
        rc = main(argv)
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        ok = rc == 2 and cap.out == "" and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX) and expect in lines[0]
        if not ok:
            failures.append(f"{name}: rc={rc} err={cap.err!r}")
    assert not failures, "\n".join(failures)
