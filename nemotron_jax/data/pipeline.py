"""grain pipeline: documents -> tokens -> chunks of <= seq_len -> shuffle -> pack -> batch.

Batch format (dict of numpy arrays, all int32, shape [batch_size, seq_len]):

    tokens       token ids; 0 on padding
    segment_ids  1, 2, ... for the pieces packed into a row (one per document chunk), 0 on padding
    positions    position of the token within its piece (restarts at 0), 0 on padding
    loss_mask    1 on real tokens, 0 on padding

A document longer than `seq_len` is cut into chunks of `seq_len` tokens; each chunk is
its own segment (a chunk boundary counts as a document boundary). Attention and the
Mamba scan must not cross segment boundaries; next-token targets must not either
(`nemotron_jax.losses.shifted_targets(tokens, 1, segment_ids, loss_mask)` masks them).

The iterator (`iter(make_dataset(...))`) is a `grain.DatasetIterator`: `get_state()`
returns a JSON-serialisable dict, and `set_state(state)` on a fresh iterator of the same
dataset resumes exactly.

Multi-process training (design): `batch_size` is the GLOBAL batch. Every process builds the
same document stream and packs the same global batches (same seed, same documents); `rows`
keeps only the rows of each global batch that this process's devices hold (the trainer
computes them from the batch sharding: `nemotron_jax.train.mesh.process_rows`). So the global
batch, and with it the loss curve, does not depend on how many processes there are, and the
iterator's state (`get_state()`, taken before the row selection, which is stateless) is the
same on every process: a checkpoint needs to store it once. The price is that every process
tokenizes and packs the whole stream (cheap next to a training step for text corpora of this
size). For corpora too large for that, `shard_index` / `shard_count` shard whole documents
before chunking instead (processes then see disjoint documents, but the batches depend on the
process count and each process's iterator has its own state).
"""

from __future__ import annotations

import functools
import math
import os

import grain
import numpy as np

from nemotron_jax.data import corpus as corpus_lib
from nemotron_jax.data.tokenizer import Tokenizer, make_tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def chunk_tokens(tokens: np.ndarray, seq_len: int, min_len: int = 2) -> list[np.ndarray]:
    """Cuts one document's tokens into consecutive pieces of `seq_len` (the last may be shorter).

    Pieces shorter than `min_len` are dropped: with fewer than 2 tokens there is no
    next-token target inside the piece.
    """
    pieces = (tokens[i:i + seq_len] for i in range(0, len(tokens), seq_len))
    return [p for p in pieces if len(p) >= min_len]


def resolve_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """(shard_index, shard_count), defaulting to this JAX process's index and the process count."""
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (shard_count >= 1 and 0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=}, {shard_count=}")
    return shard_index, shard_count


def _to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    seg = packed["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "segment_ids": seg,
        "positions": packed["tokens_positions"].astype(np.int32),
        "loss_mask": (seg > 0).astype(np.int32),
    }


def _take_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}


def _as_element(chunk: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": chunk}


def make_dataset(
    source: str | os.PathLike | None = None,
    split: str = "train",
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    rows=None,
    shard_index: int = 0,
    shard_count: int = 1,
    validation_fraction: float = corpus_lib.VALIDATION_FRACTION,
    split_seed: int = corpus_lib.SPLIT_SEED,
    num_packing_bins: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The packed, batched grain dataset of one split; iterate it for batches (see module doc).

    Args:
        source: None for the bundled corpus, else a text file or a directory of `*.txt`.
        split: "train" or "validation".
        tokenizer: a tokenizer object, a `tokenizer.json` path, or None for bytes.
        seq_len: tokens per row (T).
        batch_size: rows per (global) batch (B).
        rows: the rows of each batch that this process keeps (sorted indices in [0, batch_size));
            None keeps all. The selection is stateless: the iterator state does not depend on it.
        seed: seeds the chunk shuffle (reshuffled each epoch) and the packed-row shuffle.
        shuffle: False keeps document order (e.g. for validation).
        num_epochs: passes over the data; None repeats forever.
        worker_count: grain worker processes (0: in this process). With > 0 the program
            must create and iterate the dataset under `if __name__ == "__main__":`.
        worker_buffer_size: batches each worker prefetches.
        shard_index, shard_count: keep only documents `shard_index::shard_count` (default: all).
            Not needed for multi-process training (see `rows` and the module doc).
        validation_fraction, split_seed: the train/validation split (see `corpus`).
        num_packing_bins: rows packed together at a time (default `batch_size`).
        drop_remainder: drop a last partial batch of a finite dataset.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len=}, {batch_size=}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not (rows.size and np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < batch_size):
            raise ValueError(f"rows must be sorted distinct indices in [0, {batch_size}), got {rows.tolist()}")
        if not drop_remainder and num_epochs is not None:
            raise ValueError("rows needs full batches: use drop_remainder=True (or num_epochs=None)")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = make_tokenizer(tokenizer)

    docs = corpus_lib.load_split(source, split, validation_fraction=validation_fraction, split_seed=split_seed)
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    docs = docs[shard_index::shard_count]  # whole documents per process: disjoint across processes
    chunks = [c for toks in tokenizer.encode_batch([d.text for d in docs]) for c in chunk_tokens(toks, seq_len)]
    if not chunks:
        where = "the bundled corpus" if source is None else repr(str(source))
        raise ValueError(f"shard {shard_index}/{shard_count} of split {split!r} of {where} has no tokens "
                         f"({len(docs)} documents): use fewer processes or a larger corpus")

    ds = grain.MapDataset.source(chunks)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_as_element)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it_ds = grain.experimental.FirstFitPackIterDataset(
        it_ds, length_struct={"tokens": seq_len}, num_packing_bins=num_packing_bins or batch_size,
        seed=seed, shuffle_bins=shuffle)
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder).map(_to_batch)
    if rows is not None and rows.size < batch_size:
        it_ds = it_ds.map(functools.partial(_take_rows, rows=rows))
    if worker_count > 0:
        # grain's worker processes read absl flags; a program that never parsed them
        # (no absl.app.run / config_flags) gets their defaults instead of an error.
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
    return it_ds


# ----------------------------------------------------------------------------------
# Unigram baseline


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `eval_tokens` under the add-one-smoothed unigram of `train_tokens`.

    p(v) = (count_train(v) + 1) / (N_train + vocab_size).
    """
    train_tokens = np.asarray(train_tokens).reshape(-1)
    eval_tokens = np.asarray(eval_tokens).reshape(-1)
    if eval_tokens.size == 0:
        raise ValueError("no evaluation tokens")
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)
    if counts.size > vocab_size:
        raise ValueError(f"token id {train_tokens.max()} >= vocab_size {vocab_size}")
    log_p = np.log(counts + 1.0) - math.log(train_tokens.size + vocab_size)
    return float(-log_p[eval_tokens].mean())


def _unigram_baseline(source, tokenizer, split, validation_fraction, split_seed):
    docs = corpus_lib.load_documents(source)
    kw = dict(validation_fraction=validation_fraction, seed=split_seed)
    train = corpus_lib.split_documents(docs, "train", **kw)
    evald = corpus_lib.split_documents(docs, split, **kw)
    cat = lambda ds: np.concatenate(tokenizer.encode_batch([d.text for d in ds]) or [np.zeros(0, np.int32)])
    return unigram_cross_entropy(cat(train), cat(evald), tokenizer.vocab_size)


def unigram_baseline(
    split: str = "validation",
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    *,
    validation_fraction: float = corpus_lib.VALIDATION_FRACTION,
    split_seed: int = corpus_lib.SPLIT_SEED,
) -> float:
    """Cross-entropy (nats/token) of all tokens of `split` under the add-one-smoothed
    unigram distribution of all training tokens (all shards): the loss to beat."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = make_tokenizer(tokenizer)
    return _unigram_baseline(source, tokenizer, split, validation_fraction, split_seed)


__all__ = [
    "BATCH_KEYS",
    "chunk_tokens",
    "make_dataset",
    "resolve_shard",
    "unigram_baseline",
    "unigram_cross_entropy",
]
