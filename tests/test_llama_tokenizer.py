"""SmolLM2's byte-level BPE tokenizer rebuilt from GGUF metadata, against transformers."""

from __future__ import annotations

import pytest

from cipherprompt.assets import asset_path
from cipherprompt.llama_tokenizer import LlamaTokenizer

TEXTS = [
    "The capital of France is",
    "In 1889, the Eiffel Tower opened; it is 330 metres (1,083 ft) tall.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Café déjà vu: the naïve Zoë's crème brûlée!!",
    "  leading and trailing   whitespace\tand\ttabs\n\n",
    "東京 and emoji 🎬, superscripts x² and y³",
    "def f(x):\n    return x ** 2  # square\n",
    "don't won't I'll we've they're SHOUTING",
]


@pytest.fixture(scope="module")
def tokenizer() -> LlamaTokenizer:
    return LlamaTokenizer(asset_path("smollm2_gguf"))


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = asset_path("smollm2_gguf")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_special_token_ids(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_id == 1
    assert tokenizer.eos_id == 2
    assert tokenizer.id_to_token(1) == "<|im_start|>"
    assert tokenizer.id_to_token(2) == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_control_tokens_matched_whole(tokenizer):
    ids = tokenizer.encode("<|im_start|>system")

    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system"


def test_digits_split_one_by_one(tokenizer):
    ids = tokenizer.encode("2024")

    assert [tokenizer.id_to_token(token_id) for token_id in ids] == ["2", "0", "2", "4"]


def test_numeric_character_split_from_space(tokenizer, reference):
    # llama.cpp's "smollm" pre-tokenizer isolates every numeric character (\p{N}), so " ½" is
    # split into a space and "½" (bytes C2 BD, shown as "Â½"). transformers 5.25 builds this
    # tokenizer without that step, and its BPE then merges the space with the first byte.
    ids = tokenizer.encode("a ½")
    expected_ids = reference("a ½")["input_ids"]

    assert [tokenizer.id_to_token(token_id) for token_id in ids] == ["a", "Ġ", "Â½"]
    assert reference.convert_ids_to_tokens(expected_ids) == ["a", "ĠÂ", "½"]


def test_no_bos_added(tokenizer):
    # SmolLM2's file sets tokenizer.ggml.add_bos_token to false.
    assert tokenizer.encode("Hello")[0] != tokenizer.bos_id


def test_non_string_rejected(tokenizer):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenizer.encode(b"bytes")
