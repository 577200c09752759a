"""Tokenizers: UTF-8 bytes by default, or a Hugging Face `tokenizer.json` file.

Both expose `encode(text) -> np.ndarray[int32]`, `encode_batch(texts)`,
`decode(ids) -> str` and `vocab_size`. Neither adds special tokens: document
boundaries are carried by the pipeline's segment ids, not by BOS/EOS tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np


def _check_text(text, what: str = "text") -> str:
    if not isinstance(text, str):
        hint = " (decode bytes to str first, e.g. data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"encode: {what} must be a str, got {type(text).__name__}{hint}")
    return text


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Token ids are the UTF-8 bytes of the text (vocab 256); invalid bytes decode as U+FFFD."""

    name = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(_check_text(text).encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"byte token ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte token ids must be in [0, 255], got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizer.json` loaded with `tokenizers.Tokenizer.from_file`."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file does not exist: {str(path)!r}")
        try:
            import tokenizers  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError(
                f"loading {str(path)!r} needs the `tokenizers` package: pip install tokenizers"
            ) from e
        self.path = str(p)
        self.name = p.name
        self._tok = tokenizers.Tokenizer.from_file(self.path)

    @property
    def vocab_size(self) -> int:
        # Added tokens included, so every id the tokenizer can emit is < vocab_size.
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(_check_text(text), add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = [_check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry or added token (e.g. "</think>"), None if there is no such token."""
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry of an id, None for an id the tokenizer does not have."""
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def make_tokenizer(path: str | os.PathLike | None = None) -> ByteTokenizer | HFTokenizer:
    """`ByteTokenizer()` when `path` is None or "bytes", else `HFTokenizer(path)`."""
    if path is None or str(path) in ("", "bytes", "byte"):
        return ByteTokenizer()
    return HFTokenizer(path)
