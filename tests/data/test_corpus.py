"""Bundled corpus, custom text sources and the train/validation split."""

import gzip
import re

import pytest

from nemotron_jax.data import corpus


def test_bundled_corpus_size_and_format():
    path = corpus.bundled_corpus_path()
    size = path.stat().st_size
    assert 1_000_000 <= size <= 5_000_000, f"{path} is {size} bytes compressed"
    with gzip.open(path, "rb") as f:  # really gzip, and UTF-8 JSON lines
        assert f.read(2) == b'{"'
    docs = corpus.load_bundled()
    assert len(docs) > 300  # scenes, so packing sees real document boundaries
    assert len({d.name for d in docs}) == len(docs)
    assert {d.name.split("/")[0] for d in docs} >= {"hamlet", "macbeth", "sonnets", "tempest"}
    assert all(d.text.strip() for d in docs)


def test_bundled_corpus_has_no_gutenberg_boilerplate():
    text = "\n".join(d.text for d in corpus.load_bundled()).lower()
    for phrase in ("project gutenberg", "gutenberg-tm", "*** start of", "*** end of", "small print"):
        assert phrase not in text, phrase
    assert not re.search(r"\be-?text\b", text)
    assert "to be, or not to be" in text


def test_strip_gutenberg_boilerplate():
    etext = (
        "The Project Gutenberg EBook of Poems\r\nlicence words\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK POEMS ***\r\n\r\nO rose,\r\nthou art sick.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK POEMS ***\r\nmore licence words\r\n"
    )
    assert corpus.strip_gutenberg_boilerplate(etext) == "O rose,\nthou art sick.\n"


def test_split_work_at_scene_headings():
    body = "x" * 2000
    text = f"TITLE\n\nACT I.\n\nSCENE I. A room.\n{body}\n\nSCENE II. A hall.\n{body}\nACT II.\n\nScene I.\n{body}\n"
    docs = corpus.split_work(text, "play")
    assert [d.name for d in docs] == ["play/000", "play/001", "play/002"]
    assert docs[1].text.startswith("SCENE II.") and docs[2].text.startswith("ACT II.")
    assert "".join(d.text for d in docs).replace("\n", "") == text.replace("\n", "")


def test_split_disjoint_complete_and_deterministic():
    docs = corpus.load_bundled()
    train = corpus.split_documents(docs, "train")
    val = corpus.split_documents(docs, "validation")
    tnames, vnames = {d.name for d in train}, {d.name for d in val}
    assert not tnames & vnames
    assert tnames | vnames == {d.name for d in docs}
    assert len(vnames) == round(0.05 * len(docs))
    assert [d.name for d in corpus.split_documents(docs, "validation")] == [d.name for d in val]
    other = {d.name for d in corpus.split_documents(docs, "validation", seed=1)}
    assert other != vnames  # the split seed matters
    assert not {d.text for d in train} & {d.text for d in val}
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.split_documents(docs, "test")


def test_custom_file_and_directory(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("first doc\nline two\n\n\n\nsecond doc\n\n\nthird doc\n\nstill third\n")
    docs = corpus.load_documents(f)
    assert [d.text for d in docs] == ["first doc\nline two", "second doc", "third doc\n\nstill third"]
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "sub" / "a.txt").write_text("ay\n\n\nay again")
    (d / "ignored.md").write_text("not text")
    docs = corpus.load_documents(d)
    assert [(x.name, x.text) for x in docs] == [("b.txt/00000", "bee"), ("sub/a.txt/00000", "ay"),
                                                ("sub/a.txt/00001", "ay again")]


def test_missing_or_empty_source_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        corpus.load_documents(missing)
    with pytest.raises(FileNotFoundError, match="no \\*.txt files"):
        corpus.load_documents(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        corpus.load_split(one, "validation")
