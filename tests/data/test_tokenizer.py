"""Byte tokenizer and HF tokenizer.json round trips (the tokenizer.json is trained here, no downloads)."""

import numpy as np
import pytest

from nemotron_jax.data import ByteTokenizer, HFTokenizer, make_dataset, make_tokenizer

TEXT = "To be, or not to be: that is the question.\nCafé naïve — ✓ 数据"


def test_byte_tokenizer_round_trip():
    tok = make_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 256
    assert ids.tolist() == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    assert [x.tolist() for x in tok.encode_batch(["ab", ""])] == [[97, 98], []]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    import tokenizers  # a declared dependency: its absence must fail, not skip

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + [TEXT] * 5, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip(tokenizer_json):
    tok = make_tokenizer(str(tokenizer_json))
    assert isinstance(tok, HFTokenizer)
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert tok.decode(ids) == TEXT
    assert [tok.decode(x) for x in tok.encode_batch(["the lazy dog", "fox"])] == ["the lazy dog", "fox"]


def test_hf_tokenizer_in_pipeline(tokenizer_json, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(40)))
    tok = HFTokenizer(tokenizer_json)
    b = next(iter(make_dataset(src, "train", tok, seq_len=32, batch_size=2, shard_index=0, shard_count=1)))
    assert b["tokens"].shape == (2, 32) and b["tokens"].max() < tok.vocab_size
    row = b["tokens"][0][b["segment_ids"][0] == 1]
    assert "the quick brown fox" in tok.decode(row)


def test_missing_tokenizer_file_error_names_it(tmp_path):
    missing = tmp_path / "absent" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_tokenizer(missing)
