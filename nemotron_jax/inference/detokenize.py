"""Token ids -> text, safely and incrementally (for streaming).

`safe_decode` never fails on an id the tokenizer lacks: a model's vocabulary may be larger than its
tokenizer's (padded to a round size), and a sampled id past the tokenizer's end shows as U+FFFD.

`TextStream` turns ids arriving in pieces into text pieces whose concatenation is the decode of all ids.
Decoding one token at a time is wrong twice over: a multi-byte UTF-8 character split over tokens would print
as replacement characters, and decoders that depend on neighbours (SentencePiece's leading space, byte-level
BPE) would print the wrong spacing. So each step decodes a window that starts one piece back, emits only what
the new ids added, and holds text back while it ends in U+FFFD (an incomplete character that later ids may
complete); `flush()` releases whatever remains.
"""

from __future__ import annotations

from typing import Callable, Iterable

REPLACEMENT = "\ufffd"


def _known_id(tokenizer) -> Callable[[int], bool]:
    id_to_token = getattr(tokenizer, "id_to_token", None)
    if id_to_token is not None:
        return lambda i: i >= 0 and id_to_token(i) is not None
    n = tokenizer.vocab_size
    return lambda i: 0 <= i < n


def safe_decode(tokenizer, ids: Iterable[int], known: Callable[[int], bool] | None = None) -> str:
    """tokenizer.decode(ids), with U+FFFD for each id the tokenizer does not have (never raises for those)."""
    known = known or _known_id(tokenizer)
    out, run = [], []
    for i in ids:
        i = int(i)
        if known(i):
            run.append(i)
            continue
        if run:
            out.append(tokenizer.decode(run))
            run = []
        out.append(REPLACEMENT)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


class TextStream:
    """Incremental detokenizer: `push(ids) -> new text`, `flush() -> the rest`; `skip` ids are never shown."""

    def __init__(self, tokenizer, skip: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.skip = {int(i) for i in skip}
        self.known = _known_id(tokenizer)
        self.ids: list[int] = []
        self.prefix = 0  # the window decoded for context starts here
        self.read = 0  # ids before this have been shown
        self.text = ""  # everything shown so far

    def _decode(self, ids) -> str:
        return safe_decode(self.tokenizer, ids, self.known)

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids if int(i) not in self.skip)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        shown = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if not final and (len(now) <= len(shown) or now.endswith(REPLACEMENT)):
            return ""  # nothing new yet, or an incomplete character that the next ids may finish
        new = now[len(shown):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new
