"""Tokenized data sets and length-bucketed batches for training and plaintext evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cipherprompt.data import Example
from cipherprompt.tokenizer import WordPieceTokenizer

# Batches are padded to the next multiple of this, so jit compiles only a few shapes.
LENGTH_STEP = 16


@dataclass(frozen=True)
class EncodedSet:
    ids: np.ndarray  # int32 [n, max_len]
    mask: np.ndarray  # float32 [n, max_len]
    labels: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.labels)


def encode_examples(
    examples: Sequence[Example], tokenizer: WordPieceTokenizer, max_len: int
) -> EncodedSet:
    """Tokenize ``examples``, truncating texts longer than ``max_len`` tokens."""
    ids, mask = tokenizer.encode_batch([example.text for example in examples], max_len, True)
    labels = np.array([example.label for example in examples], np.int32)
    return EncodedSet(ids, mask, labels)


def iterate_batches(
    data: EncodedSet, batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (ids, mask, labels) batches trimmed to their longest row rounded up to 16 tokens.

    With ``rng`` the order is shuffled within length-sorted chunks, then the batches are
    shuffled; without it the order is the data set's own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.arange(len(data))
    if rng is not None:
        order = rng.permutation(order)
        lengths = data.mask[order].sum(axis=1)
        chunk = batch_size * 50
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            order[start:start + chunk] = part[np.argsort(lengths[start:start + chunk],
                                                          kind="stable")]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if rng is not None:
        batches = [batches[index] for index in rng.permutation(len(batches))]
    for rows in batches:
        longest = int(data.mask[rows].sum(axis=1).max())
        width = min(data.ids.shape[1], -(-longest // LENGTH_STEP) * LENGTH_STEP)
        yield data.ids[rows, :width], data.mask[rows, :width], data.labels[rows]
