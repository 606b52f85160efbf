"""Layer-by-layer distillation of a student with cheaper operators from the exact teacher.

The student starts as a copy of the teacher. Each stage switches one layer's operators to those
of the target plan and trains every parameter so that the student's hidden states, attention
maps and logits match the teacher's on the same batch (real tokens only). Substituting bottom-up
means a layer's inputs already come from substituted layers when it is trained. A last stage
fine-tunes the whole student on the task labels plus a logit distillation term.

Every output goes to one working directory:

- ``distill-state.json``: settings, teacher identity and the record of every finished stage,
- ``distill-progress.npz``: the weights and partly substituted plan after the last finished
  stage, so a rerun with the same settings continues after it,
- ``student.npz``: the student with the full target plan, and ``distill-report.json``,
- ``distill.lock``: the PID of the run that uses the directory.

Optimizer state is not saved. Each stage starts a fresh optimizer and draws its batches from a
generator seeded by (seed, stage index), so a resumed run repeats the stages it still has to run
as an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from cipherprompt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cipherprompt.data import load_splits
from cipherprompt.files import write_json
from cipherprompt.models.bert import BertConfig, Params, classifier_head, encode
from cipherprompt.plan import OperatorPlan
from cipherprompt.tokenizer import WordPieceTokenizer
from cipherprompt.train.batches import EncodedSet, encode_examples, iterate_batches
from cipherprompt.train.teacher import (
    accuracy,
    cross_entropy,
    predict_logits,
    progress_interval,
)

log = logging.getLogger(__name__)

STATE_FILE = "distill-state.json"
PROGRESS_FILE = "distill-progress.npz"
STUDENT_FILE = "student.npz"
REPORT_FILE = "distill-report.json"
LOCK_FILE = "distill.lock"

# The first PROBE_SIZE validation examples measure the distance to the teacher and the accuracy
# before and after each stage, in batches of PROBE_BATCH at the full training length (so one
# compilation per stage).
PROBE_SIZE = 256
PROBE_BATCH = 64
# Training batches are padded to a multiple of this many tokens: each stage compiles its step
# once per width, and a compilation of the 6-layer model costs as much as several steps.
TRAIN_WIDTH_STEP = 32

FINETUNE_STAGE = "finetune"

# Layer count used to check a plan name before the teacher is loaded: large enough that every
# friendly-first-K a real model can use passes.
_LAYERS_FOR_NAME_CHECK = 1024


@dataclass(frozen=True)
class DistillConfig:
    # Name of the target operator plan preset, such as "friendly" or "friendly-first-3".
    plan: str = "friendly"
    # Layer indices in the order they are substituted. None substitutes every layer whose
    # operators differ from the teacher's, bottom-up (0 first), so each layer is trained on
    # inputs that already come from substituted layers below it.
    order: tuple[int, ...] | None = None
    # Optimizer steps after each layer's substitution, and in the final fine-tune.
    steps_per_stage: int = 60
    final_steps: int = 200
    batch_size: int = 32
    stage_learning_rate: float = 1e-4
    final_learning_rate: float = 5e-5
    # Share of each stage's steps with a linear learning-rate warm-up, after which the rate
    # decays linearly to 0.
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    # Layer stages minimise hidden_weight * hidden MSE + attention_weight * attention error
    # + logit_weight * logit KL. The final fine-tune minimises label_weight * label cross-entropy
    # + logit_weight * logit KL.
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    logit_weight: float = 1.0
    label_weight: float = 1.0
    # Softmax temperature of the logit KL. The KL is multiplied by temperature^2 so that its
    # gradient scale does not depend on the temperature.
    temperature: float = 2.0
    # Dropout in the student's forward pass while training. The teacher never uses dropout.
    student_dropout: bool = False
    # Training texts are truncated to this many tokens.
    train_len: int = 64
    seed: int = 0
    # Use only the first N training examples, for smoke tests. None uses all of them.
    train_limit: int | None = None

    def __post_init__(self) -> None:
        if self.order is not None:
            object.__setattr__(self, "order", tuple(self.order))
            if any(not isinstance(index, int) or index < 0 for index in self.order):
                raise ValueError(f"order must contain layer indices >= 0, got {self.order}")
            if len(set(self.order)) != len(self.order):
                raise ValueError(f"order lists a layer more than once: {self.order}")
        for field in ("batch_size", "train_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
        for field in ("steps_per_stage", "final_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be at least 0, got {getattr(self, field)}")
        for field in ("stage_learning_rate", "final_learning_rate"):
            if not 0 < getattr(self, field) < 1:
                raise ValueError(f"{field} must be in (0, 1), got {getattr(self, field)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for field in ("weight_decay", "hidden_weight", "attention_weight", "logit_weight",
                      "label_weight"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be at least 0, got {getattr(self, field)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be at least 1 or None, got {self.train_limit}")
        # Raises listing the valid presets for an unknown name. The real layer count is known
        # only from the teacher, so it is checked when the run starts.
        OperatorPlan.preset(self.plan, _LAYERS_FOR_NAME_CHECK)

    def to_json_dict(self) -> dict:
        """Return the settings in their JSON form (the order as a list), to compare on resume."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class DistillData:
    """Tokenized training, validation and test sets."""

    train: EncodedSet
    validation: EncodedSet
    test: EncodedSet


def load_distill_data(cfg: DistillConfig) -> DistillData:
    """Tokenize the Rotten Tomatoes split (seed ``cfg.seed``) at ``cfg.train_len`` tokens."""
    splits = load_splits(seed=cfg.seed)
    tokenizer = WordPieceTokenizer()
    train = splits.train[: cfg.train_limit] if cfg.train_limit else splits.train
    return DistillData(
        encode_examples(train, tokenizer, cfg.train_len),
        encode_examples(splits.validation, tokenizer, cfg.train_len),
        encode_examples(splits.test, tokenizer, cfg.train_len),
    )


class DistillError(RuntimeError):
    """A distillation cannot start: its directory belongs to a run with other settings or is in
    use by another run."""


# ---------------------------------------------------------------------------------------------
# Stages: which layer each stage substitutes and the plan the student has after it.


@dataclass(frozen=True)
class Stage:
    index: int
    # Layer that this stage substitutes, or None for the final fine-tune.
    layer: int | None
    plan: OperatorPlan

    @property
    def name(self) -> str:
        return FINETUNE_STAGE if self.layer is None else f"layer{self.layer}"


def substitution_order(teacher_plan: OperatorPlan, target_plan: OperatorPlan,
                       order: tuple[int, ...] | None) -> tuple[int, ...]:
    """Resolve ``order``: default bottom-up over the layers that differ, else validated."""
    if target_plan.embedding_normaliser != teacher_plan.embedding_normaliser:
        raise ValueError(
            f"target plan {target_plan.name!r} changes the embedding normaliser "
            f"({teacher_plan.embedding_normaliser} to {target_plan.embedding_normaliser}); "
            f"distillation substitutes encoder layers only"
        )
    differing = [index for index, (old, new) in
                 enumerate(zip(teacher_plan.layers, target_plan.layers)) if old != new]
    if order is None:
        return tuple(differing)
    out_of_range = [index for index in order if index >= target_plan.num_layers]
    if out_of_range:
        raise ValueError(
            f"order {list(order)} names layers {out_of_range}, but the model has layers "
            f"0..{target_plan.num_layers - 1}"
        )
    missing = sorted(set(differing) - set(order))
    if missing:
        raise ValueError(
            f"order {list(order)} leaves out layers {missing}, whose operators differ between "
            f"the teacher plan {teacher_plan.name!r} and the target plan {target_plan.name!r}"
        )
    return tuple(order)


def build_stages(teacher_plan: OperatorPlan, target_plan: OperatorPlan,
                 order: tuple[int, ...]) -> list[Stage]:
    """Build a stage per layer in ``order`` with the plan after its switch, then the fine-tune."""
    stages = []
    layers = list(teacher_plan.layers)
    for index, layer in enumerate(order):
        layers[layer] = target_plan.layers[layer]
        name = f"{target_plan.name}-partial-{index + 1}of{len(order)}"
        plan = OperatorPlan(name, tuple(layers), teacher_plan.embedding_normaliser)
        stages.append(Stage(index, layer, plan))
    stages.append(Stage(len(order), None, target_plan))
    return stages


# ---------------------------------------------------------------------------------------------
# Losses.


class ModelOutputs(NamedTuple):
    hidden_states: list[jax.Array]  # embedding output and each layer's output, [batch, seq, h]
    attentions: list[jax.Array]  # each layer's attention weights, [batch, heads, seq, seq]
    logits: jax.Array  # [batch, num_labels]


def forward(params: Params, config: BertConfig, plan: OperatorPlan, ids: jax.Array,
            mask: jax.Array, dropout_rng: jax.Array | None = None) -> ModelOutputs:
    """Run the classifier and keep every hidden state and attention map."""
    hidden, hidden_states, attentions = encode(params, config, plan, ids, mask, dropout_rng)
    pool_weights = mask / jnp.sum(mask, axis=-1, keepdims=True)
    return ModelOutputs(hidden_states, attentions, classifier_head(params, hidden, pool_weights))


def distillation_terms(student: ModelOutputs, teacher: ModelOutputs, mask: jax.Array,
                       temperature: float) -> dict[str, jax.Array]:
    """Distances from student to teacher over real tokens only.

    - ``hidden``: squared difference averaged over the hidden axis and the real tokens, then
      over all hidden states (embedding output included),
    - ``attention``: squared difference summed over the real keys of a query row, averaged over
      heads and real query rows, then over layers. A row sum rather than a mean keeps the term
      from shrinking with the sequence length as the weights themselves do,
    - ``logit``: KL(teacher || student) of the temperature-softened class distributions, times
      temperature^2, averaged over the batch.
    """
    real_tokens = jnp.sum(mask)
    hidden = []
    for student_hidden, teacher_hidden in zip(student.hidden_states, teacher.hidden_states):
        per_token = jnp.mean(jnp.square(student_hidden - teacher_hidden), axis=-1)
        hidden.append(jnp.sum(per_token * mask) / real_tokens)

    keys = mask[:, None, None, :]
    queries = mask[:, None, :]
    attention = []
    for student_weights, teacher_weights in zip(student.attentions, teacher.attentions):
        per_row = jnp.sum(jnp.square(student_weights - teacher_weights) * keys, axis=-1)
        heads = per_row.shape[1]
        attention.append(jnp.sum(per_row * queries) / (real_tokens * heads))

    teacher_log_probs = jax.nn.log_softmax(teacher.logits / temperature)
    student_log_probs = jax.nn.log_softmax(student.logits / temperature)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return {
        "hidden": jnp.mean(jnp.stack(hidden)),
        "attention": jnp.mean(jnp.stack(attention)),
        "logit": jnp.mean(kl) * temperature**2,
    }


def _loss_weights(cfg: DistillConfig, finetune: bool) -> dict[str, float]:
    if finetune:
        return {"label": cfg.label_weight, "logit": cfg.logit_weight}
    return {"hidden": cfg.hidden_weight, "attention": cfg.attention_weight,
            "logit": cfg.logit_weight}


# ---------------------------------------------------------------------------------------------
# Training one stage.


def make_stage_optimizer(steps: int, learning_rate: float,
                         cfg: DistillConfig) -> optax.GradientTransformation:
    """AdamW with gradient clipping, linear warm-up and linear decay to 0 over ``steps``."""
    warmup = max(1, int(steps * cfg.warmup_fraction))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup),
         optax.linear_schedule(learning_rate, 0.0, max(1, steps - warmup))],
        [warmup],
    )
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _make_train_step(config: BertConfig, teacher_plan: OperatorPlan, student_plan: OperatorPlan,
                     optimizer: optax.GradientTransformation, cfg: DistillConfig,
                     finetune: bool):
    weights = _loss_weights(cfg, finetune)

    def loss_fn(params, teacher_params, ids, mask, labels, rng):
        teacher = jax.lax.stop_gradient(forward(teacher_params, config, teacher_plan, ids, mask))
        student = forward(params, config, student_plan, ids, mask, rng)
        terms = distillation_terms(student, teacher, mask, cfg.temperature)
        terms["label"] = cross_entropy(student.logits, labels)
        total = sum(weight * terms[name] for name, weight in weights.items())
        return total, terms

    @jax.jit
    def train_step(params, opt_state, teacher_params, ids, mask, labels, rng):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, teacher_params, ids, mask, labels, rng
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    return train_step


def _make_probe(config: BertConfig, teacher_plan: OperatorPlan, student_plan: OperatorPlan,
                temperature: float):
    @jax.jit
    def probe(params, teacher_params, ids, mask):
        teacher = forward(teacher_params, config, teacher_plan, ids, mask)
        student = forward(params, config, student_plan, ids, mask)
        return distillation_terms(student, teacher, mask, temperature), student.logits

    return probe


def _probe_distance(probe, params, teacher_params, data: EncodedSet) -> dict[str, float]:
    """Distillation terms on the probe set (batch means weighted by real tokens) and accuracy."""
    totals: dict[str, float] = {}
    tokens = 0.0
    logits = []
    for start in range(0, len(data), PROBE_BATCH):
        ids = data.ids[start:start + PROBE_BATCH]
        mask = data.mask[start:start + PROBE_BATCH]
        weight = float(mask.sum())
        terms, batch_logits = probe(params, teacher_params, ids, mask)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(value) * weight
        tokens += weight
        logits.append(np.asarray(batch_logits))
    distances = {name: total / tokens for name, total in totals.items()}
    distances["accuracy"] = accuracy(np.concatenate(logits), data.labels)
    return distances


def _endless_batches(data: EncodedSet, batch_size: int,
                     rng: np.random.Generator) -> Iterator[tuple[np.ndarray, ...]]:
    """Shuffled batches over repeated epochs, padded to a multiple of TRAIN_WIDTH_STEP tokens."""
    while True:
        for ids, mask, labels in iterate_batches(data, batch_size, rng):
            width = min(data.ids.shape[1], -(-ids.shape[1] // TRAIN_WIDTH_STEP) * TRAIN_WIDTH_STEP)
            padding = ((0, 0), (0, width - ids.shape[1]))
            # Padding positions are masked out, so their token id does not matter.
            yield np.pad(ids, padding), np.pad(mask, padding), labels


def _subset(data: EncodedSet, count: int) -> EncodedSet:
    return EncodedSet(data.ids[:count], data.mask[:count], data.labels[:count])


def run_stage(stage: Stage, params: Params, teacher: Checkpoint, teacher_params: Params,
              data: DistillData, cfg: DistillConfig) -> tuple[Params, dict]:
    """Switch to the stage's plan, train, and return the new weights and the stage record."""
    started = time.perf_counter()
    config = teacher.config
    finetune = stage.layer is None
    steps = cfg.final_steps if finetune else cfg.steps_per_stage
    learning_rate = cfg.final_learning_rate if finetune else cfg.stage_learning_rate
    probe_set = _subset(data.validation, PROBE_SIZE)
    probe = _make_probe(config, teacher.plan, stage.plan, cfg.temperature)

    record: dict = {
        "index": stage.index,
        "name": stage.name,
        "layer": stage.layer,
        "plan": stage.plan.to_dict(),
        "steps": steps,
        "learning_rate": learning_rate,
        "probe_before": _probe_distance(probe, params, teacher_params, probe_set),
    }
    log.info("stage %d (%s) after the switch: probe %s", stage.index, stage.name,
             _format_terms(record["probe_before"]))

    optimizer = make_stage_optimizer(steps, learning_rate, cfg)
    opt_state = optimizer.init(params)
    train_step = _make_train_step(config, teacher.plan, stage.plan, optimizer, cfg, finetune)
    batches = _endless_batches(data.train, cfg.batch_size,
                               np.random.default_rng([cfg.seed, stage.index]))
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), stage.index)
    # Training losses of the last 20 steps; their mean is reported as the stage's final loss.
    recent: deque[float] = deque(maxlen=20)
    with tqdm(total=steps, desc=f"distill {stage.name}", unit="step",
              mininterval=progress_interval()) as progress:
        for step in range(1, steps + 1):
            ids, mask, labels = next(batches)
            key, dropout_key = jax.random.split(key)
            params, opt_state, loss, _ = train_step(
                params, opt_state, teacher_params, ids, mask, labels,
                dropout_key if cfg.student_dropout else None,
            )
            recent.append(float(loss))
            progress.update(1)
            if step % 20 == 0:
                progress.set_postfix(loss=f"{np.mean(recent):.4f}")

    record["final_loss"] = float(np.mean(recent)) if recent else None
    record["probe_after"] = _probe_distance(probe, params, teacher_params, probe_set)
    record["validation_accuracy"] = accuracy(
        predict_logits(params, config, stage.plan, data.validation), data.validation.labels
    )
    record["seconds"] = time.perf_counter() - started
    log.info("stage %d (%s): %d steps, validation accuracy %.4f, probe %s, %.0f s",
             stage.index, stage.name, steps, record["validation_accuracy"],
             _format_terms(record["probe_after"]), record["seconds"])
    return params, record


def _format_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in sorted(terms.items()))


# ---------------------------------------------------------------------------------------------
# The working directory: lock, state file and resume.


class WorkDirLock:
    """Lock file holding the PID of the run that uses a working directory.

    A lock whose PID is still running raises DistillError; a lock left by a process that has
    ended is taken over with a warning.
    NOTE: two runs that take over the same stale lock at the same moment can both succeed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._locked = False

    def __enter__(self) -> WorkDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_stale_lock()
                continue
            with os.fdopen(handle, "w") as out:
                out.write(f"{os.getpid()}\n")
            self._locked = True
            return self
        raise DistillError(f"failed to create the lock file {self.path} in 3 attempts because "
                           f"other runs kept creating it; retry when they have finished")

    def _remove_stale_lock(self) -> None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return
        owner = int(text) if text.isdigit() else None
        if owner is not None and _process_running(owner):
            raise DistillError(
                f"working directory {self.path.parent} is in use by distillation process "
                f"{owner} (lock file {self.path}). Wait for it to finish or choose another "
                f"working directory. If process {owner} is not a distillation, delete the lock "
                f"file."
            )
        log.warning("taking over the lock %s left by process %s, which is not running",
                    self.path, text or "(no PID)")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc_info) -> None:
        if self._locked:
            self.path.unlink(missing_ok=True)
            self._locked = False


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_identity(cfg: DistillConfig, teacher_digest: str, target_plan: OperatorPlan,
                  order: tuple[int, ...]) -> dict:
    """Collect what a rerun must match to resume a run: settings, teacher, plan and order."""
    return {
        "config": cfg.to_json_dict(),
        "teacher_weights_sha256": teacher_digest,
        "target_plan": target_plan.to_dict(),
        "order": list(order),
    }


def check_same_run(saved: dict, current: dict, source: Path) -> None:
    """Raise DistillError naming every setting in which ``saved`` differs from ``current``."""
    differences = []
    for name, value in current["config"].items():
        saved_value = saved.get("config", {}).get(name, "(missing)")
        if saved_value != value:
            differences.append(f"{name}: {saved_value!r} in {source.name}, {value!r} now")
    # Every other entry of the identity (teacher, plan, order and, for decoders, the data).
    for name in (key for key in current if key != "config"):
        if saved.get(name) != current[name]:
            differences.append(f"{name}: {saved.get(name)!r} in {source.name}, "
                               f"{current[name]!r} now")
    if differences:
        raise DistillError(
            f"{source} belongs to a distillation with other settings ("
            + "; ".join(differences)
            + f"). Rerun with the same settings to resume it, or use another working directory."
        )


def read_state(path: Path) -> dict | None:
    """Return the state file's content, None when there is none; raise when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DistillError(f"state file {path} is unreadable ({error}); delete its working "
                           f"directory to start the distillation over") from error


def _write_state(work_dir: Path, identity: dict, stages: list[dict], total_stages: int,
                 teacher_validation_accuracy: float) -> None:
    write_json(work_dir / STATE_FILE, {
        **identity,
        "teacher_validation_accuracy": teacher_validation_accuracy,
        "completed_stages": len(stages),
        "total_stages": total_stages,
        "stages": stages,
    })


# ---------------------------------------------------------------------------------------------
# The whole run.


def distill(
    work_dir: Path,
    teacher_path: Path,
    cfg: DistillConfig = DistillConfig(),
    *,
    data: DistillData | None = None,
    target_plan: OperatorPlan | None = None,
    on_stage_end: Callable[[dict], None] | None = None,
) -> dict:
    """Distill the teacher at ``teacher_path`` into a student with the target plan.

    ``data`` replaces the Rotten Tomatoes split (tests pass small synthetic sets).
    ``target_plan`` replaces the preset named by ``cfg.plan`` and must carry that name.
    ``on_stage_end`` is called with each stage's record after its checkpoint is written.
    Finished stages of an earlier run in ``work_dir`` with the same settings are skipped.
    Returns the report that is also written to ``distill-report.json``.
    """
    started = time.perf_counter()
    work_dir = Path(work_dir)
    teacher = load_checkpoint(teacher_path)
    config = teacher.config
    if teacher.plan.num_layers != config.num_layers:
        raise ValueError(
            f"teacher checkpoint {teacher_path} is inconsistent: its plan "
            f"{teacher.plan.name!r} has {teacher.plan.num_layers} layers, its model "
            f"{config.num_layers}"
        )
    if target_plan is None:
        target_plan = OperatorPlan.preset(cfg.plan, config.num_layers)
    if target_plan.name != cfg.plan:
        raise ValueError(f"target plan is named {target_plan.name!r}, but the settings name "
                         f"{cfg.plan!r}; pass a plan with that name")
    if target_plan.num_layers != config.num_layers:
        raise ValueError(
            f"target plan {target_plan.name!r} has {target_plan.num_layers} layers, but the "
            f"teacher {teacher_path} has {config.num_layers}"
        )
    order = substitution_order(teacher.plan, target_plan, cfg.order)
    stages = build_stages(teacher.plan, target_plan, order)
    teacher_digest = teacher.weights_digest()
    identity = _run_identity(cfg, teacher_digest, target_plan, order)

    with WorkDirLock(work_dir / LOCK_FILE):
        state_path = work_dir / STATE_FILE
        state = read_state(state_path)
        if state is not None:
            check_same_run(state, identity, state_path)
        if data is None:
            data = load_distill_data(cfg)
        teacher_params = jax.tree_util.tree_map(jnp.asarray, teacher.params)
        params, records = resume_progress(work_dir, identity, teacher_params)
        if state is not None and "teacher_validation_accuracy" in state:
            teacher_validation = state["teacher_validation_accuracy"]
        else:
            teacher_validation = accuracy(
                predict_logits(teacher_params, config, teacher.plan, data.validation),
                data.validation.labels,
            )
        _write_state(work_dir, identity, records, len(stages), teacher_validation)
        if records:
            log.info("resuming %s: %d of %d stages already finished", work_dir, len(records),
                     len(stages))
        log.info("distilling %s into plan %r: layer order %s, %d training examples, teacher "
                 "validation accuracy %.4f", teacher_path, target_plan.name, list(order),
                 len(data.train), teacher_validation)

        for stage in stages[len(records):]:
            params, record = run_stage(stage, params, teacher, teacher_params, data, cfg)
            records.append(record)
            save_checkpoint(work_dir / PROGRESS_FILE,
                            progress_checkpoint(params, teacher, stage, identity, records))
            _write_state(work_dir, identity, records, len(stages), teacher_validation)
            if on_stage_end is not None:
                on_stage_end(record)

        report = _finish(work_dir, teacher_path, teacher, teacher_params, params, target_plan,
                         identity, records, teacher_validation, data)
    report["seconds_this_run"] = time.perf_counter() - started
    write_json(work_dir / REPORT_FILE, report)
    return report


def resume_progress(work_dir: Path, identity: dict,
                    teacher_params: Params) -> tuple[Params, list[dict]]:
    """Load the weights and records after the last finished stage, or start from the teacher."""
    path = work_dir / PROGRESS_FILE
    if not path.is_file():
        return teacher_params, []
    saved = load_checkpoint(path)
    progress = saved.metadata.get("distill", {})
    check_same_run(progress, identity, path)
    return jax.tree_util.tree_map(jnp.asarray, saved.params), list(progress["stages"])


def progress_checkpoint(params: Params, teacher: Checkpoint, stage: Stage, identity: dict,
                        records: list[dict]) -> Checkpoint:
    """Build the checkpoint of the student after ``stage``, with the run's identity and records."""
    metadata = {**teacher.metadata,
                "distill": {**identity, "completed_stages": len(records), "stages": records}}
    return Checkpoint(jax.tree_util.tree_map(np.asarray, params), teacher.config, stage.plan,
                      teacher.max_len, metadata)


def _finish(work_dir: Path, teacher_path: Path, teacher: Checkpoint, teacher_params: Params,
            params: Params, target_plan: OperatorPlan, identity: dict, records: list[dict],
            teacher_validation: float, data: DistillData) -> dict:
    """Write the student checkpoint and measure student and teacher on the test set."""
    config = teacher.config
    student_test = accuracy(predict_logits(params, config, target_plan, data.test),
                            data.test.labels)
    teacher_test = accuracy(predict_logits(teacher_params, config, teacher.plan, data.test),
                            data.test.labels)
    report = {
        "command": "cipherprompt distill",
        **identity,
        "teacher": {
            "path": str(teacher_path),
            "plan": teacher.plan.name,
            "validation_accuracy": teacher_validation,
            "test_accuracy": teacher_test,
        },
        "train_size": len(data.train),
        "validation_size": len(data.validation),
        "test_size": len(data.test),
        "validation_accuracy": records[-1]["validation_accuracy"],
        "test_accuracy": student_test,
        "measured_in": "plaintext float32 (JAX, CPU)",
        "stages": records,
        "stage_seconds": sum(record["seconds"] for record in records),
    }
    name = teacher.metadata.get("name", "bert-classifier")
    metadata = {
        **{key: value for key, value in teacher.metadata.items() if key != "history"},
        "name": f"{name}-{target_plan.name}",
        "teacher_weights_sha256": identity["teacher_weights_sha256"],
        "distill_report": {key: value for key, value in report.items() if key != "command"},
    }
    save_checkpoint(work_dir / STUDENT_FILE, Checkpoint(
        jax.tree_util.tree_map(np.asarray, params), config, target_plan, teacher.max_len,
        metadata,
    ))
    log.info("student %r: validation %.4f, test %.4f; teacher: validation %.4f, test %.4f "
             "(plaintext float32)", target_plan.name, report["validation_accuracy"],
             student_test, teacher_validation, teacher_test)
    return report


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``distill`` command to an argparse subparsers object."""
    defaults = DistillConfig()
    parser = subparsers.add_parser(
        "distill", help="distill the teacher into a student with a cheaper operator plan")
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work"),
                        help="folder for every output of the run; the student goes to "
                             "WORK_DIR/distill-PLAN/ (default: %(default)s)")
    parser.add_argument("--plan", default=defaults.plan,
                        help="target operator plan preset (default: %(default)s)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher checkpoint (default: WORK_DIR/teacher/teacher.npz)")
    parser.add_argument("--order", default=None,
                        help="comma-separated layer indices in substitution order "
                             "(default: the substituted layers bottom-up)")
    parser.add_argument("--steps-per-stage", type=int, default=defaults.steps_per_stage,
                        help="optimizer steps after each layer's switch (default: %(default)s)")
    parser.add_argument("--final-steps", type=int, default=defaults.final_steps,
                        help="optimizer steps of the final fine-tune (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="default: %(default)s")
    parser.add_argument("--stage-learning-rate", type=float,
                        default=defaults.stage_learning_rate, help="default: %(default)s")
    parser.add_argument("--final-learning-rate", type=float,
                        default=defaults.final_learning_rate, help="default: %(default)s")
    parser.add_argument("--hidden-weight", type=float, default=defaults.hidden_weight,
                        help="weight of the hidden-state MSE (default: %(default)s)")
    parser.add_argument("--attention-weight", type=float, default=defaults.attention_weight,
                        help="weight of the attention-map error (default: %(default)s)")
    parser.add_argument("--logit-weight", type=float, default=defaults.logit_weight,
                        help="weight of the logit KL (default: %(default)s)")
    parser.add_argument("--label-weight", type=float, default=defaults.label_weight,
                        help="weight of the label cross-entropy in the final fine-tune "
                             "(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="softmax temperature of the logit KL (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="split and training seed (default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N training examples (smoke tests)")
    parser.set_defaults(handler=cmd_distill)
    return parser


def cmd_distill(args: argparse.Namespace) -> int:
    """Run ``cipherprompt distill`` and print the student's accuracy next to the teacher's."""
    order = None
    if args.order:
        try:
            order = tuple(int(part) for part in args.order.split(","))
        except ValueError as error:
            raise ValueError(f"--order must be comma-separated layer indices such as 0,1,2; "
                             f"got {args.order!r}") from error
    cfg = DistillConfig(
        plan=args.plan, order=order, steps_per_stage=args.steps_per_stage,
        final_steps=args.final_steps, batch_size=args.batch_size,
        stage_learning_rate=args.stage_learning_rate,
        final_learning_rate=args.final_learning_rate, hidden_weight=args.hidden_weight,
        attention_weight=args.attention_weight, logit_weight=args.logit_weight,
        label_weight=args.label_weight, temperature=args.temperature, seed=args.seed,
        train_limit=args.train_limit,
    )
    teacher_path = args.teacher or args.work_dir / "teacher" / "teacher.npz"
    out_dir = args.work_dir / f"distill-{cfg.plan}"
    report = distill(out_dir, teacher_path, cfg)
    print(f"student {cfg.plan!r}: test accuracy {report['test_accuracy']:.4f} "
          f"(validation {report['validation_accuracy']:.4f}); teacher test accuracy "
          f"{report['teacher']['test_accuracy']:.4f} (plaintext float32); checkpoint "
          f"{out_dir / STUDENT_FILE}")
    return 0

