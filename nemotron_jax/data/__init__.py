"""Data: the bundled corpus, tokenizers and the packed grain pipeline (see docs/data.md)."""

from nemotron_jax.data.corpus import (
    Document,
    bundled_corpus_path,
    load_documents,
    load_split,
    split_documents,
)
from nemotron_jax.data.pipeline import (
    BATCH_KEYS,
    chunk_tokens,
    make_dataset,
    unigram_baseline,
    unigram_cross_entropy,
)
from nemotron_jax.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "Document",
    "HFTokenizer",
    "bundled_corpus_path",
    "chunk_tokens",
    "load_documents",
    "load_split",
    "make_dataset",
    "make_tokenizer",
    "split_documents",
    "unigram_baseline",
    "unigram_cross_entropy",
]
