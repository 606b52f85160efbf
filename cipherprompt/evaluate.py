"""Accuracy of a classifier checkpoint in plaintext, in SPU's REF2K protocol and in CHEETAH.

``cipherprompt evaluate`` measures one checkpoint three ways on the test split, at the serving
length that private queries use (longer texts are truncated, as ``classify --truncate`` does):

1. float: plaintext float32 JAX, on every test sentence. For reference it also reports float
   accuracy at the training length (64 tokens by default).
2. REF2K: SPU's plaintext reference protocol, on every test sentence. It runs the same staged
   programs as a private query (``compile_classifier``), compiled for a batch of sentences, with
   the same ``EngineConfig`` apart from the protocol, inside this process with world size 1.
3. CHEETAH: a ``cipherprompt serve`` child process and a ``PrivateClassifier`` client on a
   sample of the test sentences. Each query takes minutes, so every finished query is appended
   to a JSONL file and a rerun in the same working directory skips it.

What the differences between the three measure:

- float to REF2K: the fixed-point arithmetic alone. That is the encoding of every value with
  ``fraction_bits`` fractional bits in the 64-bit ring (rounding, and wrap-around of a product
  above the ring's range), plus SPU's own approximations of exp, tanh, reciprocal and rsqrt.
  REF2K truncates products exactly and has no cryptography.
- REF2K to CHEETAH: the error that the two-party protocol adds to the same arithmetic. Its
  truncation of secret shares may be off in the last bit, products may be off in the last bit
  when ``mul_lsb_error`` is on (it is off by default), and any other CHEETAH kernel that
  differs from REF2K's adds its own.

jax, SPU and the models are imported inside the functions that use them, so that building the
command-line parser stays fast and the CLI can set ``JAX_PLATFORMS`` before jax is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from cipherprompt.data import LABEL_NAMES, Example, load_splits
from cipherprompt.files import write_json, write_npz, write_text_atomically

if TYPE_CHECKING:
    from cipherprompt.checkpoint import Checkpoint
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.tokenizer import WordPieceTokenizer
    from cipherprompt.train.batches import EncodedSet

log = logging.getLogger(__name__)

REPORT_NAME = "evaluate-report.json"
LOCK_NAME = "evaluate.lock"
REF2K_RESULTS = "ref2k.jsonl"
CHEETAH_RESULTS = "cheetah.jsonl"
LOGITS_NAME = "logits.npz"
# Float accuracy is also reported at this length when the checkpoint does not record its own.
DEFAULT_TRAIN_LEN = 64

ERROR_TERMS = {
    "float_vs_ref2k": (
        "fixed-point arithmetic: values encoded with fraction_bits fractional bits in the "
        "64-bit ring, plus SPU's approximations of exp, tanh, reciprocal and rsqrt; products "
        "are truncated exactly and there is no cryptography"
    ),
    "ref2k_vs_cheetah": (
        "the CHEETAH protocol's own error on the same arithmetic: truncation of secret shares "
        "that may be off in the last bit, the last-bit product error that mul_lsb_error "
        "allows when it is on, and any other protocol kernel that differs from REF2K's"
    ),
    "float_vs_cheetah": "both of the above together",
}


class WorkDirInUseError(RuntimeError):
    """Another evaluate run holds the lock of the working directory."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Inputs of one evaluate run; every output goes under ``work_dir``."""

    checkpoint: Path
    work_dir: Path
    # Test sentences to classify under CHEETAH; 0 skips the two-party run.
    sample: int = 100
    # Sentences per REF2K run. The one-hot input alone takes batch * max_len * 30,522 * 12 bytes
    # (float32 and its 64-bit ring encoding). For MiniLM at 32 tokens the process peaked at
    # 1.4 GB with batch 32 and 2.1 GB with batch 64, which was no faster per sentence.
    batch: int = 32
    # Evaluate only the first N test sentences (quick checks); None for the whole split.
    limit: int | None = None
    # Seed of the train/validation/test split by movie, and of the CHEETAH sample's order.
    seed: int = 0
    # Length in tokens of the second float evaluation; None takes the checkpoint's training
    # length, or 64 when the checkpoint does not record one.
    train_len: int | None = None
    # Sentences per CHEETAH query (the server's --batch). One query of 8 sentences shares the
    # products with the weights among them, the embedding table's above all.
    cheetah_batch: int = 1
    # Port of the CHEETAH server on 127.0.0.1; 0 picks a free one.
    port: int = 0
    # Seconds the server process may take to compile its program and listen.
    server_start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise ValueError(f"sample must be 0 or more, got {self.sample}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.cheetah_batch < 1:
            raise ValueError(f"cheetah_batch must be at least 1, got {self.cheetah_batch}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 or None, got {self.limit}")
        if self.train_len is not None and self.train_len < 3:
            raise ValueError(f"train_len must be at least 3 tokens, got {self.train_len}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")

    def command_line(self) -> str:
        """Build the ``cipherprompt evaluate`` command line that repeats this run."""
        words = ["cipherprompt", "evaluate", "--checkpoint", str(self.checkpoint),
                 "--work-dir", str(self.work_dir), "--sample", str(self.sample),
                 "--batch", str(self.batch), "--seed", str(self.seed)]
        if self.cheetah_batch != 1:
            words += ["--cheetah-batch", str(self.cheetah_batch)]
        if self.limit is not None:
            words += ["--limit", str(self.limit)]
        if self.train_len is not None:
            words += ["--train-len", str(self.train_len)]
        if self.port:
            words += ["--port", str(self.port)]
        return shlex.join(words)


# Working-directory lock.


class WorkDirLock:
    """Exclusive use of a working directory by one evaluate run: a lock file with its PID.

    The run takes an exclusive ``flock`` on the file and writes its PID into it, and empties
    the file when it ends. The kernel releases a flock when its process dies, so a run that
    was killed leaves a stale PID but no lock: the next run takes over with a warning. The
    file itself stays, because removing a locked file would let a waiting run lock the removed
    file while a third run creates a new one.
    """

    def __init__(self, path: Path, run_name: str = "evaluate"):
        self.path = Path(path)
        # The command that uses the directory, named in the error for a directory in use.
        self.run_name = run_name
        self._file = None

    def __enter__(self) -> WorkDirLock:
        lock_file = open(self.path, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise WorkDirInUseError(
                f"working directory {self.path.parent} is in use by the {self.run_name} run with "
                f"PID {owner} (lock file {self.path}); wait for it to finish or choose "
                "another --work-dir"
            ) from None
        lock_file.seek(0)
        previous = lock_file.read().strip()
        if previous:
            log.warning("taking over the stale lock %s of process %s, which ended without "
                        "releasing it", self.path, previous)
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._file = lock_file
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is None:
            return
        self._file.truncate(0)
        self._file.close()  # closing releases the flock
        self._file = None


# Per-sentence result files.


class ResultLog:
    """Per-sentence results as JSON lines, appended as they finish, so a rerun can resume.

    Every record stores the run's ``setup_sha256`` (weights, plan, length, engine) and the
    SHA-256 of its sentence, so results of another model or another test split are rejected
    instead of being mixed in. The texts themselves are not stored.
    """

    def __init__(self, path: Path, setup_sha256: str, texts: Sequence[str]):
        self.path = Path(path)
        self.setup_sha256 = setup_sha256
        self.texts = texts
        self.records: dict[int, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        complete = lines[:-1]  # text after the last newline is an interrupted write
        if lines[-1]:
            log.warning("%s: dropping an incomplete last line (an interrupted write)", self.path)
        for number, line in enumerate(complete, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{self.path} line {number} is not valid JSON ({error}); delete the file "
                    "to recompute its results"
                ) from error
            self._check(record, number)
            self.records[record["index"]] = record
        if lines[-1]:
            complete_text = "".join(line + "\n" for line in complete)
            write_text_atomically(self.path, complete_text)

    def _check(self, record: dict, number: int) -> None:
        if record.get("setup_sha256") != self.setup_sha256:
            raise ValueError(
                f"{self.path} line {number} contains results of another checkpoint or engine "
                f"configuration (setup_sha256 {record.get('setup_sha256')!r}, expected "
                f"{self.setup_sha256!r}); choose another --work-dir or delete the file"
            )
        index = record.get("index")
        if not isinstance(index, int) or not 0 <= index < len(self.texts):
            raise ValueError(
                f"{self.path} line {number} has sentence index {index!r}, outside "
                f"0..{len(self.texts) - 1}; choose another --work-dir or delete the file"
            )
        if record.get("text_sha256") != text_digest(self.texts[index]):
            raise ValueError(
                f"{self.path} line {number}: sentence {index} differs from the sentence of "
                "this run (another split seed or data set); choose another --work-dir or "
                "delete the file"
            )

    def append(self, records: Iterable[dict]) -> None:
        lines = []
        for record in records:
            record = {**record, "setup_sha256": self.setup_sha256,
                      "text_sha256": text_digest(self.texts[record["index"]])}
            self.records[record["index"]] = record
            lines.append(json.dumps(record) + "\n")
        with open(self.path, "a") as results:
            results.write("".join(lines))
            results.flush()
            os.fsync(results.fileno())


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def setup_digest(checkpoint: Checkpoint, engine: EngineConfig) -> str:
    """SHA-256 of what determines a sentence's logits: weights, plan, length and engine."""
    digest = hashlib.sha256()
    digest.update(checkpoint.weights_digest().encode())
    digest.update(checkpoint.plan.canonical_json().encode())
    digest.update(str(checkpoint.max_len).encode())
    digest.update(repr(sorted(engine.to_dict().items())).encode())
    return digest.hexdigest()


# REF2K: the fixed-point reference run.


def reference_runtime(engine: EngineConfig):
    """Return (runtime, io, link) of an SPU runtime with world size 1 on an in-memory link.

    The caller keeps the link referenced as long as it uses the runtime.
    """
    import spu
    import spu.libspu as libspu

    from cipherprompt.secure.engine import runtime_config

    config = runtime_config(engine, profile=False)
    description = libspu.link.Desc()
    description.add_party("reference", "memory")
    link = libspu.link.create_mem(description, 0)
    return spu.Runtime(link, config), spu.Io(1, config), link


class ReferenceRunner:
    """The staged classifier program under SPU's REF2K protocol, in this process.

    One SPU runtime with world size 1 on an in-memory link keeps the weights for all batches.
    REF2K computes in the clear, so one party gives the same results as two (measured equal
    with 2 parties, which took twice as long). Each call infeeds one batch's one-hot tokens,
    mask and pooling weights and runs the same stage chain as a private query.
    """

    def __init__(self, checkpoint: Checkpoint, engine: EngineConfig, batch: int):
        import spu.libspu as libspu

        from cipherprompt.secure.engine import compile_classifier, named_weights

        if engine.protocol != "REF2K":
            raise ValueError(f"ReferenceRunner needs protocol REF2K, got {engine.protocol!r}")
        self.batch = batch
        self.vocab_size = checkpoint.config.vocab_size
        self.model = compile_classifier(checkpoint.config, checkpoint.plan, checkpoint.max_len,
                                        engine, batch=batch)
        self._runtime, self._io, self._link = reference_runtime(engine)
        self._secret = libspu.Visibility.VIS_SECRET
        for name, value in named_weights(checkpoint.params).items():
            self._set(name, value)

    def _set(self, name: str, value: np.ndarray) -> None:
        shares = self._io.make_shares(np.ascontiguousarray(value, np.float32), self._secret,
                                      owner_rank=0)
        self._runtime.set_var(name, shares[0])

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run the stage chain on up to ``batch`` rows; return REF2K logits [rows, labels]."""
        from cipherprompt.models.bert import one_hot, pooling_weights

        rows = len(ids)
        if not 1 <= rows <= self.batch:
            raise ValueError(f"expected 1..{self.batch} rows, got {rows}")
        if rows < self.batch:
            # The program has a fixed batch: fill it with copies of the last row.
            filler = self.batch - rows
            ids = np.concatenate([ids, np.repeat(ids[-1:], filler, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], filler, axis=0)])
        self._set("onehot", one_hot(ids, self.vocab_size))
        self._set("mask", mask)
        self._set("pool", pooling_weights(mask))
        stages = self.model.stages
        for index, stage in enumerate(stages):
            self._runtime.run(stage.executable)
            if index > 0:
                self._runtime.del_var(stages[index - 1].output_name)
        output = self._runtime.get_var(self.model.output_name)
        self._runtime.del_var(self.model.output_name)
        return np.asarray(self._io.reconstruct([output]), np.float32)[:rows]


def run_reference(checkpoint: Checkpoint, engine: EngineConfig, data: EncodedSet,
                  results: ResultLog, batch: int) -> dict:
    """Fill ``results`` with REF2K logits for every row of ``data``; return timing figures."""

    def run_rows(runner: ReferenceRunner, rows: list[int]) -> list[dict]:
        started = time.perf_counter()
        logits = runner.logits(data.ids[rows], data.mask[rows])
        seconds = (time.perf_counter() - started) / len(rows)
        return [{"index": index, "logits": row.tolist(), "seconds": seconds}
                for index, row in zip(rows, logits)]

    return fill_reference_results(results, len(data), batch, "sentence",
                                  lambda: ReferenceRunner(checkpoint, engine, batch), run_rows)


def fill_reference_results(results: ResultLog, count: int, batch: int, unit: str,
                           make_runner, run_rows) -> dict:
    """Run the rows 0..count-1 missing from ``results`` in batches; return timing figures.

    ``make_runner()`` builds the REF2K runner, only when some rows are missing, and
    ``run_rows(runner, rows)`` returns one record per row. ``unit`` names a row in logs.
    """
    from cipherprompt.train.teacher import progress_interval

    pending = [index for index in range(count) if index not in results.records]
    figures = {f"{unit}s_this_run": len(pending), "compile_seconds": 0.0, "run_seconds": 0.0}
    if not pending:
        log.info("REF2K: all %d %ss already done in %s", count, unit, results.path)
        return figures

    started = time.perf_counter()
    runner = make_runner()
    figures["compile_seconds"] = time.perf_counter() - started
    log.info("REF2K: %d of %d %ss to run, batch %d (set-up %.1f s)", len(pending), count, unit,
             batch, figures["compile_seconds"])
    started = time.perf_counter()
    with tqdm(total=count, initial=count - len(pending), desc="REF2K", unit=unit,
              mininterval=progress_interval()) as progress:
        for first in range(0, len(pending), batch):
            rows = pending[first:first + batch]
            results.append(run_rows(runner, rows))
            progress.update(len(rows))
    figures["run_seconds"] = time.perf_counter() - started
    return figures


# CHEETAH: the two-party run.


def run_cheetah(checkpoint_path: Path, checkpoint: Checkpoint, engine: EngineConfig,
                examples: Sequence[Example], indices: Sequence[int], results: ResultLog,
                work_dir: Path, port: int, start_timeout_s: float, batch: int = 1) -> dict:
    """Classify the sentences ``indices`` privately, ``batch`` per query, appending each result.

    A query's seconds, bytes and messages are shared by its sentences: each record stores the
    query's figures divided by the number of sentences in it, and that number.
    """
    from cipherprompt.secure.client import PrivateClassifier
    from cipherprompt.secure.engine import compile_classifier
    from cipherprompt.secure.launch import ServerProcess
    from cipherprompt.train.teacher import progress_interval

    pending = [index for index in indices if index not in results.records]
    figures = {"queries_this_run": 0, "session_seconds": 0.0, "batch": batch}
    if not pending:
        log.info("CHEETAH: all %d sample sentences already done in %s", len(indices),
                 results.path)
        return figures

    # The server starts with the default engine settings, so its program must equal this one.
    expected = compile_classifier(checkpoint.config, checkpoint.plan, checkpoint.max_len,
                                  engine, batch=batch).digest
    started = time.perf_counter()
    server = ServerProcess(checkpoint_path, work_dir, port, start_timeout_s=start_timeout_s,
                           extra_args=("--batch", str(batch)))
    with server, PrivateClassifier(server.address, work_dir=work_dir / "client") as client:
        if client.model.digest != expected:
            raise RuntimeError(
                f"the server's program {client.model.digest} differs from the program of "
                f"engine {engine.to_dict()} ({expected}); the REF2K comparison would not be "
                "like for like. Check that cipherprompt serve uses the default engine settings"
            )
        log.info("CHEETAH: %d of %d sample sentences to run, %d per query (server log %s)",
                 len(pending), len(indices), batch, server.log_path)
        with tqdm(total=len(indices), initial=len(indices) - len(pending), desc="CHEETAH",
                  unit="sentence", mininterval=progress_interval()) as progress:
            live = sys.stderr.isatty()

            def show_stage(index: int, total: int, name: str) -> None:
                progress.set_postfix_str(f"stage {index + 1}/{total} {name}", refresh=live)

            for start in range(0, len(pending), batch):
                chunk = pending[start:start + batch]
                predictions = client.classify_batch(
                    [examples[index].text for index in chunk], truncate=True,
                    progress=show_stage)
                cost = predictions[0].cost
                share = len(chunk)
                results.append([{
                    "index": index,
                    "logits": prediction.logits.astype(float).tolist(),
                    "seconds": cost.wall_seconds / share,
                    "bytes_sent": cost.bytes_sent / share,
                    "bytes_received": cost.bytes_received / share,
                    "messages": cost.messages / share,
                    "query_sentences": share,
                    "num_tokens": prediction.num_tokens,
                    "program_sha256": client.model.digest,
                } for index, prediction in zip(chunk, predictions)])
                figures["queries_this_run"] += 1
                progress.update(len(chunk))
    figures["session_seconds"] = time.perf_counter() - started
    return figures


def sample_indices(count: int, size: int, seed: int) -> list[int]:
    """Return the first ``count`` of a seeded permutation of range(size), so samples nest."""
    return [int(index) for index in np.random.default_rng(seed).permutation(size)[:count]]


# Comparisons and the report.


def compare_logits(reference: np.ndarray, other: np.ndarray,
                   indices: Sequence[int] | None = None) -> dict:
    """Compare ``other`` logits with ``reference`` logits [sentences, labels].

    Returns the label agreement, the sentences whose labels differ (as ``indices`` name the
    rows, by default their positions) with the largest margin between the reference's top two
    logits among them, and statistics of the per-sentence max |logit difference|.
    """
    names = np.arange(len(reference)) if indices is None else np.asarray(indices)
    per_sentence = np.abs(other - reference).max(axis=-1)
    agree = np.argmax(other, axis=-1) == np.argmax(reference, axis=-1)
    top_two = np.sort(reference, axis=-1)[:, -2:]
    margins = top_two[:, 1] - top_two[:, 0]
    return {
        "sentences": int(len(reference)),
        "label_agreement": float(agree.mean()),
        "disagreements": int((~agree).sum()),
        "disagreeing_sentences": [int(name) for name in names[~agree]],
        # A small value means the labels differ only on near ties of the reference.
        "max_reference_margin_of_disagreements": (
            float(margins[~agree].max()) if (~agree).any() else None),
        "max_logit_difference": float(per_sentence.max()),
        "mean_logit_difference": float(per_sentence.mean()),
        "p99_logit_difference": float(np.percentile(per_sentence, 99)),
    }


def _train_len(checkpoint: Checkpoint, requested: int | None) -> int:
    recorded = checkpoint.metadata.get("teacher_config", {}).get("train_len")
    length = requested or recorded or DEFAULT_TRAIN_LEN
    if length > checkpoint.config.max_positions:
        raise ValueError(
            f"train_len {length} exceeds the model's {checkpoint.config.max_positions} "
            "positions; pass a smaller --train-len"
        )
    return length


def _float_figures(checkpoint: Checkpoint, examples: Sequence[Example], lengths: np.ndarray,
                   max_len: int, tokenizer: WordPieceTokenizer) -> tuple[dict, np.ndarray]:
    from cipherprompt.train.batches import encode_examples
    from cipherprompt.train.teacher import accuracy, predict_logits

    started = time.perf_counter()
    data = encode_examples(examples, tokenizer, max_len)
    logits = predict_logits(checkpoint.params, checkpoint.config, checkpoint.plan, data)
    figures = {
        "max_len": max_len,
        "accuracy": accuracy(logits, data.labels),
        "truncated_sentences": int((lengths > max_len).sum()),
        "seconds": time.perf_counter() - started,
    }
    return figures, logits


def _cheetah_rows(indices, examples, float_logits, ref2k_logits, records) -> list[dict]:
    rows = []
    for index in indices:
        private = np.asarray(records[index]["logits"], np.float32)
        rows.append({
            "index": index,
            "true_label": LABEL_NAMES[examples[index].label],
            "float_label": LABEL_NAMES[int(np.argmax(float_logits[index]))],
            "ref2k_label": LABEL_NAMES[int(np.argmax(ref2k_logits[index]))],
            "cheetah_label": LABEL_NAMES[int(np.argmax(private))],
            "fixed_point_error": float(np.abs(ref2k_logits[index] - float_logits[index]).max()),
            "protocol_error": float(np.abs(private - ref2k_logits[index]).max()),
            "total_error": float(np.abs(private - float_logits[index]).max()),
            "seconds": records[index]["seconds"],
            "bytes_sent": records[index]["bytes_sent"],
            "bytes_received": records[index]["bytes_received"],
            # Records written before batched queries came from one-sentence queries.
            "query_sentences": records[index].get("query_sentences", 1),
        })
    return rows


def evaluate(config: EvaluateConfig, examples: Sequence[Example] | None = None) -> dict:
    """Run the float, REF2K and CHEETAH evaluations; write and return the JSON report.

    ``examples`` replaces the test split of seed ``config.seed`` (tests pass a few sentences).
    Raises CheckpointError for a missing or unreadable checkpoint and WorkDirInUseError when
    another evaluate run uses ``config.work_dir``.
    """
    from cipherprompt.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(config.checkpoint)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    with WorkDirLock(config.work_dir / LOCK_NAME):
        return _evaluate_locked(config, checkpoint, examples)


def _evaluate_locked(config: EvaluateConfig, checkpoint: Checkpoint,
                     examples: Sequence[Example] | None) -> dict:
    from cipherprompt.secure.engine import EngineConfig
    from cipherprompt.tokenizer import WordPieceTokenizer
    from cipherprompt.train.batches import encode_examples

    started = time.perf_counter()
    source = "injected" if examples is not None else f"test split of seed {config.seed}"
    if examples is None:
        examples = load_splits(seed=config.seed).test
    examples = list(examples[: config.limit] if config.limit else examples)
    if not examples:
        raise ValueError("no sentences to evaluate")
    texts = [example.text for example in examples]
    max_len = checkpoint.max_len
    train_len = _train_len(checkpoint, config.train_len)
    tokenizer = WordPieceTokenizer()
    full_lengths = tokenizer.encode_batch(texts, checkpoint.config.max_positions, True)[1].sum(1)
    labels = np.array([example.label for example in examples])

    # 1. Plaintext float32 at the serving length and at the training length.
    log.info("float32: %d sentences at %d and %d tokens", len(examples), max_len, train_len)
    float_serve, float_logits = _float_figures(checkpoint, examples, full_lengths, max_len,
                                               tokenizer)
    float_train, float_train_logits = _float_figures(checkpoint, examples, full_lengths,
                                                     train_len, tokenizer)

    # 2. REF2K on every sentence, with the engine settings of the real runs.
    engine = dataclasses.replace(EngineConfig(), protocol="REF2K")
    ref2k_results = ResultLog(config.work_dir / REF2K_RESULTS, setup_digest(checkpoint, engine),
                              texts)
    serve_data = encode_examples(examples, tokenizer, max_len)
    ref2k_timing = run_reference(checkpoint, engine, serve_data, ref2k_results, config.batch)
    ref2k_logits = np.array([ref2k_results.records[index]["logits"]
                             for index in range(len(examples))], np.float32)
    ref2k_seconds = sum(ref2k_results.records[index]["seconds"] for index in range(len(examples)))

    write_npz(config.work_dir / LOGITS_NAME,
              {"labels": labels, "float_serve_len": float_logits,
               "float_train_len": float_train_logits, "ref2k": ref2k_logits})
    sections = {
        "data": {
            "sentences": len(examples),
            "source": source if config.limit is None else f"{source}, first {config.limit}",
            "truncation": (
                f"every evaluation runs at {max_len} tokens (the checkpoint's serving length) "
                f"except float_train_len; {float_serve['truncated_sentences']} of "
                f"{len(examples)} sentences are longer and were truncated to their first "
                f"{max_len - 1} tokens plus [SEP]"
            ),
        },
        "float_serve_len": float_serve,
        "float_train_len": float_train,
        "ref2k": _ref2k_section(engine, labels, float_logits, ref2k_logits, ref2k_timing,
                                ref2k_seconds, config.batch),
    }

    # 3. CHEETAH on a sample, resuming from earlier runs in this working directory. The report
    # is written before it too, because the two-party run takes hours for a large sample.
    cheetah_engine = dataclasses.replace(engine, protocol="CHEETAH")
    indices = sample_indices(min(config.sample, len(examples)), len(examples), config.seed)
    cheetah_results = ResultLog(config.work_dir / CHEETAH_RESULTS,
                                setup_digest(checkpoint, cheetah_engine), texts)
    cheetah_timing = {"queries_this_run": 0, "session_seconds": 0.0}

    def cheetah_section() -> dict:
        return _cheetah_section(cheetah_engine, indices, examples, labels, float_logits,
                                ref2k_logits, cheetah_results.records, cheetah_timing)

    sections["cheetah"] = cheetah_section()
    _write_report(config, checkpoint, sections, started)
    if indices:
        cheetah_timing = run_cheetah(config.checkpoint, checkpoint, cheetah_engine, examples,
                                     indices, cheetah_results, config.work_dir / "cheetah",
                                     config.port, config.server_start_timeout_s,
                                     config.cheetah_batch)
        sections["cheetah"] = cheetah_section()
    report = _write_report(config, checkpoint, sections, started)
    log.info("report written to %s", config.work_dir / REPORT_NAME)
    return report


def _write_report(config: EvaluateConfig, checkpoint: Checkpoint, sections: dict,
                  started: float) -> dict:
    """Write the JSON report: the command, the configuration, the checkpoint and ``sections``."""
    report = {
        "command": config.command_line(),
        "config": {key: str(value) if isinstance(value, Path) else value
                   for key, value in dataclasses.asdict(config).items()},
        "checkpoint": {
            "path": str(config.checkpoint),
            "name": checkpoint.metadata.get("name"),
            "weights_sha256": checkpoint.weights_digest(),
            "plan": checkpoint.plan.name,
            "max_len": checkpoint.max_len,
        },
        **sections,
        "error_terms": ERROR_TERMS,
        "seconds": time.perf_counter() - started,
    }
    write_json(config.work_dir / REPORT_NAME, report)
    return report


def _ref2k_section(engine, labels, float_logits, ref2k_logits, timing, seconds, batch) -> dict:
    from cipherprompt.train.teacher import accuracy

    return {
        "engine": engine.to_dict(),
        "world_size": 1,
        "batch": batch,
        "accuracy": accuracy(ref2k_logits, labels),
        "vs_float": compare_logits(float_logits, ref2k_logits),
        "seconds_per_sentence": seconds / len(labels),
        "total_sentence_seconds": seconds,
        **timing,
        "measured_in": "SPU REF2K in one process (plaintext fixed point, no cryptography)",
    }


def _cheetah_section(engine, indices, examples, labels, float_logits, ref2k_logits, records,
                     timing) -> dict:
    from cipherprompt.train.teacher import accuracy

    done = [index for index in indices if index in records]
    section = {"engine": engine.to_dict(), "sample": len(indices), "completed": len(done),
               **timing}
    if not done:
        return section
    private = np.array([records[index]["logits"] for index in done], np.float32)
    rows = _cheetah_rows(done, examples, float_logits, ref2k_logits, records)
    section.update({
        "accuracy": accuracy(private, labels[done]),
        "vs_ref2k": compare_logits(ref2k_logits[done], private, done),
        "vs_float": compare_logits(float_logits[done], private, done),
        "ref2k_vs_float_on_sample": compare_logits(float_logits[done], ref2k_logits[done], done),
        # Per sentence: a query of several sentences counts its figures divided among them.
        "mean_sentence_seconds": float(np.mean([row["seconds"] for row in rows])),
        "mean_bytes_sent": float(np.mean([row["bytes_sent"] for row in rows])),
        "mean_bytes_received": float(np.mean([row["bytes_received"] for row in rows])),
        "sentences": rows,
    })
    return section


# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the sub-command parsers of the cipherprompt CLI."""
    parser = subparsers.add_parser(
        "evaluate",
        help="accuracy of a checkpoint in float32, in SPU REF2K and in CHEETAH",
        description="Measure a classifier checkpoint's test accuracy in plaintext float32 and "
                    "in SPU's REF2K fixed-point reference (whole test split), and its agreement "
                    "with private CHEETAH queries on a sample. Rerunning with the same "
                    "--work-dir resumes: finished REF2K and CHEETAH sentences are skipped.",
    )
    parser.add_argument("--checkpoint", type=Path,
                        default=Path("cipherprompt-work") / "teacher" / "teacher.npz",
                        help="checkpoint to evaluate (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work") / "evaluate",
                        help="folder for the report, per-sentence results and logs "
                             "(default: %(default)s)")
    parser.add_argument("--sample", type=int, default=100,
                        help="test sentences to classify under CHEETAH, about 1-3 minutes each "
                             "for MiniLM on 2 cores; 0 skips the two-party run "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32,
                        help="sentences per REF2K run; MiniLM at 32 tokens peaked at 1.4 GB of "
                             "memory with 32 (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N test sentences (quick checks)")
    parser.add_argument("--train-len", type=int, default=None,
                        help="second float32 evaluation length in tokens (default: the "
                             f"checkpoint's training length, else {DEFAULT_TRAIN_LEN})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split by movie and of the sample order (default: 0)")
    parser.add_argument("--cheetah-batch", type=int, default=1,
                        help="sentences per CHEETAH query; larger batches share the products "
                             "with the weights but need more memory (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0,
                        help="CHEETAH server port on 127.0.0.1; 0 picks a free one (default)")
    parser.set_defaults(handler=cmd_evaluate)
    return parser


def cmd_evaluate(args) -> int:
    # SIGTERM unwinds like an exception once the current SPU call returns, so the server child
    # is stopped and the lock released.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    config = EvaluateConfig(checkpoint=args.checkpoint, work_dir=args.work_dir,
                            sample=args.sample, batch=args.batch, limit=args.limit,
                            seed=args.seed, train_len=args.train_len, port=args.port,
                            cheetah_batch=args.cheetah_batch)
    report = evaluate(config)
    print(format_summary(report))
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def format_summary(report: dict) -> str:
    """Format the main figures as a few lines for the terminal (the report has them all)."""
    serve, train, ref2k = report["float_serve_len"], report["float_train_len"], report["ref2k"]
    sentences = report["data"]["sentences"]
    lines = [
        f"float32 accuracy: {serve['accuracy']:.4f} at {serve['max_len']} tokens "
        f"({serve['truncated_sentences']}/{sentences} truncated), {train['accuracy']:.4f} at "
        f"{train['max_len']} tokens",
        f"REF2K accuracy: {ref2k['accuracy']:.4f} at {serve['max_len']} tokens; labels equal "
        f"to float32 for {ref2k['vs_float']['label_agreement']:.2%}, max logit difference "
        f"{ref2k['vs_float']['max_logit_difference']:.2e}; "
        f"{ref2k['seconds_per_sentence']:.2f} s per sentence",
    ]
    cheetah = report["cheetah"]
    if cheetah.get("completed"):
        lines.append(
            f"CHEETAH on {cheetah['completed']} sentences: labels equal to REF2K for "
            f"{cheetah['vs_ref2k']['label_agreement']:.2%} (max logit difference "
            f"{cheetah['vs_ref2k']['max_logit_difference']:.2e}), to float32 for "
            f"{cheetah['vs_float']['label_agreement']:.2%}; "
            f"{cheetah['mean_sentence_seconds']:.0f} s per sentence"
        )
    return "\n".join(lines)
