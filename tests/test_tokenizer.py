from __future__ import annotations

import numpy as np
import pytest
from transformers import BertTokenizerFast

from cipherprompt.assets import asset_path
from cipherprompt.tokenizer import (
    EmptyTextError,
    EncodedText,
    TextTooLongError,
    WordPieceTokenizer,
)

SENTENCES = [
    "A gripping, well-acted thriller.",
    "Café déjà vu: the naïve Zoë's crème brûlée!!",
    "It's not bad... it's TERRIBLE?! (2/10, $5 wasted)",
    "Schwarzenegger's über-macho performance -- 100% camp.",
    "  leading and trailing   whitespace\tand\ttabs\n",
    "東京 and emoji 🎬 with unknown characters",
]


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer()


@pytest.fixture(scope="module")
def reference():
    return BertTokenizerFast(tokenizer_file=str(asset_path("minilm_tokenizer")))


def test_special_token_ids(tokenizer):
    assert tokenizer.vocab_size == 30522
    assert tokenizer.pad_id == 0
    assert tokenizer.cls_id == 101
    assert tokenizer.sep_id == 102


@pytest.mark.parametrize("sentence", SENTENCES)
def test_encode_matches_transformers(tokenizer, reference, sentence):
    expected = reference(sentence, add_special_tokens=True)["input_ids"]

    encoded = tokenizer.encode(sentence, max_len=64)

    assert encoded.length == len(expected)
    assert encoded.ids[: encoded.length].tolist() == expected


def test_encode_lowercases_and_strips_accents(tokenizer):
    plain = tokenizer.encode("cafe deja vu", max_len=16)
    accented = tokenizer.encode("CAFÉ DÉJÀ VU", max_len=16)

    assert plain.ids.tolist() == accented.ids.tolist()


def test_encode_pads_and_masks(tokenizer):
    encoded = tokenizer.encode("a fine film", max_len=10)

    assert isinstance(encoded, EncodedText)
    assert encoded.ids.dtype == np.int32
    assert encoded.mask.dtype == np.float32
    assert encoded.ids.shape == (10,)
    assert encoded.mask.shape == (10,)
    assert encoded.length == 5
    assert encoded.ids[0] == tokenizer.cls_id
    assert encoded.ids[4] == tokenizer.sep_id
    assert encoded.ids[5:].tolist() == [tokenizer.pad_id] * 5
    assert encoded.mask.tolist() == [1.0] * 5 + [0.0] * 5


def test_encode_exact_fit_has_no_padding(tokenizer):
    encoded = tokenizer.encode("a fine film", max_len=5)

    assert encoded.length == 5
    assert encoded.mask.tolist() == [1.0] * 5
    assert encoded.ids[-1] == tokenizer.sep_id


@pytest.mark.parametrize("text", ["", " ", "   \t\n ", "\u3000"])
def test_encode_rejects_empty_text(tokenizer, text):
    with pytest.raises(EmptyTextError):
        tokenizer.encode(text, max_len=8)


def test_encode_rejects_text_without_tokens(tokenizer):
    with pytest.raises(EmptyTextError, match="no tokens"):
        tokenizer.encode("\x00\x01", max_len=8)


@pytest.mark.parametrize("text", [None, 42, b"bytes", ["a", "list"]])
def test_encode_rejects_non_str(tokenizer, text):
    with pytest.raises(TypeError):
        tokenizer.encode(text, max_len=8)


@pytest.mark.parametrize("max_len", [0, 2, -5])
def test_encode_rejects_small_max_len(tokenizer, max_len):
    with pytest.raises(ValueError, match="max_len"):
        tokenizer.encode("a film", max_len=max_len)


def test_encode_rejects_too_long(tokenizer):
    text = "one two three four five six seven eight"

    with pytest.raises(TextTooLongError) as error:
        tokenizer.encode(text, max_len=6)

    message = str(error.value)
    assert "10 tokens" in message
    assert "max_len=6" in message
    assert "truncate=True" in message
    assert "Shorten the text" in message


def test_encode_truncates_when_asked(tokenizer):
    text = "one two three four five six seven eight"
    full = tokenizer.encode(text, max_len=16)

    truncated = tokenizer.encode(text, max_len=6, truncate=True)

    assert truncated.length == 6
    assert truncated.ids[:5].tolist() == full.ids[:5].tolist()
    assert truncated.ids[-1] == tokenizer.sep_id
    assert truncated.mask.tolist() == [1.0] * 6


def test_encode_batch_matches_encode(tokenizer):
    texts = ["a fine film", "one two three four five six seven eight", SENTENCES[1]]

    ids, mask = tokenizer.encode_batch(texts, max_len=8)

    assert ids.dtype == np.int32
    assert mask.dtype == np.float32
    assert ids.shape == (3, 8)
    assert mask.shape == (3, 8)
    for row, text in enumerate(texts):
        encoded = tokenizer.encode(text, max_len=8, truncate=True)
        assert ids[row].tolist() == encoded.ids.tolist(), text
        assert mask[row].tolist() == encoded.mask.tolist(), text
    assert ids[1, -1] == tokenizer.sep_id


def test_encode_batch_error_names_index(tokenizer):
    texts = ["a fine film", "one two three four five six seven eight"]

    with pytest.raises(TextTooLongError, match="index 1"):
        tokenizer.encode_batch(texts, max_len=8, truncate=False)


def test_encode_batch_rejects_empty_text(tokenizer):
    with pytest.raises(EmptyTextError, match="index 2"):
        tokenizer.encode_batch(["good", "bad", "  "], max_len=8)


def test_encode_batch_rejects_single_str(tokenizer):
    with pytest.raises(TypeError):
        tokenizer.encode_batch("a fine film", max_len=8)


def test_encode_batch_empty_list(tokenizer):
    ids, mask = tokenizer.encode_batch([], max_len=8)

    assert ids.shape == (0, 8)
    assert mask.shape == (0, 8)
