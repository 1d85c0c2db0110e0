"""Tokenizers: byte and BPE round trips, ids, EOS handling, errors."""

import json

import numpy as np
import pytest

from dimba_jax.data.tokenizers import EOS_TOKEN, BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "Line one\nLine two\r\n\ttabbed",
    "Héllo wörld — “quotes”, naïve café, ½ €5",
    "日本語のテキスト and emoji 🙂🚀",
    "  leading and trailing spaces  ",
    "It was the best of times, it was the worst of times.",
]


def test_byte_ids_are_utf8_bytes_and_round_trip():
    tok = get_tokenizer("byte")
    assert isinstance(tok, Tokenizer)
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("byte", 257, 256)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # independent reference: Python's own UTF-8
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode_batch([text])[0], np.asarray(ids, np.int32))


def test_byte_decode_drops_eos_and_out_of_range_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("ab") + [256] + tok.encode("é") + [300, -1]
    assert tok.decode(ids) == "abé"  # nothing is cut at EOS; EOS and junk ids are dropped
    assert tok.decode(np.asarray(ids)) == "abé"
    assert tok.decode([0xC3]) == "\ufffd"  # a truncated 2-byte sequence


@pytest.mark.parametrize("name,vocab_size", [("bpe", 8192), ("bpe_2048", 2048)])
def test_bpe_round_trip_vocab_and_eos(name, vocab_size):
    tok = get_tokenizer(name)
    assert tok.name == name
    assert tok.vocab_size == vocab_size
    assert 0 <= tok.eos_id < tok.vocab_size
    for text in TEXTS + [f"text with {EOS_TOKEN} inside"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eos_id not in ids  # the special-token text is plain text, never EOS
        assert tok.decode(ids) == text
    batch = tok.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, batch):
        assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text)
    a, b = tok.encode("The first part."), tok.encode(" The second part.")
    assert tok.decode(a + [tok.eos_id] + b) == "The first part. The second part."


@pytest.mark.parametrize("name,chars_per_token", [("bpe", 3.0), ("bpe_2048", 2.5)])
def test_bpe_compresses_english(name, chars_per_token):
    tok = get_tokenizer(name)
    text = ("It was a bright cold day in April, and the clocks were striking thirteen. The old man "
            "looked at the house and said that he would not go there again, for he had seen enough.")
    ids = tok.encode(text)
    assert len(text) / len(ids) > chars_per_token, len(text) / len(ids)  # bytes would give 1.0


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'.*byte.*bpe"):
        get_tokenizer("wordpiece")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        get_tokenizer(f"bpe:{tmp_path / 'nothere.json'}")


def test_bpe_from_custom_file_needs_eos(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    def train(special):
        t = HF(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t.train_from_iterator(["the cat sat on the mat"] * 20, trainer=trainer)
        return t

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    train([EOS_TOKEN]).save(str(good))
    train([]).save(str(bad))
    tok = get_tokenizer(f"bpe:{good}")
    assert isinstance(tok, BPETokenizer) and tok.decode(tok.encode("the mat é")) == "the mat é"
    assert json.loads(good.read_text())["added_tokens"][0]["content"] == EOS_TOKEN
    with pytest.raises(ValueError, match="no '<\\|endoftext\\|>' special token"):
        get_tokenizer(f"bpe:{bad}")
