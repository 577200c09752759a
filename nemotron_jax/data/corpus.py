"""Text corpora as lists of documents: the bundled Shakespeare or any text file/directory.

A corpus is a list of `Document`s. The bundled default is the works of Shakespeare
(public domain, Project Gutenberg boilerplate removed), one document per scene of a
play (a poem, or a few sonnets, for the non-dramatic works), stored gzip-compressed
in `nemotron_jax/data/corpus/shakespeare.jsonl.gz`; see `corpus/PROVENANCE.md`.

Any UTF-8 text file, or a directory of `*.txt` files, replaces it: each file is cut
into documents at runs of two or more blank lines. In a directory, a `*.txt` file that is
binary (holds a NUL byte) or not valid UTF-8 is skipped with a `CorpusWarning` naming it and
the first bad byte; a single file given as the source is refused (`CorpusError`) instead. A
source that yields no text at all (empty files, every file skipped) raises `CorpusError`
naming the source.

The train/validation split is by document and deterministic: documents are ranked
by a seeded hash of their name and the first `round(fraction * n)` (at least one)
go to validation, so no document is ever in both splits.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

BUNDLED_CORPUS_FILE = "shakespeare.jsonl.gz"
VALIDATION_FRACTION = 0.05
SPLIT_SEED = 0
SPLITS = ("train", "validation")


class CorpusError(ValueError):
    """A data source that cannot give a corpus (unreadable file, no text); the message names the source."""


class CorpusWarning(UserWarning):
    """A file of a data directory was skipped (binary or not UTF-8); the message names it."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `name` is unique in its corpus (e.g. "hamlet/007")."""

    name: str
    text: str


# ----------------------------------------------------------------------------------
# Loading


def bundled_corpus_path() -> Path:
    """Path of the gzip-compressed JSON-lines file shipped inside the package."""
    return Path(str(resources.files("nemotron_jax.data") / "corpus" / BUNDLED_CORPUS_FILE))


def load_bundled() -> list[Document]:
    """The bundled Shakespeare corpus, one `Document` per scene/poem, in stored order."""
    return list(_load_bundled_cached())


@functools.lru_cache(maxsize=1)
def _load_bundled_cached() -> tuple[Document, ...]:
    path = bundled_corpus_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled corpus {path} is missing: the package was installed without its "
            "package data (see docs/data.md), or set a data source path instead"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(Document(r["name"], r["text"]) for r in map(json.loads, f))


def split_text(text: str, work: str) -> list[Document]:
    """Cuts one file's text into documents at runs of >= 2 blank lines (empty pieces dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    pieces = [p.strip("\n") for p in re.split(r"\n[ \t]*\n(?:[ \t]*\n)+", text)]
    pieces = [p for p in pieces if p.strip()]
    return [Document(f"{work}/{i:05d}", p) for i, p in enumerate(pieces)]


def read_text_file(f: Path) -> str:
    """The text of a UTF-8 file (a leading BOM dropped); CorpusError naming the file for binary or non-UTF-8 bytes."""
    data = f.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{str(f)!r} looks binary (NUL byte at offset {nul}), not a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{str(f)!r} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def load_path(path: str | os.PathLike) -> list[Document]:
    """Documents of a UTF-8 text file, or of every `*.txt` file under a directory (sorted).

    A binary or non-UTF-8 file is refused when it is the source itself and skipped with a CorpusWarning when it
    sits in a source directory; a source with no text left raises CorpusError naming it (and what was skipped).
    """
    if isinstance(path, str) and not path.strip():
        raise CorpusError("data source path is an empty string; give a file or directory, or None for the "
                          "bundled corpus")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data source path does not exist: {str(path)!r}")
    if p.is_file():
        files, root = [p], p.parent
    elif p.is_dir():
        files, root = sorted(f for f in p.rglob("*.txt") if f.is_file()), p
        if not files:
            raise FileNotFoundError(f"data source directory {str(path)!r} holds no *.txt files")
    else:
        raise FileNotFoundError(f"data source path is neither a file nor a directory: {str(path)!r}")
    docs, skipped = [], []
    for f in files:
        try:
            text = read_text_file(f)
        except CorpusError as e:
            if p.is_file():
                raise CorpusError(f"data source {e}") from None
            skipped.append(f.relative_to(root).as_posix())
            warnings.warn(f"data source {str(path)!r}: skipping {e}", CorpusWarning, stacklevel=2)
            continue
        docs += split_text(text, f.relative_to(root).as_posix())
    if not docs:
        why = (f"; skipped (binary or not UTF-8): {', '.join(skipped)}" if skipped else
               f" (its {len(files)} file(s) are empty or blank)" if p.is_dir() else " (the file is empty or blank)")
        raise CorpusError(f"data source {str(path)!r} holds no text{why}")
    return docs


def load_documents(source: str | os.PathLike | None = None) -> list[Document]:
    """All documents of `source`: None for the bundled corpus, else a file or directory path."""
    return load_bundled() if source is None else load_path(source)


# ----------------------------------------------------------------------------------
# Train / validation split


def _rank_key(name: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=16).digest()


def split_documents(
    docs: Sequence[Document],
    split: str,
    *,
    validation_fraction: float = VALIDATION_FRACTION,
    seed: int = SPLIT_SEED,
) -> list[Document]:
    """The documents of `split` ("train" or "validation"), in their original order.

    Documents are ranked by a seeded hash of their name; the `round(fraction * n)`
    lowest-ranked (at least 1 when n >= 2) are validation, the rest train.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if not docs:
        raise CorpusError("the corpus is empty (0 documents): nothing to split; check the data source")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique to split a corpus")
    n = len(docs)
    n_val = int(round(validation_fraction * n))
    if validation_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(names, key=lambda s: _rank_key(s, seed))
    val = set(ranked[:n_val])
    want_val = split == "validation"
    out = [d for d in docs if (d.name in val) == want_val]
    if not out:
        raise CorpusError(
            f"split {split!r} is empty: the corpus has {n} document(s); give it more "
            "documents (separate them by two blank lines) or change validation_fraction"
        )
    return out


def load_split(
    source: str | os.PathLike | None,
    split: str,
    *,
    validation_fraction: float = VALIDATION_FRACTION,
    split_seed: int = SPLIT_SEED,
) -> list[Document]:
    """`split_documents(load_documents(source), split, ...)`; a corpus error names the source."""
    docs = load_documents(source)
    try:
        return split_documents(docs, split, validation_fraction=validation_fraction, seed=split_seed)
    except CorpusError as e:
        raise CorpusError(f"data source {'bundled corpus' if source is None else repr(str(source))}: {e}") from None


# ----------------------------------------------------------------------------------
# Building the bundled file (maintainers; see corpus/PROVENANCE.md)

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.M | re.I,
)
_SMALL_PRINT = re.compile(r"^<<.*?>>\s*$", re.M | re.S)

# Headings that start a new document: acts, scenes, and bare roman numerals (sonnets).
_HEADING = re.compile(
    r"^(?:ACT|Act)\s+(?:[IVXL]+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
    r"|^\s*(?:SCENE|Scene)\s+[IVXL]+\b"
    r"|^\s*[IVXLC]+\.?\s*$"
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Removes a Project Gutenberg header/footer and legacy `<<...>>` notices from an etext."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text)
    if m:
        text = text[: m.start()]
    text = _SMALL_PRINT.sub("", text)
    lines = [ln for ln in text.split("\n") if not re.search(r"project gutenberg", ln, re.I)]
    return "\n".join(lines).strip("\n") + "\n"


def split_work(text: str, work: str, *, min_chars: int = 1500) -> list[Document]:
    """Cuts one work into documents at act/scene headings (or sonnet numerals).

    A heading starts a new document only once the current one holds `min_chars`, so
    an act heading stays with its first scene and short sonnets are grouped; a short
    tail is merged into the previous document.
    """
    docs: list[list[str]] = [[]]
    size = 0
    for line in text.split("\n"):
        if _HEADING.match(line) and size >= min_chars:
            docs.append([])
            size = 0
        docs[-1].append(line)
        size += len(line) + 1
    if len(docs) > 1 and size < min_chars:
        tail = docs.pop()
        docs[-1] += tail
    texts = ["\n".join(d).strip("\n") + "\n" for d in docs]
    return [Document(f"{work}/{i:03d}", t) for i, t in enumerate(texts) if t.strip()]


def build_bundled_corpus(texts_dir: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Builds the bundled file from the `shksprdata/texts` folder of `shakespeare` 0.6.

    Uses the modern-spelling editions (`*_gut.txt`), not the First Folio duplicates
    (`*_gut_f.txt`), so no play appears twice. Writes reproducible bytes (gzip mtime 0).
    Returns a summary dict.
    """
    texts_dir = Path(texts_dir)
    files = sorted(f for f in texts_dir.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {texts_dir}")
    docs: list[Document] = []
    for f in files:
        work = f.name[: -len("_gut.txt")]
        text = strip_gutenberg_boilerplate(f.read_bytes().decode("utf-8"))
        docs += split_work(text, work)
    for d in docs:
        if "project gutenberg" in d.text.lower():
            raise ValueError(f"Gutenberg boilerplate left in {d.name}")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as g:
        for d in docs:
            g.write((json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False) + "\n").encode())
    Path(out_path).write_bytes(buf.getvalue())
    return {
        "works": len(files),
        "documents": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "compressed_bytes": len(buf.getvalue()),
    }


def corpus_stats(docs: Iterable[Document]) -> dict:
    docs = list(docs)
    lengths = sorted(len(d.text) for d in docs)
    return {
        "documents": len(docs),
        "chars": sum(lengths),
        "median_doc_chars": lengths[len(lengths) // 2] if lengths else 0,
        "max_doc_chars": lengths[-1] if lengths else 0,
    }

