"""The main job on built-in defaults: teacher, server process, private queries, comparison.

``cipherprompt demo`` prepares the fine-tuned teacher on first run (cached under the working
folder), starts ``cipherprompt serve`` as a separate process on 127.0.0.1, classifies a few real
test sentences as the client, and prints for each the private prediction next to the plaintext
prediction of the same model, their largest probability difference, and the query's cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import numpy as np

from cipherprompt.checkpoint import load_checkpoint
from cipherprompt.data import LABEL_NAMES, load_splits
from cipherprompt.files import write_json
from cipherprompt.models.bert import classify, pooling_weights
from cipherprompt.secure.client import PrivateClassifier, softmax
from cipherprompt.secure.cost import format_bytes, format_cost_table, write_cost
from cipherprompt.secure.launch import ServerProcess
from cipherprompt.tokenizer import WordPieceTokenizer
from cipherprompt.train.teacher import TeacherConfig, train_teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    work_dir: Path = Path("cipherprompt-work")
    sentences: int = 4
    port: int = 0
    epochs: int = 2
    # Seconds to wait for the server process to compile its program and listen.
    server_start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.sentences <= 50:
            raise ValueError(f"sentences must be in 1..50, got {self.sentences}")


def ensure_teacher(config: DemoConfig) -> Path:
    """Return the cached teacher checkpoint, fine-tuning it first if it does not exist."""
    path = config.work_dir / "teacher" / "teacher.npz"
    if path.exists():
        log.info("using the cached teacher %s", path)
        return path
    log.info("no teacher at %s: fine-tuning one now (about 15-30 minutes on 2 CPU cores)", path)
    train_teacher(config.work_dir / "teacher", TeacherConfig(epochs=config.epochs))
    return path


def pick_sentences(count: int, max_len: int, seed: int = 0) -> list:
    """Test-split examples that fit in ``max_len`` tokens, alternating labels, fixed order."""
    tokenizer = WordPieceTokenizer()
    test = list(load_splits(seed=seed).test)
    order = np.random.default_rng(seed).permutation(len(test))
    by_label: dict[int, list] = {0: [], 1: []}
    for index in order:
        example = test[index]
        if tokenizer.encode(example.text, 10_000).length <= max_len:
            by_label[example.label].append(example)
    picked = []
    for position in range(count):
        pool = by_label[position % 2] or by_label[1 - position % 2]
        picked.append(pool.pop(0))
    return picked


def run_demo(config: DemoConfig) -> int:
    """Run the whole chain; return 0 when every private prediction equals the plaintext one."""
    config.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = ensure_teacher(config)
    checkpoint = load_checkpoint(checkpoint_path)
    examples = pick_sentences(config.sentences, checkpoint.max_len)
    plaintext = jax.jit(partial(classify, config=checkpoint.config, plan=checkpoint.plan))

    rows = []
    server = ServerProcess(checkpoint_path, config.work_dir, config.port,
                           start_timeout_s=config.server_start_timeout_s)
    with server, PrivateClassifier(server.address, work_dir=config.work_dir / "client") as client:
        for number, example in enumerate(examples, start=1):
            log.info("query %d/%d: private run of %d stages", number, len(examples),
                     len(client.model.stages))
            private = client.classify(example.text)
            rows.append(compare_with_plaintext(example, private, client, checkpoint, plaintext))
            write_cost(config.work_dir / f"demo-query-{number}.json", private.cost)
            _print_row(number, rows[-1], private.cost)
    print()
    print(f"cost of the last query (client's view, plan {checkpoint.plan.name}, "
          f"{checkpoint.max_len} tokens):")
    print(format_cost_table(private.cost))
    write_json(config.work_dir / "demo-report.json", {
        "command": "cipherprompt demo", "checkpoint": str(checkpoint_path),
        "plan": checkpoint.plan.name, "max_len": checkpoint.max_len,
        "engine": client.engine.to_dict(), "queries": rows,
    })
    agreed = sum(row["private_label"] == row["plaintext_label"] for row in rows)
    print(f"\n{agreed}/{len(rows)} private predictions equal the plaintext prediction; "
          f"report: {config.work_dir / 'demo-report.json'}")
    return 0 if agreed == len(rows) else 1


def compare_with_plaintext(example, private, client, checkpoint, plaintext) -> dict:
    """Build one report row: the private prediction next to the plaintext run of the same model."""
    encoded = client.tokenizer.encode(example.text, client.max_len)
    mask = encoded.mask[None, :]
    logits = np.asarray(plaintext(checkpoint.params, tokens=encoded.ids[None, :], mask=mask,
                                  pool_weights=pooling_weights(mask)))[0]
    plain_probabilities = softmax(logits.astype(np.float64))
    return {
        "text": example.text,
        "true_label": LABEL_NAMES[example.label],
        "private_label": private.label_name,
        "plaintext_label": LABEL_NAMES[int(np.argmax(logits))],
        "private_probabilities": private.probabilities.tolist(),
        "plaintext_probabilities": plain_probabilities.tolist(),
        "max_probability_difference": float(
            np.abs(private.probabilities - plain_probabilities).max()),
        "logit_error": float(np.abs(private.logits - logits).max()),
        "cost": private.cost.to_dict(),
    }


def _print_row(number: int, row: dict, cost) -> None:
    text = row["text"] if len(row["text"]) <= 70 else row["text"][:67] + "..."
    print(f"\n[{number}] {text}")
    print(f"    private: {row['private_label']:<7} plaintext: {row['plaintext_label']:<7} "
          f"true: {row['true_label']:<7} max |dp| = {row['max_probability_difference']:.2e}")
    print(f"    cost: {cost.seconds:.1f} s, sent {format_bytes(cost.bytes_sent)}, received "
          f"{format_bytes(cost.bytes_received)}, {cost.messages} messages")
