"""Layer-by-layer distillation of a friendly decoder from the exact one, on Hamlet.

The student starts as a copy of the teacher (the exact decoder). Stages run in this order:

1. One stage per layer whose operators differ in the target plan, bottom-up. The stage switches
   that layer to the target operators and trains only that layer, with the layers below frozen.
   The student layer runs on the student's own hidden states at that layer, and its output
   should match the teacher's output of the same layer on every training window. The loss is
   the relative squared error per token, |s - t|^2 / |t|^2, averaged over tokens. Tokens whose
   hidden states are a thousand times larger than others (SmolLM2 has such tokens from layer
   12 on) then do not dominate. Both sides' hidden states at the layer's input are kept in
   memory for all training windows and advanced by one layer per stage, so a step costs one
   layer's forward and backward pass, not the whole model's.
2. End-to-end: the whole student (the parameters that ``final_trainable`` names) minimises the
   KL divergence from the teacher's next-token distribution to the student's at every
   position, with a softmax temperature. It also switches the final normaliser if the target
   plan changes it.

The teacher is a decoder checkpoint (``decoder_checkpoint``); the text is Hamlet, split by
position (``corpus``). Every output goes to one working directory:

- ``distill-state.json``: settings, teacher and data identity, and every finished stage,
- ``distill-progress.npz``: the student after the last finished stage, so a rerun with the
  same settings continues after it,
- ``student.npz`` (target plan) and ``distill-report.json`` with each stage's held-out
  perplexity,
- ``distill.lock``: the PID of the run that uses the directory.

Each stage starts a fresh optimizer and draws batches from a generator seeded by (seed, stage
index), and the kept hidden states are recomputed from the saved weights on resume, so a
resumed run repeats the remaining stages as an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from cipherprompt.checkpoint import Checkpoint, save_checkpoint
from cipherprompt.corpus import DEFAULT_HELD_OUT_FRACTION, load_hamlet_split, windows
from cipherprompt.decoder_checkpoint import (
    DEFAULT_SEQ_LEN,
    exact_checkpoint,
    load_decoder_checkpoint,
)
from cipherprompt.files import write_json
from cipherprompt.models.llama import Params
from cipherprompt.perplexity import WindowRunner, perplexity_of
from cipherprompt.plan import LayerPlan, OperatorPlan
from cipherprompt.train.distill import (
    LOCK_FILE,
    PROGRESS_FILE,
    REPORT_FILE,
    STATE_FILE,
    STUDENT_FILE,
    WorkDirLock,
    check_same_run,
    make_stage_optimizer,
    progress_checkpoint,
    read_state,
    resume_progress,
)
from cipherprompt.train.teacher import progress_interval

log = logging.getLogger(__name__)

END_TO_END_STAGE = "end-to-end"
# Windows per forward pass when the kept hidden states advance by one layer. Fixed, so that a
# resumed run computes them in the same batches as an uninterrupted one.
ADVANCE_BATCH = 16
# Windows per batch of the held-out perplexity.
EVAL_BATCH = 4
# Names of the trainable parameter sets of the end-to-end stage, and the layer entries in each.
# The embedding table (also the output head of tied models) is never trained.
TRAINABLE_SETS = {
    "layers": None,  # every layer parameter, and the final norm
    "mlp-norms": ("gate", "up", "down", "attention_norm", "mlp_norm"),
    "norms": ("attention_norm", "mlp_norm"),
}

_LAYERS_FOR_NAME_CHECK = 1024


@dataclass(frozen=True)
class DecoderDistillConfig:
    # Target operator plan preset; it must be a decoder plan, such as "decoder-friendly".
    plan: str = "decoder-friendly"
    # Tokens per training and evaluation window.
    seq_len: int = DEFAULT_SEQ_LEN
    # Share of the text, at its end, held out for evaluation.
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION
    # Use only the first N training windows (smoke tests); None uses all of them.
    train_windows: int | None = None
    # Optimizer steps, windows per batch and peak learning rate of each layer stage.
    layer_steps: int = 60
    layer_batch_size: int = 8
    layer_learning_rate: float = 2e-4
    # The same for the end-to-end stage, and the parameters it trains (a TRAINABLE_SETS key).
    final_steps: int = 40
    final_batch_size: int = 4
    final_learning_rate: float = 2e-5
    final_trainable: str = "layers"
    # Share of each stage's steps with a linear learning-rate warm-up, after which the rate
    # decays linearly to 0.
    warmup_fraction: float = 0.1
    # AdamW weight decay; 0 keeps the pretrained weights from being pulled towards 0.
    weight_decay: float = 0.0
    # Softmax temperature of the end-to-end KL, which is multiplied by temperature^2.
    temperature: float = 1.0
    # Held-out windows (the first ones) on which each stage's perplexity is measured; None
    # measures all. The whole held-out part is measured for the teacher and the final student.
    probe_windows: int | None = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("layer_batch_size", "final_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
        for field in ("layer_steps", "final_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be at least 0, got {getattr(self, field)}")

        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        for field in ("train_windows", "probe_windows"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field} must be at least 1 or None, got {value}")
        for field in ("layer_learning_rate", "final_learning_rate"):
            if not 0 < getattr(self, field) < 1:
                raise ValueError(f"{field} must be in (0, 1), got {getattr(self, field)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

        if self.final_trainable not in TRAINABLE_SETS:
            raise ValueError(f"invalid final_trainable {self.final_trainable!r}; valid choices: "
                             f"{', '.join(TRAINABLE_SETS)}")
        # Raises listing the valid presets for an unknown name; the layer count is checked
        # against the teacher when the run starts.
        plan = OperatorPlan.preset(self.plan, _LAYERS_FOR_NAME_CHECK)
        if not plan.is_decoder:
            raise ValueError(
                f"operator plan {self.plan!r} is not a decoder plan (it has an embedding "
                "normaliser and no final normaliser); use decoder-friendly, or a decoder "
                "preset with overrides such as decoder-exact+activation=hard_swish"
            )

    def to_json_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class DecoderData:
    """Token windows [count, seq_len] for training and held-out evaluation."""

    train: np.ndarray
    held_out: np.ndarray
    # Description of the split, for the report.
    split: dict

    def digest(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.held_out):
            digest.update(str(part.shape).encode())
            digest.update(np.ascontiguousarray(part, np.int32).tobytes())
        return digest.hexdigest()


def load_decoder_data(cfg: DecoderDistillConfig) -> DecoderData:
    """Tokenize Hamlet, split it by position and cut both parts into windows."""
    split = load_hamlet_split(cfg.held_out_fraction)
    return DecoderData(windows(split.train, cfg.seq_len, cfg.train_windows),
                       windows(split.held_out, cfg.seq_len), split.describe())


# ---------------------------------------------------------------------------------------------
# Stages.


@dataclass(frozen=True)
class DecoderStage:
    index: int
    # Layer that this stage substitutes and trains, or None for the end-to-end stage.
    layer: int | None
    # The student's plan after this stage.
    plan: OperatorPlan

    @property
    def name(self) -> str:
        return END_TO_END_STAGE if self.layer is None else f"layer{self.layer}"


def build_decoder_stages(teacher_plan: OperatorPlan,
                         target_plan: OperatorPlan) -> list[DecoderStage]:
    """Build one stage per layer whose operators differ, bottom-up, then the end-to-end stage."""
    if not target_plan.is_decoder:
        raise ValueError(f"operator plan {target_plan.name!r} is not a decoder plan")
    if target_plan.num_layers != teacher_plan.num_layers:
        raise ValueError(f"target plan {target_plan.name!r} has {target_plan.num_layers} "
                         f"layers, but the teacher has {teacher_plan.num_layers}")
    differing = [index for index, (old, new) in
                 enumerate(zip(teacher_plan.layers, target_plan.layers)) if old != new]
    if not differing and target_plan.final_normaliser == teacher_plan.final_normaliser:
        raise ValueError(f"target plan {target_plan.name!r} has the teacher's operators in "
                         "every layer: there is nothing to distill")
    stages = []
    layers = list(teacher_plan.layers)
    for index, layer in enumerate(differing):
        layers[layer] = target_plan.layers[layer]
        plan = OperatorPlan(f"{target_plan.name}-partial-{index + 1}of{len(differing)}",
                            tuple(layers), None, teacher_plan.final_normaliser)
        stages.append(DecoderStage(index, layer, plan))
    stages.append(DecoderStage(len(differing), None, target_plan))
    return stages


# ---------------------------------------------------------------------------------------------
# Losses.


def relative_error(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean over tokens of |s - t|^2 / |t|^2, each token a row of the last axis."""
    squared = jnp.sum(jnp.square(student - teacher), axis=-1)
    scale = jnp.sum(jnp.square(teacher), axis=-1)
    return jnp.mean(squared / jnp.maximum(scale, 1e-12))


def next_token_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float) -> jax.Array:
    """Mean over positions of KL(teacher || student) at ``temperature``, times temperature^2."""
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return jnp.mean(kl) * temperature**2


# ---------------------------------------------------------------------------------------------
# Hidden states kept between layer stages.


class LayerInputs:
    """Hidden states of the teacher and the student at the input of layer ``layer``.

    They are kept for a fixed set of windows, [windows, seq_len, hidden] each, and advanced one
    layer at a time with each side's weights and operators.
    """

    def __init__(self, runner: WindowRunner, teacher_params: Params, student_params: Params,
                 ids: np.ndarray):
        self.runner = runner
        self.teacher = runner.embed(teacher_params, ids)
        self.student = runner.embed(student_params, ids)
        self.layer = 0

    def apply(self, layer_params: Params, layer_plan, states: jax.Array) -> jax.Array:
        """Run one layer over ``states`` in fixed batches of ADVANCE_BATCH windows."""
        function = self.runner.layer_function(layer_plan)
        return jnp.concatenate([function(layer_params, states[start:start + ADVANCE_BATCH])
                                for start in range(0, len(states), ADVANCE_BATCH)])

    def advance(self, teacher_params: Params, teacher_plan: OperatorPlan,
                student_params: Params | None, student_plan: OperatorPlan | None,
                teacher_output: jax.Array | None = None) -> None:
        """Move both sides through layer ``self.layer``; the student side only if given.

        ``teacher_output`` is the teacher's output of this layer when already computed.
        """
        index = self.layer
        if teacher_output is None:
            teacher_output = self.apply(teacher_params["layers"][index],
                                        teacher_plan.layers[index], self.teacher)
        self.teacher = teacher_output
        if student_params is not None:
            self.student = self.apply(student_params["layers"][index],
                                      student_plan.layers[index], self.student)
        self.layer += 1

    def advance_to(self, layer: int, teacher_params: Params, teacher_plan: OperatorPlan,
                   student_params: Params | None, student_plan: OperatorPlan | None) -> None:
        while self.layer < layer:
            self.advance(teacher_params, teacher_plan, student_params, student_plan)


# ---------------------------------------------------------------------------------------------
# State shared by the stages.


@dataclass
class RunContext:
    cfg: DecoderDistillConfig
    teacher: Checkpoint
    teacher_params: Params
    runner: WindowRunner
    data: DecoderData
    probe_ids: np.ndarray
    # (optimizer, train step, distance) of a layer stage per operator choice. Every layer
    # stage has the same optimizer settings, so stages with the same operators share one
    # compilation.
    layer_functions: dict = field(default_factory=dict)

    def layer_stage_functions(self, layer_plan: LayerPlan):
        """Return (optimizer, jitted train step, jitted distance) of a layer stage."""
        if layer_plan not in self.layer_functions:
            runner, cfg = self.runner, self.cfg
            optimizer = make_stage_optimizer(cfg.layer_steps, cfg.layer_learning_rate, cfg)

            def distance(layer_params, inputs, targets):
                outputs = runner.apply_layer(layer_params, layer_plan, inputs)
                return relative_error(outputs, targets)

            def train_step(layer_params, opt_state, inputs, targets):
                loss, grads = jax.value_and_grad(distance)(layer_params, inputs, targets)
                updates, opt_state = optimizer.update(grads, opt_state, layer_params)
                return optax.apply_updates(layer_params, updates), opt_state, loss

            self.layer_functions[layer_plan] = (optimizer, jax.jit(train_step),
                                                jax.jit(distance))
        return self.layer_functions[layer_plan]

    def probe_perplexity(self, params: Params, plan: OperatorPlan,
                         probe_inputs: LayerInputs | None = None) -> float:
        """Held-out perplexity on the probe windows; from the kept states when given."""
        if probe_inputs is None:
            nll, _ = self.runner.window_statistics(params, plan, self.probe_ids,
                                                   batch=EVAL_BATCH)
        else:
            nll, _ = self.runner.window_statistics(params, plan, self.probe_ids,
                                                   probe_inputs.student, probe_inputs.layer,
                                                   batch=EVAL_BATCH)
        return perplexity_of(nll)


def _batch_rows(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Draw a batch of distinct window indices, sorted so that gathers read memory in order."""
    return np.sort(rng.choice(count, size=min(size, count), replace=False))


def _train_loop(steps: int, description: str, step: Callable[[np.ndarray], float],
                rng: np.random.Generator, count: int, batch_size: int) -> float | None:
    """Call ``step(rows)`` ``steps`` times with a progress bar; return the last 10 losses' mean."""
    recent: deque[float] = deque(maxlen=10)
    with tqdm(total=steps, desc=description, unit="step",
              mininterval=progress_interval()) as progress:
        for _ in range(steps):
            recent.append(step(_batch_rows(rng, count, batch_size)))
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(recent):.4g}", refresh=False)
    return float(np.mean(recent)) if recent else None


def _with_layer(params: Params, index: int, layer_params: Params) -> Params:
    layers = list(params["layers"])
    layers[index] = layer_params
    return {**params, "layers": layers}


# ---------------------------------------------------------------------------------------------
# One layer stage.


def run_layer_stage(stage: DecoderStage, params: Params, train_inputs: LayerInputs,
                    probe_inputs: LayerInputs, context: RunContext) -> tuple[Params, dict]:
    """Switch one layer to the target operators, train it alone, and advance the kept states."""
    started = time.perf_counter()
    cfg, teacher, teacher_params = context.cfg, context.teacher, context.teacher_params
    index = stage.layer

    # The teacher's outputs of this layer: the targets now, the next layer's inputs later.
    teacher_layer = teacher_params["layers"][index]
    train_targets = train_inputs.apply(teacher_layer, teacher.plan.layers[index],
                                       train_inputs.teacher)
    probe_targets = probe_inputs.apply(teacher_layer, teacher.plan.layers[index],
                                       probe_inputs.teacher)

    optimizer, train_step, distance = context.layer_stage_functions(stage.plan.layers[index])
    layer_params = params["layers"][index]
    record: dict = {
        "index": stage.index,
        "name": stage.name,
        "layer": index,
        "plan": stage.plan.to_dict(),
        "steps": cfg.layer_steps,
        "learning_rate": cfg.layer_learning_rate,
        "probe_distance_before": float(distance(layer_params, probe_inputs.student,
                                                probe_targets)),
    }
    opt_state = optimizer.init(layer_params)

    def step(rows: np.ndarray) -> float:
        nonlocal layer_params, opt_state
        layer_params, opt_state, loss = train_step(layer_params, opt_state,
                                                   train_inputs.student[rows],
                                                   train_targets[rows])
        return float(loss)

    record["final_loss"] = _train_loop(cfg.layer_steps, f"distill {stage.name}", step,
                                       np.random.default_rng([cfg.seed, stage.index]),
                                       len(train_targets), cfg.layer_batch_size)
    params = _with_layer(params, index, layer_params)
    record["probe_distance_after"] = float(distance(layer_params, probe_inputs.student,
                                                    probe_targets))

    # The kept states move past this layer: the teacher's to the outputs computed above, the
    # student's through the trained layer.
    train_inputs.advance(teacher_params, teacher.plan, params, stage.plan, train_targets)
    probe_inputs.advance(teacher_params, teacher.plan, params, stage.plan, probe_targets)
    record["probe_perplexity"] = context.probe_perplexity(params, stage.plan, probe_inputs)
    record["seconds"] = time.perf_counter() - started
    log.info("stage %d (%s): probe distance %.4g -> %.4g, probe perplexity %.3f, %.0f s",
             stage.index, stage.name, record["probe_distance_before"],
             record["probe_distance_after"], record["probe_perplexity"], record["seconds"])
    return params, record


# ---------------------------------------------------------------------------------------------
# The end-to-end stage.


def split_trainable(params: Params, trainable: str) -> tuple[Params, Params]:
    """Split ``params`` into (trainable, frozen) trees by the TRAINABLE_SETS entry ``trainable``.

    The final norm is always trainable and the embedding table (and an untied head) never is.
    """
    names = TRAINABLE_SETS[trainable]
    train_layers, frozen_layers = [], []
    for layer in params["layers"]:
        selected = {key: value for key, value in layer.items() if names is None or key in names}
        train_layers.append(selected)
        frozen_layers.append({key: value for key, value in layer.items() if key not in selected})
    frozen = {key: value for key, value in params.items() if key not in ("layers", "final_norm")}
    frozen["layers"] = frozen_layers
    return {"layers": train_layers, "final_norm": params["final_norm"]}, frozen


def merge_trainable(trainable: Params, frozen: Params) -> Params:
    layers = [{**fixed, **trained} for fixed, trained in zip(frozen["layers"], trainable["layers"])]
    return {**frozen, "layers": layers, "final_norm": trainable["final_norm"]}


def _head_params(params: Params) -> Params:
    return {key: value for key, value in params.items() if key != "layers"}


def run_end_to_end_stage(stage: DecoderStage, params: Params, train_inputs: LayerInputs,
                         probe_inputs: LayerInputs, context: RunContext) -> tuple[Params, dict]:
    """Train the whole student on the teacher's next-token distributions."""
    started = time.perf_counter()
    cfg, teacher, teacher_params = context.cfg, context.teacher, context.teacher_params
    runner = context.runner
    num_layers = teacher.config.num_layers
    # Only the teacher's last hidden states are needed from here on.
    for inputs in (train_inputs, probe_inputs):
        inputs.advance_to(num_layers, teacher_params, teacher.plan, None, None)
    teacher_head = _head_params(teacher_params)

    # Every array enters the jitted functions as an argument: a captured array would become a
    # constant of the program, and XLA spent minutes folding the embedding table.
    def loss_fn(trainable, frozen, teacher_head, ids, teacher_states):
        student = merge_trainable(trainable, frozen)
        x = runner.run_layers(student, stage.plan, runner.embed(student, ids))
        student_logits = runner.logits(student, stage.plan, x)
        teacher_logits = runner.logits(teacher_head, teacher.plan, teacher_states)
        return next_token_kl(student_logits, jax.lax.stop_gradient(teacher_logits),
                             cfg.temperature)

    trainable, frozen = split_trainable(params, cfg.final_trainable)
    probe_loss = jax.jit(loss_fn)

    def probe_kl(trainable) -> float:
        total = 0.0
        for start in range(0, len(context.probe_ids), EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            count = len(context.probe_ids[rows])
            total += count * float(probe_loss(trainable, frozen, teacher_head,
                                              context.probe_ids[rows],
                                              probe_inputs.teacher[rows]))
        return total / len(context.probe_ids)

    record: dict = {
        "index": stage.index,
        "name": stage.name,
        "layer": None,
        "plan": stage.plan.to_dict(),
        "steps": cfg.final_steps,
        "learning_rate": cfg.final_learning_rate,
        "trainable": cfg.final_trainable,
        "probe_kl_before": probe_kl(trainable),
    }
    optimizer = make_stage_optimizer(cfg.final_steps, cfg.final_learning_rate, cfg)
    opt_state = optimizer.init(trainable)

    @jax.jit
    def train_step(trainable, opt_state, frozen, teacher_head, ids, teacher_states):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, teacher_head, ids,
                                                  teacher_states)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    train_ids = context.data.train

    def step(rows: np.ndarray) -> float:
        nonlocal trainable, opt_state
        trainable, opt_state, loss = train_step(trainable, opt_state, frozen, teacher_head,
                                                train_ids[rows], train_inputs.teacher[rows])
        return float(loss)

    record["final_loss"] = _train_loop(cfg.final_steps, f"distill {stage.name}", step,
                                       np.random.default_rng([cfg.seed, stage.index]),
                                       len(train_ids), cfg.final_batch_size)
    record["probe_kl_after"] = probe_kl(trainable)
    params = merge_trainable(trainable, frozen)
    record["probe_perplexity"] = context.probe_perplexity(params, stage.plan)
    record["seconds"] = time.perf_counter() - started
    log.info("stage %d (%s): probe KL %.4g -> %.4g, probe perplexity %.3f, %.0f s",
             stage.index, stage.name, record["probe_kl_before"], record["probe_kl_after"],
             record["probe_perplexity"], record["seconds"])
    return params, record


# ---------------------------------------------------------------------------------------------
# The whole run.


def distill_decoder(
    work_dir: Path,
    teacher_path: Path,
    cfg: DecoderDistillConfig = DecoderDistillConfig(),
    *,
    data: DecoderData | None = None,
    on_stage_end: Callable[[dict], None] | None = None,
) -> dict:
    """Distill the decoder at ``teacher_path`` into a student with the plan ``cfg.plan``.

    ``data`` replaces the Hamlet windows (tests pass windows of a tiny vocabulary).
    ``on_stage_end`` is called with each stage's record after its checkpoint is written.
    Finished stages of an earlier run in ``work_dir`` with the same settings are skipped.
    Returns the report that is also written to ``distill-report.json``.
    """
    started = time.perf_counter()
    work_dir = Path(work_dir)
    teacher = load_decoder_checkpoint(teacher_path)
    target_plan = OperatorPlan.preset(cfg.plan, teacher.config.num_layers)
    stages = build_decoder_stages(teacher.plan, target_plan)

    with WorkDirLock(work_dir / LOCK_FILE):
        state_path = work_dir / STATE_FILE
        state = read_state(state_path)
        if data is None:
            data = load_decoder_data(cfg)
        identity = {
            "config": cfg.to_json_dict(),
            "teacher_weights_sha256": teacher.weights_digest(),
            "target_plan": target_plan.to_dict(),
            "order": [stage.layer for stage in stages[:-1]],
            "data_sha256": data.digest(),
        }
        if state is not None:
            check_same_run(state, identity, state_path)
        teacher_params = jax.tree_util.tree_map(jnp.asarray, teacher.params)
        params, records = resume_progress(work_dir, identity, teacher_params)
        runner = WindowRunner(teacher.config, cfg.seq_len)
        context = RunContext(cfg, teacher, teacher_params, runner, data,
                             data.held_out[: cfg.probe_windows])
        teacher_figures = _teacher_figures(state, context, target_plan)
        _write_state(work_dir, identity, records, len(stages), teacher_figures)
        if records:
            log.info("resuming %s: %d of %d stages already finished", work_dir, len(records),
                     len(stages))
        log.info("distilling %s into plan %r: layers %s, %d training windows of %d tokens; "
                 "teacher held-out perplexity %.3f, probe perplexity %.3f (%.3f with the target "
                 "operators before distillation)", teacher_path, target_plan.name,
                 identity["order"], len(data.train), cfg.seq_len,
                 teacher_figures["held_out_perplexity"], teacher_figures["probe_perplexity"],
                 teacher_figures["undistilled_probe_perplexity"])

        train_inputs = LayerInputs(runner, teacher_params, params, data.train)
        probe_inputs = LayerInputs(runner, teacher_params, params, context.probe_ids)
        for stage in stages[len(records):]:
            if stage.layer is None:
                params, record = run_end_to_end_stage(stage, params, train_inputs, probe_inputs,
                                                      context)
            else:
                # Layers below this one are final: bring the kept states up to it.
                for inputs in (train_inputs, probe_inputs):
                    inputs.advance_to(stage.layer, teacher_params, teacher.plan, params,
                                      stage.plan)
                params, record = run_layer_stage(stage, params, train_inputs, probe_inputs,
                                                 context)
            records.append(record)
            save_checkpoint(work_dir / PROGRESS_FILE,
                            progress_checkpoint(params, teacher, stage, identity, records))
            _write_state(work_dir, identity, records, len(stages), teacher_figures)
            if on_stage_end is not None:
                on_stage_end(record)

        report = _finish(work_dir, teacher_path, context, params, target_plan, identity,
                         records, teacher_figures)
    report["seconds_this_run"] = time.perf_counter() - started
    write_json(work_dir / REPORT_FILE, report)
    return report


def _teacher_figures(state: dict | None, context: RunContext,
                     target_plan: OperatorPlan) -> dict:
    """Perplexities before any training: from the state file, or measured now.

    The teacher's on the whole held-out part and on the probe windows, and on the probe windows
    the teacher's weights with the target plan's operators (the student before distillation).
    """
    if state is not None and "teacher" in state:
        return state["teacher"]
    runner, teacher_params = context.runner, context.teacher_params
    nll, _ = runner.window_statistics(teacher_params, context.teacher.plan,
                                      context.data.held_out, batch=EVAL_BATCH)
    undistilled, _ = runner.window_statistics(teacher_params, target_plan, context.probe_ids,
                                              batch=EVAL_BATCH)
    return {
        "held_out_perplexity": perplexity_of(nll),
        "probe_perplexity": perplexity_of(nll[: len(context.probe_ids)]),
        "undistilled_probe_perplexity": perplexity_of(undistilled),
    }


def _write_state(work_dir: Path, identity: dict, records: list[dict], total_stages: int,
                 teacher_figures: dict) -> None:
    write_json(work_dir / STATE_FILE, {
        **identity,
        "teacher": teacher_figures,
        "completed_stages": len(records),
        "total_stages": total_stages,
        "stages": records,
    })


def _finish(work_dir: Path, teacher_path: Path, context: RunContext, params: Params,
            target_plan: OperatorPlan, identity: dict, records: list[dict],
            teacher_figures: dict) -> dict:
    """Measure the student on the whole held-out part and write its checkpoint."""
    teacher, data = context.teacher, context.data
    nll, _ = context.runner.window_statistics(params, target_plan, data.held_out,
                                              batch=EVAL_BATCH)
    student_perplexity = perplexity_of(nll)
    report = {
        "command": "cipherprompt distill-decoder",
        **identity,
        "teacher": {
            "path": str(teacher_path),
            "plan": teacher.plan.name,
            "held_out_perplexity": teacher_figures["held_out_perplexity"],
            "probe_perplexity": teacher_figures["probe_perplexity"],
        },
        # The teacher's weights with the target operators: where the first stage starts from.
        "undistilled_probe_perplexity": teacher_figures["undistilled_probe_perplexity"],
        "data": {
            **data.split,
            "seq_len": context.cfg.seq_len,
            "train_windows": int(len(data.train)),
            "held_out_windows": int(len(data.held_out)),
            "probe_windows": int(len(context.probe_ids)),
        },
        "held_out_perplexity": student_perplexity,
        "perplexity_ratio": student_perplexity / teacher_figures["held_out_perplexity"],
        "measured_in": "plaintext float32 (JAX, CPU)",
        "stages": records,
        "stage_seconds": sum(record["seconds"] for record in records),
    }
    name = teacher.metadata.get("name", "llama-decoder")
    metadata = {
        **teacher.metadata,
        "name": f"{name}-{target_plan.name}",
        "teacher_weights_sha256": identity["teacher_weights_sha256"],
        "distill_report": {key: value for key, value in report.items() if key != "command"},
    }
    save_checkpoint(work_dir / STUDENT_FILE, Checkpoint(
        jax.tree_util.tree_map(np.asarray, params), teacher.config, target_plan,
        teacher.max_len, metadata,
    ))
    log.info("student %r: held-out perplexity %.3f, teacher %.3f (ratio %.3f, plaintext "
             "float32)", target_plan.name, student_perplexity,
             teacher_figures["held_out_perplexity"], report["perplexity_ratio"])
    return report


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``distill-decoder`` command to an argparse subparsers object."""
    defaults = DecoderDistillConfig()
    parser = subparsers.add_parser(
        "distill-decoder",
        help="distill a decoder with a cheaper operator plan from the exact decoder, on Hamlet",
        description="Distill the exact SmolLM2 decoder into a student with the plan's operators: "
                    "one stage per substituted layer (hidden states), then one end-to-end "
                    "stage (next-token KL). Rerunning with the same settings and --work-dir "
                    "resumes after the last finished stage.",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work"),
                        help="folder for every output of the run; the student goes to "
                             "WORK_DIR/distill-decoder-PLAN/ (default: %(default)s)")
    parser.add_argument("--plan", default=defaults.plan,
                        help="target decoder plan preset (default: %(default)s)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="exact decoder checkpoint (default: WORK_DIR/decoder/"
                             "decoder-exact.npz, imported from the GGUF file if missing)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help="tokens per window (default: %(default)s)")
    parser.add_argument("--train-windows", type=int, default=None,
                        help="use only the first N training windows (default: all)")
    parser.add_argument("--layer-steps", type=int, default=defaults.layer_steps,
                        help="optimizer steps per layer stage (default: %(default)s)")
    parser.add_argument("--layer-batch-size", type=int, default=defaults.layer_batch_size,
                        help="windows per layer-stage step (default: %(default)s)")
    parser.add_argument("--layer-learning-rate", type=float,
                        default=defaults.layer_learning_rate, help="default: %(default)s")
    parser.add_argument("--final-steps", type=int, default=defaults.final_steps,
                        help="optimizer steps of the end-to-end stage (default: %(default)s)")
    parser.add_argument("--final-batch-size", type=int, default=defaults.final_batch_size,
                        help="windows per end-to-end step (default: %(default)s)")
    parser.add_argument("--final-learning-rate", type=float,
                        default=defaults.final_learning_rate, help="default: %(default)s")
    parser.add_argument("--final-trainable", default=defaults.final_trainable,
                        choices=list(TRAINABLE_SETS),
                        help="parameters the end-to-end stage trains: every layer parameter, "
                             "the feed-forward kernels and norm gains, or the norm gains only "
                             "(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="softmax temperature of the end-to-end KL (default: %(default)s)")
    parser.add_argument("--probe-windows", type=int, default=defaults.probe_windows,
                        help="held-out windows for each stage's perplexity (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="batch order seed (default: %(default)s)")
    parser.set_defaults(handler=cmd_distill_decoder)
    return parser


def cmd_distill_decoder(args: argparse.Namespace) -> int:
    """Run ``cipherprompt distill-decoder`` and print the student's perplexity."""
    cfg = DecoderDistillConfig(
        plan=args.plan, seq_len=args.seq_len, train_windows=args.train_windows,
        layer_steps=args.layer_steps, layer_batch_size=args.layer_batch_size,
        layer_learning_rate=args.layer_learning_rate, final_steps=args.final_steps,
        final_batch_size=args.final_batch_size, final_learning_rate=args.final_learning_rate,
        final_trainable=args.final_trainable, temperature=args.temperature,
        probe_windows=args.probe_windows, seed=args.seed,
    )
    teacher_path = exact_checkpoint(args.work_dir, args.teacher)
    out_dir = args.work_dir / f"distill-decoder-{cfg.plan}"
    report = distill_decoder(out_dir, teacher_path, cfg)
    print(f"student {cfg.plan!r}: held-out perplexity {report['held_out_perplexity']:.3f}, "
          f"teacher {report['teacher']['held_out_perplexity']:.3f} (ratio "
          f"{report['perplexity_ratio']:.3f}, plaintext float32); checkpoint "
          f"{out_dir / STUDENT_FILE}")
    return 0
