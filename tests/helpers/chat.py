"""Chat checkpoint assets shared by test_cli.py and test_chat.py (a plain module, not a conftest).

A tiny BPE tokenizer.json (trained here; special tokens <|im_start|> <|im_end|> <think> </think>) and a
tokenizer_config.json holding a small Nemotron-3-shaped chat template written for these tests (reasoning
switched by `enable_thinking`, default on)."""

from __future__ import annotations

import json
import pathlib

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "user assistant system hello world",
          "why is the sky blue? because light scatters", "café naïve ✓ déjà vu", "one two three four five\n"]

# Our own template: one block per message, an empty thinking span on assistant turns that have none,
# and a generation prompt that opens the span (reasoning on) or writes it closed (reasoning off).
TEMPLATE = """{%- set thinking = enable_thinking if enable_thinking is defined else true -%}
{{ bos_token }}
{%- for m in messages -%}
{%- if m['role'] not in ['system', 'user', 'assistant'] -%}
{{ raise_exception('unsupported role: ' ~ m['role']) }}
{%- endif -%}
<|im_start|>{{ m['role'] }}
{% if m['role'] == 'assistant' and '</think>' not in m['content'] %}<think></think>{% endif %}
{{- m['content'] }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if thinking %}<think>
{% else %}<think></think>{% endif %}
{%- endif -%}"""


def build_tokenizer(vocab_size: int = 120, specials=tuple(SPECIALS)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_chat_files(directory, *, think_token: bool = True, template: str | None = TEMPLATE) -> pathlib.Path:
    """tokenizer.json (+ tokenizer_config.json with the template, unless template is None) into directory."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    specials = [s for s in SPECIALS if think_token or s not in ("<think>", "</think>")]
    build_tokenizer(specials=specials).save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return d
