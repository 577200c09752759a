"""The grain pipeline: determinism, packing boundaries, resume, process sharding, custom sources, baseline."""

import collections
import json
import math

import numpy as np
import pytest

from nemotron_jax.data import ByteTokenizer, corpus, make_dataset, unigram_baseline, unigram_cross_entropy
from nemotron_jax.data.pipeline import BATCH_KEYS, chunk_tokens

T, B = 64, 4
ONE = dict(shard_index=0, shard_count=1)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


def segments(batch):
    """Yields the token array of every packed segment in a batch."""
    for toks, seg in zip(batch["tokens"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            yield toks[seg == s]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A file of 60 documents `<NNN>` + random letters, 5..150 bytes (some longer than T)."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(60):
        n = int(rng.integers(5, 150))
        docs.append(f"<{i:03d}>" + "".join(rng.choice(list("abcdefgh "), n)).strip() + ".")
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n\n".join(docs) + "\n")
    return path, docs


def test_batch_format_and_determinism():
    kw = dict(seq_len=T, batch_size=B, **ONE)
    a = take(iter(make_dataset(seed=1, **kw)), 5)
    b = take(iter(make_dataset(seed=1, **kw)), 5)
    c = take(iter(make_dataset(seed=2, **kw)), 5)
    for k in BATCH_KEYS:
        assert a[0][k].shape == (B, T) and a[0][k].dtype == np.int32, k
    assert same(a, b)
    assert not any(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    unshuffled = take(iter(make_dataset(seed=1, shuffle=False, **kw)), 1)[0]
    first_doc = corpus.split_documents(corpus.load_bundled(), "train")[0].text
    assert ByteTokenizer().decode(unshuffled["tokens"][0]) == first_doc.encode()[:T].decode(errors="replace")


def check_packing(batch, seq_len):
    seg, pos, mask, toks = batch["segment_ids"], batch["positions"], batch["loss_mask"], batch["tokens"]
    assert seg.shape[1] == seq_len
    for r in range(seg.shape[0]):
        s = seg[r]
        n_real = int((s > 0).sum())
        assert (s[:n_real] > 0).all() and (s[n_real:] == 0).all(), "padding only at the row end"
        assert np.all(np.diff(s[:n_real]) >= 0) and np.all(np.diff(s[:n_real]) <= 1), "segments 1, 2, ... in order"
        if n_real:
            assert s[0] == 1
        for k in range(1, s.max() + 1):
            assert np.array_equal(pos[r][s == k], np.arange((s == k).sum())), "positions restart at 0"
        assert (mask[r] == (s > 0)).all()
        assert (toks[r][s == 0] == 0).all() and (pos[r][s == 0] == 0).all()


def test_packing_boundaries(small_corpus):
    path, docs = small_corpus
    # Every legal segment: chunk k of document d is doc[k*T:(k+1)*T] (a contiguous piece).
    train = corpus.load_split(path, "train")
    expected = collections.Counter(
        c.tobytes() for d in train for c in chunk_tokens(ByteTokenizer().encode(d.text), T))
    batches = list(iter(make_dataset(path, seq_len=T, batch_size=B, seed=0, num_epochs=1,
                                     drop_remainder=False, **ONE)))
    seen = collections.Counter()
    for batch in batches:
        check_packing(batch, T)
        for s in segments(batch):
            seen[s.tobytes()] += 1
    assert seen == expected  # one epoch: each chunk exactly once, nothing else
    assert max(b["segment_ids"].max() for b in batches) >= 3, "rows really hold several documents"
    assert any(len(ByteTokenizer().encode(d.text)) > T for d in train), "some documents were split"
    for batch in take(iter(make_dataset(seq_len=T, batch_size=B, seed=0, **ONE)), 20):  # bundled corpus
        check_packing(batch, T)


def test_iterator_resume(small_corpus):
    kw = dict(seq_len=T, batch_size=B, seed=7, **ONE)
    it = iter(make_dataset(**kw))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
    after = take(it, 4)
    it2 = iter(make_dataset(**kw))
    it2.set_state(state)
    assert same(after, take(it2, 4))
    # Across an epoch boundary of the small corpus.
    path, _ = small_corpus
    kw = dict(seq_len=T, batch_size=B, seed=3, **ONE)
    per_epoch = len(list(make_dataset(path, num_epochs=1, **kw)))
    k, m = per_epoch - 2, 5
    it = iter(make_dataset(path, **kw))
    take(it, k)
    state = it.get_state()
    after = take(it, m)
    it2 = iter(make_dataset(path, **kw))
    it2.set_state(state)
    assert same(after, take(it2, m))
    assert same(after, take(iter(make_dataset(path, **kw)), k + m)[k:])  # = the uninterrupted stream
    assert not same(after, take(iter(make_dataset(path, **kw)), m))  # ... not a restart


def doc_ids(batches):
    ids = set()
    for b in batches:
        for s in segments(b):
            text = ByteTokenizer().decode(s)
            if text.startswith("<"):
                ids.add(int(text[1:4]))
    return ids


def test_process_sharding_disjoint(small_corpus):
    path, docs = small_corpus
    kw = dict(seq_len=T, batch_size=B, seed=0, num_epochs=1, drop_remainder=False)
    shard = [doc_ids(make_dataset(path, shard_index=i, shard_count=2, **kw)) for i in range(2)]
    train_ids = {int(d.text[1:4]) for d in corpus.load_split(path, "train")}
    assert shard[0] and shard[1]
    assert not shard[0] & shard[1]
    assert shard[0] | shard[1] == train_ids
    # By default every document (multi-process runs select rows of the global batch instead).
    assert doc_ids(make_dataset(path, **kw)) == train_ids
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        make_dataset(path, shard_index=2, shard_count=2, **kw)


def test_validation_split_pipeline(small_corpus):
    path, _ = small_corpus
    kw = dict(seq_len=T, batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False, **ONE)
    val_ids = {int(d.text[1:4]) for d in corpus.load_split(path, "validation")}
    assert doc_ids(make_dataset(path, "validation", **kw)) == val_ids
    assert not doc_ids(make_dataset(path, "train", **kw)) & val_ids


def test_custom_sources_replace_default(small_corpus, tmp_path):
    path, docs = small_corpus
    text = path.read_text()
    for b in take(iter(make_dataset(path, seq_len=T, batch_size=B, **ONE)), 3):
        for s in segments(b):
            assert ByteTokenizer().decode(s) in text
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(4):
        (d / f"f{i}.txt").write_text(f"file {i} says " + "zyx " * 30)
    b = next(iter(make_dataset(d, seq_len=T, batch_size=B, **ONE)))
    assert all(ByteTokenizer().decode(s).strip() in " ".join((d / f"f{i}.txt").read_text() for i in range(4))
               for s in segments(b))
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_dataset(missing, seq_len=T, batch_size=B, **ONE)


def test_unigram_baseline_by_hand(tmp_path):
    # Hand computation: p(v) = (count_train(v) + 1) / (N_train + V).
    train, held = np.array([0, 0, 1]), np.array([0, 2])
    expected = -(math.log((2 + 1) / (3 + 4)) + math.log((0 + 1) / (3 + 4))) / 2
    assert unigram_cross_entropy(train, held, vocab_size=4) == pytest.approx(expected, rel=1e-12)
    # End to end on a two-document file: one document per split.
    f = tmp_path / "tiny.txt"
    f.write_text("aab\n\n\nabc\n")
    kw = dict(validation_fraction=0.5)
    (tr,), (va,) = corpus.load_split(f, "train", **kw), corpus.load_split(f, "validation", **kw)
    counts = collections.Counter(tr.text.encode())
    n = len(tr.text.encode())
    hand = -sum(math.log((counts[ch] + 1) / (n + 256)) for ch in va.text.encode()) / len(va.text.encode())
    assert unigram_baseline("validation", None, f, **kw) == pytest.approx(hand, rel=1e-12)
    # The bundled corpus: bytes are far from uniform (ln 256 = 5.55 nats).
    assert 2.5 < unigram_baseline() < 4.0
