"""TF-IDF and logistic regression baseline for the rotten/fresh review task.

It gives the accuracy that a plain bag-of-n-grams model reaches on the same movie-disjoint
splits, as a floor for the transformer models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from cipherprompt.data import Example, Splits

logger = logging.getLogger(__name__)

# Inverse L2 regularization strengths tried on the validation split.
C_GRID = (0.25, 1.0, 4.0, 16.0, 64.0)
_MAX_ITERATIONS = 2000


def _texts_and_labels(examples: Sequence[Example]) -> tuple[list[str], np.ndarray]:
    texts = [example.text for example in examples]
    labels = np.array([example.label for example in examples], dtype=np.int64)
    return texts, labels


def run_tfidf_baseline(splits: Splits) -> dict:
    """Fit TF-IDF (word 1-2 grams, sublinear tf) and logistic regression, and score them.

    The vectorizer is fitted on the train split only. C is the value of ``C_GRID`` with the
    highest validation accuracy, and the smallest such value on ties. The test split is scored
    once, with that C. The lbfgs solver makes the result deterministic for fixed splits.
    Returns C, validation_accuracy, test_accuracy, train_size, validation_size and test_size.
    """
    for name in ("train", "validation", "test"):
        if not getattr(splits, name):
            raise ValueError(f"the {name} split is empty, but the baseline needs all three splits")

    train_texts, train_labels = _texts_and_labels(splits.train)
    validation_texts, validation_labels = _texts_and_labels(splits.validation)
    test_texts, test_labels = _texts_and_labels(splits.test)

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train_features = vectorizer.fit_transform(train_texts)
    validation_features = vectorizer.transform(validation_texts)
    test_features = vectorizer.transform(test_texts)

    best_c = None
    best_accuracy = -1.0
    best_model = None
    for c in C_GRID:
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=_MAX_ITERATIONS)
        model.fit(train_features, train_labels)
        accuracy = float(model.score(validation_features, validation_labels))
        logger.info("C=%g: validation accuracy %.4f", c, accuracy)
        if accuracy > best_accuracy:
            best_c, best_accuracy, best_model = c, accuracy, model

    test_accuracy = float(best_model.score(test_features, test_labels))
    logger.info(
        "chose C=%g: validation accuracy %.4f, test accuracy %.4f",
        best_c,
        best_accuracy,
        test_accuracy,
    )
    return {
        "C": best_c,
        "validation_accuracy": best_accuracy,
        "test_accuracy": test_accuracy,
        "train_size": len(splits.train),
        "validation_size": len(splits.validation),
        "test_size": len(splits.test),
    }
