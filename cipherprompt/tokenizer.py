"""The uncased WordPiece tokenizer of all-MiniLM-L6-v2, with explicit padding and truncation.

The packaged ``tokenizer.json`` truncates and pads every input to 128 tokens. Both settings are
turned off here, so an over-long text raises TextTooLongError unless the caller asks for
truncation, and every output has exactly the ``max_len`` that the caller passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from cipherprompt.assets import asset_path

_MIN_MAX_LEN = 3  # [CLS], one text token and [SEP]


class EmptyTextError(ValueError):
    """The text is empty, contains only whitespace or normalizes to no tokens."""


class TextTooLongError(ValueError):
    """The text needs more tokens than ``max_len`` allows and truncation is off."""


@dataclass(frozen=True)
class EncodedText:
    """Token ids and attention mask of one text, padded to ``max_len``.

    ``ids`` is int32 and ``mask`` float32, both of shape ``[max_len]``. The mask is 1 for real
    tokens, [CLS] and [SEP] included, and 0 for padding. ``length`` is the number of real
    tokens, after truncation where it applied.
    """

    ids: np.ndarray
    mask: np.ndarray
    length: int


def _validate_max_len(max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len < _MIN_MAX_LEN:
        raise ValueError(
            f"max_len must be at least {_MIN_MAX_LEN} to fit [CLS], one token and [SEP], "
            f"got {max_len}"
        )


def _validate_text(text: object, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise EmptyTextError(f"{name} is empty or contains only whitespace: {text!r}")


class WordPieceTokenizer:
    """Encoder from text to fixed-length id and mask arrays for the MiniLM BERT encoder."""

    def __init__(self) -> None:
        self._tokenizer = Tokenizer.from_file(str(asset_path("minilm_tokenizer")))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._pad_id = self._require_token_id("[PAD]")
        self._cls_id = self._require_token_id("[CLS]")
        self._sep_id = self._require_token_id("[SEP]")

    def _require_token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token} is missing from the vocabulary of tokenizer.json")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def cls_id(self) -> int:
        return self._cls_id

    @property
    def sep_id(self) -> int:
        return self._sep_id

    def encode(self, text: str, max_len: int, truncate: bool = False) -> EncodedText:
        """Encode ``text`` as [CLS] tokens [SEP], padded with ``pad_id`` to ``max_len``.

        Raises TypeError for a non-str text, EmptyTextError for a text without tokens and
        TextTooLongError when the encoding exceeds ``max_len`` and ``truncate`` is False.
        Truncation keeps the first ``max_len - 1`` tokens, [CLS] included, and appends [SEP].
        """
        _validate_max_len(max_len)
        _validate_text(text, "text")
        token_ids = self._tokenizer.encode(text).ids
        return self._pack(token_ids, max_len, truncate, "text")

    def encode_batch(
        self, texts: Sequence[str], max_len: int, truncate: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode ``texts`` like ``encode`` and return the ids and the mask, both ``[n, max_len]``.

        The ids are int32 and the mask is float32. Truncation is on by default here, unlike in
        ``encode``, because a batch usually comes from a data set whose longest texts are cut on
        purpose. Errors name the index of the text.
        """
        _validate_max_len(max_len)
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, got a single str")
        texts = list(texts)
        for index, text in enumerate(texts):
            _validate_text(text, f"text at index {index}")

        ids = np.empty((len(texts), max_len), dtype=np.int32)
        mask = np.empty((len(texts), max_len), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(texts)
        for index, encoding in enumerate(encodings):
            encoded = self._pack(encoding.ids, max_len, truncate, f"text at index {index}")
            ids[index] = encoded.ids
            mask[index] = encoded.mask
        return ids, mask

    def _pack(
        self, token_ids: list[int], max_len: int, truncate: bool, name: str
    ) -> EncodedText:
        """Truncate or reject ``token_ids`` (with [CLS] and [SEP]) and pad them to ``max_len``."""
        # Text made only of characters that normalization removes, such as control
        # characters, passes the whitespace check but encodes to [CLS] [SEP] alone.
        if len(token_ids) <= 2:
            raise EmptyTextError(f"{name} contains no tokens after normalization")

        if len(token_ids) > max_len:
            if not truncate:
                raise TextTooLongError(
                    f"{name} encodes to {len(token_ids)} tokens including [CLS] and [SEP], "
                    f"more than max_len={max_len}. Shorten the text, raise max_len or pass "
                    f"truncate=True."
                )
            token_ids = token_ids[: max_len - 1] + [self._sep_id]

        length = len(token_ids)
        ids = np.full(max_len, self._pad_id, dtype=np.int32)
        ids[:length] = token_ids
        mask = np.zeros(max_len, dtype=np.float32)
        mask[:length] = 1.0
        return EncodedText(ids=ids, mask=mask, length=length)
