from __future__ import annotations

import pytest

from cipherprompt.data import Splits, load_splits
from cipherprompt.train.baseline import C_GRID, run_tfidf_baseline


@pytest.fixture(scope="module")
def result() -> dict:
    return run_tfidf_baseline(load_splits(0))


def test_baseline_beats_threshold(result):
    assert result["test_accuracy"] > 0.70
    assert result["validation_accuracy"] > 0.70


def test_baseline_reports_sizes(result):
    splits = load_splits(0)

    assert result["C"] in C_GRID
    assert result["train_size"] == len(splits.train)
    assert result["validation_size"] == len(splits.validation)
    assert result["test_size"] == len(splits.test)


def test_baseline_deterministic(result):
    assert run_tfidf_baseline(load_splits(0)) == result


def test_baseline_rejects_empty_split():
    splits = load_splits(0)
    empty_validation = Splits(train=splits.train, validation=(), test=splits.test)

    with pytest.raises(ValueError, match="validation split is empty"):
        run_tfidf_baseline(empty_validation)
