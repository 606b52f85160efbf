"""Choosing the next token from a decoder's logits: greedy, temperature and top-k, seeded.

Private generation samples on the client, because only the client reconstructs the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of the next-token choice; the defaults choose greedily."""

    # 0 picks the most likely token (greedy); above 0 samples from softmax(logits / temperature).
    temperature: float = 0.0
    # Sample only among the k most likely tokens; None samples among all. Needs temperature > 0.
    top_k: int | None = None
    # Seed of the random generator, so that a sampled continuation can be repeated.
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number of 0 or more, got "
                             f"{self.temperature!r}; 0 chooses greedily")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(f"top_k must be a whole number of at least 1, got {self.top_k!r}")
            if self.temperature == 0:
                raise ValueError("top_k needs a temperature above 0: temperature 0 always "
                                 "chooses the most likely token; pass --temperature too")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ValueError(f"seed must be a whole number of 0 or more, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Chooses token ids from logits rows, one call per step."""

    def __init__(self, config: SamplingConfig, vocab_size: int):
        if config.top_k is not None and config.top_k > vocab_size:
            raise ValueError(f"top_k {config.top_k} exceeds the vocabulary of {vocab_size} tokens")
        self.config = config
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, np.float64).reshape(-1)
        if logits.shape[0] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[0]} entries, expected {self.vocab_size}")
        if self.config.greedy:
            return int(np.argmax(logits))
        scaled = logits / self.config.temperature
        candidates = np.arange(self.vocab_size)
        if self.config.top_k is not None:
            candidates = np.argpartition(-scaled, self.config.top_k - 1)[:self.config.top_k]
        weights = np.exp(scaled[candidates] - scaled[candidates].max())
        return int(self._rng.choice(candidates, p=weights / weights.sum()))
