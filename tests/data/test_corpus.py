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


# ----------------------------------------------------------------------------------------------- bad data sources
def test_binary_and_non_utf8_files_in_a_directory_are_skipped_with_a_warning_naming_each(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("good text\n\n\nmore good text")
    (d / "blob.txt").write_bytes(b"GIF89a\x00\x01\x02binary")
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (d / "bom.txt").write_bytes("\ufeffwith a BOM".encode("utf-8"))
    with pytest.warns(corpus.CorpusWarning) as rec:
        docs = corpus.load_documents(d)
    msgs = sorted(str(w.message) for w in rec)
    assert len(msgs) == 2
    assert "blob.txt" in msgs[0] and "looks binary (NUL byte at offset 6)" in msgs[0]
    assert "latin1.txt" in msgs[1] and "not valid UTF-8 (byte 0xe9 at offset 3)" in msgs[1]
    assert [x.text for x in docs] == ["good text", "more good text", "with a BOM"]  # the BOM is not text


@pytest.mark.parametrize("data, words", [(b"\x00\x01\x02\x03", "looks binary"), (b"ok \xff\xfe", "not valid UTF-8")])
def test_a_binary_or_non_utf8_source_file_is_refused(tmp_path, data, words):
    f = tmp_path / "corpus.bin"
    f.write_bytes(data)
    with pytest.raises(corpus.CorpusError, match=words) as e:
        corpus.load_documents(f)
    assert str(f) in str(e.value)


def test_empty_corpus_errors_name_the_source(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(corpus.CorpusError, match=rf"data source '{re.escape(str(empty))}' holds no text"):
        corpus.load_documents(empty)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n \n")
    (blank / "b.txt").write_text("")
    with pytest.raises(corpus.CorpusError, match=r"holds no text \(its 2 file\(s\) are empty or blank\)"):
        corpus.load_documents(blank)
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "x.txt").write_bytes(b"\x00")
    with pytest.warns(corpus.CorpusWarning), pytest.raises(
            corpus.CorpusError, match=r"holds no text; skipped \(binary or not UTF-8\): x.txt"):
        corpus.load_documents(allbad)
    with pytest.raises(corpus.CorpusError, match="empty string"):
        corpus.load_documents("")
    with pytest.raises(corpus.CorpusError, match=r"the corpus is empty \(0 documents\)"):
        corpus.split_documents([], "train")
    assert issubclass(corpus.CorpusError, ValueError)


def test_split_error_names_the_source(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(corpus.CorpusError, match=rf"data source '{re.escape(str(one))}': split 'validation' is empty"):
        corpus.load_split(one, "validation")
