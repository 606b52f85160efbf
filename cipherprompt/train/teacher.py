"""Fine-tune the exact-operator MiniLM classifier (the teacher) on the Rotten Tomatoes split.

The best validation checkpoint is kept (written atomically) and its test accuracy reported,
next to the TF-IDF baseline on the same split.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from cipherprompt.assets import asset_path, sha256_of
from cipherprompt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cipherprompt.data import LABEL_NAMES, load_splits
from cipherprompt.files import write_json
from cipherprompt.models.bert import BertConfig, Params, classify, pooling_weights
from cipherprompt.models.bert_import import load_bert_safetensors
from cipherprompt.plan import OperatorPlan
from cipherprompt.tokenizer import WordPieceTokenizer
from cipherprompt.train.batches import EncodedSet, encode_examples, iterate_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig:
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    # Share of the steps with a linear learning-rate warm-up; the rest decays linearly to 0.
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    # Training texts are truncated to this many tokens (99.95% of the data fits in 64).
    train_len: int = 64
    # Sequence length recorded in the checkpoint for private inference (fits 70% at 32).
    serve_len: int = 32
    # Validation evaluations per epoch; the best one is kept.
    evaluations_per_epoch: int = 2
    plan: str = "exact"
    seed: int = 0
    # Use only the first N training examples (smoke tests); None for all.
    train_limit: int | None = None

    def __post_init__(self) -> None:
        for field in ("epochs", "batch_size", "train_len", "serve_len", "evaluations_per_epoch"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def predict_logits(params: Params, config: BertConfig, plan: OperatorPlan, data: EncodedSet,
                   batch_size: int = 128) -> np.ndarray:
    """Plaintext float32 logits for every row of ``data``, in order."""
    forward = jax.jit(partial(classify, config=config, plan=plan))
    outputs = []
    for ids, mask, _ in iterate_batches(data, batch_size):
        outputs.append(np.asarray(forward(params, tokens=ids, mask=mask,
                                          pool_weights=pooling_weights(mask))))
    return np.concatenate(outputs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def make_optimizer(total_steps: int, cfg: TeacherConfig) -> optax.GradientTransformation:
    warmup = max(1, int(total_steps * cfg.warmup_fraction))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup),
         optax.linear_schedule(cfg.learning_rate, 0.0, max(1, total_steps - warmup))],
        [warmup],
    )
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_teacher(out_dir: Path, cfg: TeacherConfig = TeacherConfig()) -> dict:
    """Fine-tune from the packaged MiniLM weights; write ``teacher.npz`` and a JSON report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = BertConfig.from_hf_config(asset_path("minilm_config"), num_labels=len(LABEL_NAMES))
    plan = OperatorPlan.preset(cfg.plan, config.num_layers)
    params = jax.tree_util.tree_map(
        jnp.asarray, load_bert_safetensors(asset_path("minilm_weights"), config, cfg.seed)
    )
    splits = load_splits(seed=cfg.seed)
    tokenizer = WordPieceTokenizer()
    train_examples = splits.train[: cfg.train_limit] if cfg.train_limit else splits.train
    train = encode_examples(train_examples, tokenizer, cfg.train_len)
    validation = encode_examples(splits.validation, tokenizer, cfg.train_len)
    test = encode_examples(splits.test, tokenizer, cfg.train_len)

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(total_steps, cfg)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, ids, mask, labels, rng):
        def loss_fn(p):
            logits = classify(p, config, plan, ids, mask, mask / mask.sum(-1, keepdims=True), rng)
            return cross_entropy(logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_points = {
        round(steps_per_epoch * (k + 1) / cfg.evaluations_per_epoch)
        for k in range(cfg.evaluations_per_epoch)
    }
    checkpoint_path = out_dir / "teacher.npz"
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    best = {"validation_accuracy": -1.0}
    history = []
    started = time.perf_counter()
    log.info("fine-tuning the teacher: %d examples, %d epochs, %d steps", len(train), cfg.epochs,
             total_steps)
    with tqdm(total=total_steps, desc="teacher", unit="step", mininterval=progress_interval()) \
            as progress:
        step = 0
        for epoch in range(cfg.epochs):
            for in_epoch, (ids, mask, labels) in enumerate(
                iterate_batches(train, cfg.batch_size, rng), start=1
            ):
                key, dropout_key = jax.random.split(key)
                params, opt_state, loss = train_step(params, opt_state, ids, mask, labels,
                                                     dropout_key)
                step += 1
                progress.update(1)
                if step % 20 == 0:
                    progress.set_postfix(loss=f"{float(loss):.3f}")
                if in_epoch not in eval_points:
                    continue
                score = accuracy(predict_logits(params, config, plan, validation),
                                 validation.labels)
                history.append({"epoch": epoch + 1, "step": step, "validation_accuracy": score})
                log.info("step %d: validation accuracy %.4f", step, score)
                if score > best["validation_accuracy"]:
                    best = {"validation_accuracy": score, "step": step}
                    save_checkpoint(checkpoint_path, _teacher_checkpoint(params, config, plan,
                                                                         cfg, history))

    kept = load_checkpoint(checkpoint_path)
    test_logits = predict_logits(kept.params, config, plan, test)
    report = {
        "command": "cipherprompt train",
        "config": asdict(cfg),
        "plan": plan.name,
        "train_size": len(train),
        "validation_size": len(validation),
        "test_size": len(test),
        "best_step": best["step"],
        "validation_accuracy": best["validation_accuracy"],
        "test_accuracy": accuracy(test_logits, test.labels),
        "measured_in": "plaintext float32 (JAX, CPU)",
        "history": history,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "teacher-report.json", report)
    log.info("teacher: validation %.4f, test %.4f (plaintext float32)",
             report["validation_accuracy"], report["test_accuracy"])
    return report


def _teacher_checkpoint(params, config, plan, cfg: TeacherConfig, history) -> Checkpoint:
    return Checkpoint(
        jax.tree_util.tree_map(np.asarray, params),
        config,
        plan,
        cfg.serve_len,
        {
            "name": "minilm-l6-rotten-tomatoes",
            "label_names": list(LABEL_NAMES),
            "tokenizer_sha256": sha256_of(asset_path("minilm_tokenizer")),
            "base_weights_sha256": sha256_of(asset_path("minilm_weights")),
            "teacher_config": asdict(cfg),
            "history": list(history),
        },
    )


def progress_interval() -> float:
    """Seconds between progress-bar updates: frequent on a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0


