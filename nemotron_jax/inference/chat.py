"""Chat prompts from a checkpoint's own Jinja chat template, reasoning on/off, and the end-of-thinking marker.

    tmpl = load_chat_template("path/to/NVIDIA-Nemotron-3-Nano-30B-A3B")
    text = tmpl.render([{"role": "user", "content": "Hi"}], reasoning=False)
    ids = tokenizer.encode(text)                 # the template writes the special tokens as text
    end = think_end_ids(tokenizer)               # (id of "</think>",) for generate(..., think_end=end)

The template comes from `chat_template.jinja` in the checkpoint directory when that file exists, else from
`tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: "default" is used). It is
rendered the way transformers renders chat templates: a sandboxed, immutable Jinja environment with
trim_blocks and lstrip_blocks, the loop-control extension, a `tojson` filter that keeps non-ASCII text, and
`raise_exception(msg)` / `strftime_now(fmt)` globals; the variables are `messages`, `add_generation_prompt`,
`tools` and `documents` (None unless given), the special tokens of `tokenizer_config.json` (`bos_token`,
`eos_token`, ...) and any extra keyword.

Reasoning: Nemotron 3 templates read `enable_thinking` (default on). With it on, the generation prompt opens
the thinking span (`<think>`) and the model reasons first; off, the template writes an empty span
(`<think></think>`) and the model answers directly. `render(..., reasoning=None)` leaves the template's
default.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
from typing import Any, Sequence

THINK_START = "<think>"
THINK_END = "</think>"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
REASONING_VARIABLE = "enable_thinking"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
END_OF_TURN = "<|im_end|>"


class ChatTemplateError(ValueError):
    """The checkpoint has no usable chat template, the template refused the messages, or a marker is missing."""


def _token_text(v: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object")
    return data


def special_tokens(directory: str | os.PathLike) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...} from the directory's tokenizer_config.json ({} without one)."""
    path = pathlib.Path(directory) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    cfg = _read_json(path)
    return {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(cfg.get(k))) is not None}


def _environment():
    import jinja2  # noqa: PLC0415
    import jinja2.ext  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    origin: str  # where it was read from (for messages)
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, reasoning: bool | None = None,
               **variables: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

        reasoning: True/False sets the template's `enable_thinking`; None leaves the template's default.
        variables: further template variables (tools, documents, ...).
        """
        import jinja2  # noqa: PLC0415

        if not messages:
            raise ChatTemplateError("render: no messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ChatTemplateError(f"message {i} must be a dict with a 'role' (and 'content'); got {m!r}")
        # as transformers does: tools and documents are None (not undefined) unless given, so that a template's
        # `tools is not none` test reads the same here
        context = dict(self.special_tokens, tools=None, documents=None)
        context.update(variables)
        if reasoning is not None:
            context[REASONING_VARIABLE] = bool(reasoning)
        try:
            template = _environment().from_string(self.source)
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:  # syntax errors, raise_exception, sandbox violations
            raise ChatTemplateError(f"chat template ({self.origin}): {type(e).__name__}: {e}") from None

    @property
    def mentions_reasoning(self) -> bool:
        """Whether the template reads the reasoning switch (else reasoning on/off changes nothing)."""
        return REASONING_VARIABLE in self.source


def load_chat_template(directory: str | os.PathLike) -> ChatTemplate:
    """The chat template of a checkpoint directory: chat_template.jinja, else tokenizer_config.json's."""
    d = pathlib.Path(directory)
    specials = special_tokens(d)
    jinja_file = d / TEMPLATE_FILE
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file), specials)
    cfg_file = d / TOKENIZER_CONFIG
    if cfg_file.is_file():
        raw = _read_json(cfg_file).get("chat_template")
        if isinstance(raw, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
            if raw is None:
                raise ChatTemplateError(f"{cfg_file}: chat_template is a list without a 'default' entry "
                                        f"(it has {sorted(str(k) for k in named)})")
        if isinstance(raw, str) and raw.strip():
            return ChatTemplate(raw, f"{cfg_file} chat_template", specials)
    raise ChatTemplateError(f"{str(d)!r} has no chat template: neither {TEMPLATE_FILE} nor a chat_template in "
                            f"{TOKENIZER_CONFIG}; drop --chat and write the prompt in the model's format yourself")


def think_end_ids(tokenizer, marker: str = THINK_END) -> tuple[int, ...]:
    """Token ids of the end-of-thinking marker, for the reasoning budget.

    A tokenizer with its own vocabulary must have the marker as one token (as Nemotron 3's has): a model only
    closes the span with that token, so a spelling in pieces would never be recognised. A byte tokenizer spells
    the marker in bytes (all a byte-level model can produce).
    """
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if token_to_id is None:  # byte tokenizer
        ids = tuple(int(i) for i in tokenizer.encode(marker))
        if not ids:
            raise ChatTemplateError(f"the end-of-thinking marker {marker!r} encodes to no tokens")
        return ids
    i = token_to_id(marker)
    if i is None:
        raise ChatTemplateError(f"the tokenizer ({tokenizer!r}) has no {marker!r} token, so this checkpoint has no "
                                f"end-of-thinking marker: a reasoning budget needs one")
    return (int(i),)


def default_stop_ids(directory: str | os.PathLike | None, tokenizer) -> list[int]:
    """Ids that end a reply by default: the tokenizer's eos (tokenizer_config.json), generation_config.json's
    eos_token_id(s), and `<|im_end|>` (end of a chat turn) when the tokenizer has it. Byte tokenizer: none."""
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if token_to_id is None:
        return []
    ids: list[int] = []
    names = [END_OF_TURN]
    if directory is not None:
        d = pathlib.Path(directory)
        eos = special_tokens(d).get("eos_token")
        if eos:
            names.insert(0, eos)
        gen = d / GENERATION_CONFIG
        if gen.is_file():
            try:
                e = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, json.JSONDecodeError, AttributeError):
                e = None
            for x in (e if isinstance(e, list) else [e]):
                if isinstance(x, int) and x >= 0 and tokenizer.id_to_token(x) is not None:
                    ids.append(x)
    for n in names:
        i = token_to_id(n)
        if i is not None:
            ids.append(int(i))
    return sorted(set(ids))
