"""Chat templates (sandboxed rendering, reasoning on/off, where the template comes from), the end-of-thinking
marker and default stop ids, streaming detokenization, and the reasoning budget end to end (engine and CLI)."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.chat import build_tokenizer, write_chat_files

from nemotron_jax.config import ModelConfig
from nemotron_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from nemotron_jax.generate import main
from nemotron_jax.inference.chat import (ChatTemplateError, default_stop_ids, load_chat_template, think_end_ids)
from nemotron_jax.inference.detokenize import REPLACEMENT, TextStream, safe_decode
from nemotron_jax.inference.engine import generate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
HISTORY = ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
           "<think></think>Hello<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n")


# ----------------------------------------------------------------------------- templates
def test_render_reasoning_on_and_off(tmp_path):
    tmpl = load_chat_template(write_chat_files(tmp_path))
    on = tmpl.render(MESSAGES, reasoning=True)
    off = tmpl.render(MESSAGES, reasoning=False)
    assert on == HISTORY + "<|im_start|>assistant\n<think>\n"  # the span is open: the model reasons first
    assert off == HISTORY + "<|im_start|>assistant\n<think></think>"  # closed empty span: it answers directly
    assert tmpl.render(MESSAGES) == on  # None leaves the template's default (on)
    assert tmpl.render(MESSAGES, add_generation_prompt=False) == HISTORY
    assert tmpl.mentions_reasoning


def test_template_environment_is_sandboxed_like_transformers(tmp_path):
    from nemotron_jax.inference.chat import ChatTemplate

    # trim_blocks / lstrip_blocks, tojson keeps non-ASCII, loop controls, raise_exception
    t = ChatTemplate("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m | tojson }}\n"
                     "{% endfor %}", "test")
    assert t.render([{"role": "user", "content": "déjà ✓"}, {"role": "user", "content": "x"}]) == \
        '{"role": "user", "content": "déjà ✓"}\n'
    tools = ChatTemplate("{{ 'with' if tools is not none else 'without' }} tools", "test")
    assert tools.render(MESSAGES) == "without tools"  # None, as transformers passes it, not undefined
    assert tools.render(MESSAGES, tools=[{"name": "f"}]) == "with tools"
    with pytest.raises(ChatTemplateError, match="unsupported role: tool"):
        load_chat_template(write_chat_files(tmp_path)).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="Security|unsafe|immutable|not safely"):
        ChatTemplate("{{ messages.append(1) }}", "test").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="Security|unsafe|access"):
        ChatTemplate("{{ messages.__class__.__mro__ }}", "test").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="TemplateSyntaxError"):
        ChatTemplate("{% if %}", "test").render([{"role": "user", "content": "x"}])


def test_template_sources_and_missing_template(tmp_path):
    d = write_chat_files(tmp_path / "a", template=None)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        load_chat_template(d)
    (d / "chat_template.jinja").write_text("J:{{ messages[0]['content'] }}")
    assert load_chat_template(d).render([{"role": "user", "content": "x"}]) == "J:x"
    # a chat_template.jinja file wins over tokenizer_config.json's
    d2 = write_chat_files(tmp_path / "b")
    (d2 / "chat_template.jinja").write_text("file")
    assert load_chat_template(d2).render([{"role": "user", "content": "x"}]) == "file"
    # the list form of tokenizer_config.json: the "default" entry
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_chat_template(d).render([{"role": "user", "content": "x"}]) == "D</s>"
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        load_chat_template(tmp_path / "nothing_here")


def test_think_end_marker_and_default_stops(tmp_path):
    d = write_chat_files(tmp_path / "with")
    tok = HFTokenizer(d / "tokenizer.json")
    assert think_end_ids(tok) == (tok.token_to_id("</think>"),)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4, 9999]}))
    assert default_stop_ids(d, tok) == sorted({2, tok.token_to_id("<|im_end|>")})  # 9999: not a token
    no = write_chat_files(tmp_path / "without", think_token=False)
    with pytest.raises(ChatTemplateError, match="no '</think>' token"):
        think_end_ids(HFTokenizer(no / "tokenizer.json"))
    assert think_end_ids(ByteTokenizer()) == tuple(b"</think>")  # a byte model spells it
    assert default_stop_ids(None, ByteTokenizer()) == []


# ----------------------------------------------------------------------------- streaming detokenization
def _stream(tok, ids, sizes, skip=()):
    s = TextStream(tok, skip=skip)
    pieces, i = [], 0
    for n in sizes:
        pieces.append(s.push(ids[i:i + n]))
        i += n
    pieces.append(s.push(ids[i:]))
    pieces.append(s.flush())
    return pieces


def test_stream_utf8_split_over_byte_tokens():
    tok = ByteTokenizer()
    text = "héllo ✓ wörld 日本語 🙂!"
    ids = list(text.encode("utf-8"))
    pieces = _stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)  # a half character is held back, never shown as U+FFFD
    rng = np.random.default_rng(0)
    for _ in range(20):  # arbitrary bytes (invalid sequences included), arbitrary chunking: same as one decode
        ids = rng.integers(0, 256, rng.integers(1, 40)).tolist()
        if rng.random() < 0.5:
            ids += list("é✓🙂".encode())
        sizes = rng.integers(1, 5, len(ids)).tolist()
        assert "".join(_stream(tok, ids, sizes)) == tok.decode(ids)


def test_stream_bpe_spacing_unknown_ids_and_hidden_tokens():
    tok = HFTokenizer.__new__(HFTokenizer)  # wrap an in-memory tokenizers.Tokenizer
    tok._tok, tok.path, tok.name = build_tokenizer(), "mem", "mem"
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text).tolist()
    assert len(ids) > 9  # merges and word-initial pieces: decoding token by token would lose the spaces
    pieces = _stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == tok.decode(ids) == text
    # ids past the tokenizer's end (a model vocabulary may be larger): U+FFFD, no crash
    n = tok.vocab_size
    mixed = ids[:3] + [n, n + 100] + ids[3:]
    assert safe_decode(tok, mixed) == tok.decode(ids[:3]) + REPLACEMENT * 2 + tok.decode(ids[3:])
    assert "".join(_stream(tok, mixed, [1] * len(mixed))) == safe_decode(tok, mixed)
    assert safe_decode(ByteTokenizer(), [104, 300, 105]) == "h" + REPLACEMENT + "i"
    end = tok.token_to_id("<|im_end|>")
    assert "".join(_stream(tok, ids + [end], [2] * len(ids), skip=[end])) == text


# ----------------------------------------------------------------------------- reasoning budget end to end
def chain_model(successor: dict[int, int], default: int):
    """A model whose greedy next token is successor[last token] (default for any other token).

    Attention and MLP outputs are zeroed, so the final hidden state is norm(embedding of the last token);
    each chain token gets its own embedding axis, and the LM head maps that axis to the token's successor.
    """
    from nemotron_jax.model import init_model

    # no Mamba layer; the dt clamp is HF's so that the export does not warn about it
    cfg = ModelConfig.tiny(hybrid_override_pattern="*-", dtype="float32", time_step_limit=(1e-3, math.inf))
    model = init_model(cfg, seed=0)
    d, v = cfg.hidden_size, cfg.vocab_size
    emb = np.zeros((v, d), np.float32)
    emb[:, 0] = math.sqrt(d)
    head = np.zeros((d, v), np.float32)
    head[0, default] = 1.0
    for axis, (tok, nxt) in enumerate(sorted(successor.items()), start=1):
        emb[tok] = 0.0
        emb[tok, axis] = math.sqrt(d)
        head[axis, nxt] = 1.0
    model.embeddings.set_value(jnp.asarray(emb))
    model.lm_head.kernel.set_value(jnp.asarray(head))
    for blk in model.layers:
        out = blk.mixer.o_proj if hasattr(blk.mixer, "o_proj") else blk.mixer.down_proj
        out.kernel.set_value(jnp.zeros_like(out.kernel[...]))
    return model


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """An HF checkpoint of a chain model that thinks 3 tokens, closes the span, answers 5 tokens, ends the turn."""
    from nemotron_jax.convert.hf import to_hf

    d = write_chat_files(tmp_path_factory.mktemp("thinking"))
    tok = HFTokenizer(d / "tokenizer.json")
    prompt = load_chat_template(d).render([{"role": "user", "content": "why is the sky blue?"}], reasoning=True)
    ids = tok.encode(prompt).tolist()
    end, im_end = tok.token_to_id("</think>"), tok.token_to_id("<|im_end|>")
    free = [i for i in range(20, tok.vocab_size) if i not in ids]
    think, answer = free[:3], free[3:8]
    chain = [ids[-1], *think, end, *answer, im_end]
    model = chain_model(dict(zip(chain[:-1], chain[1:])), default=im_end)
    to_hf(model, d)
    return dict(dir=d, tok=tok, model=model, ids=ids, think=think, answer=answer, end=end, im_end=im_end)


@pytest.mark.parametrize("budget", [0, 2, 5, None])
def test_reasoning_budget_engine_and_cli(thinking_checkpoint, budget, capsys):
    c = thinking_checkpoint
    think, answer, end, im_end = c["think"], c["answer"], c["end"], c["im_end"]
    if budget is not None and budget < len(think):  # forced: exactly `budget` thinking tokens, then the marker
        expected = think[:budget] + [end] + answer + [im_end]
    else:  # the model closes the span itself (after 3 < 5 tokens): no second marker at the budget
        expected = think + [end] + answer + [im_end]
    kw = dict(reasoning_budget=budget, think_end=(end,)) if budget is not None else {}
    out = generate(c["model"], [c["ids"]], max_new_tokens=16, stop_tokens=[im_end], **kw)
    assert out.tokens[0] == expected
    assert out.tokens[0].count(end) == 1

    argv = ["--hf", str(c["dir"]), "--chat", "--reasoning", "on", "--prompt", "why is the sky blue?",
            "--max-new-tokens", "16"] + (["--reasoning-budget", str(budget)] if budget is not None else [])
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out == c["tok"].decode(expected[:-1]) + "\n"  # <|im_end|> ends the turn and is not shown
    assert cap.out.count("</think>") == 1
    assert "stop: stop_token" in cap.err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- the CLI's speculative path
def test_cli_speculative_mtp_reports_acceptance_length(tmp_path, capsys):
    from nemotron_jax.convert.hf import from_hf, to_hf
    from nemotron_jax.model import init_model

    cfg = ModelConfig.tiny(num_nextn_predict_layers=1, hybrid_override_pattern="M*E", time_step_limit=(1e-3, math.inf))
    to_hf(init_model(cfg, seed=1), tmp_path)
    write_chat_files(tmp_path)
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    stops = default_stop_ids(tmp_path, tok)
    ref = generate(from_hf(tmp_path), [tok.encode("the quick brown")], max_new_tokens=10, stop_tokens=stops,
                   speculative="mtp", draft_len=2)
    assert main(["--hf", str(tmp_path), "--prompt", "the quick brown", "--max-new-tokens", "10",
                 "--speculative", "mtp", "--draft-len", "2"]) == 0
    cap = capsys.readouterr()
    assert cap.out == safe_decode(tok, [t for t in ref.tokens[0] if t not in stops]) + "\n"
    last = cap.err.strip().splitlines()[-1]
    assert f"acceptance length {ref.acceptance_length:.2f}" in last and last.count("tokens/s") == 2
