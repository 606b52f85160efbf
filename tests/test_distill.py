"""Layer-by-layer distillation on a tiny random teacher and small synthetic data sets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cipherprompt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig, init_params
from cipherprompt.plan import FRIENDLY_LAYER, OperatorPlan
from cipherprompt.train.batches import EncodedSet
from cipherprompt.train.distill import (
    LOCK_FILE,
    PROGRESS_FILE,
    REPORT_FILE,
    STATE_FILE,
    STUDENT_FILE,
    DistillConfig,
    DistillData,
    DistillError,
    WorkDirLock,
    build_stages,
    distill,
    substitution_order,
)

CONFIG = BertConfig(vocab_size=200, hidden_size=24, num_layers=2, num_heads=3,
                    intermediate_size=40, max_positions=32)
SEQ_LEN = 16
# Large learning rates and few steps: the tiny student moves visibly within one stage.
FAST = DistillConfig(plan="friendly", steps_per_stage=20, final_steps=6, batch_size=16,
                     stage_learning_rate=3e-3, final_learning_rate=1e-3, train_len=SEQ_LEN)


class StopAfterFirstStage(Exception):
    pass


def _synthetic_set(rng: np.random.Generator, size: int) -> EncodedSet:
    lengths = rng.integers(4, SEQ_LEN + 1, size)
    ids = np.zeros((size, SEQ_LEN), np.int32)
    mask = np.zeros((size, SEQ_LEN), np.float32)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, CONFIG.vocab_size, length)
        mask[row, :length] = 1.0
    # Label: whether low token ids outnumber high ones, so the labels depend on the tokens.
    low = ((ids < CONFIG.vocab_size // 2) & (mask > 0)).sum(axis=1)
    labels = (2 * low > lengths).astype(np.int32)
    return EncodedSet(ids, mask, labels)


@pytest.fixture(scope="module")
def data() -> DistillData:
    rng = np.random.default_rng(7)
    return DistillData(_synthetic_set(rng, 64), _synthetic_set(rng, 48),
                       _synthetic_set(rng, 32))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    # A larger initial scale than BERT's 0.02 spreads the attention scores, so 2Quad and
    # softmax differ clearly and the student has something to learn.
    params = init_params(CONFIG, seed=11, scale=0.3)
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)
    path = tmp_path_factory.mktemp("teacher") / "teacher.npz"
    save_checkpoint(path, Checkpoint(params, CONFIG, plan, SEQ_LEN,
                                     {"name": "tiny", "label_names": ["rotten", "fresh"]}))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, teacher_path, data):
    work_dir = tmp_path_factory.mktemp("full")
    report = distill(work_dir, teacher_path, FAST, data=data)
    return work_dir, report


def test_stages_cover_each_layer_then_finetune(full_run):
    _, report = full_run

    assert [stage["name"] for stage in report["stages"]] == ["layer0", "layer1", "finetune"]
    assert [stage["layer"] for stage in report["stages"]] == [0, 1, None]
    for stage in report["stages"]:
        assert 0.0 <= stage["validation_accuracy"] <= 1.0
        assert np.isfinite(stage["final_loss"])


def test_stage_plans_substitute_one_more_layer(full_run):
    _, report = full_run
    exact = OperatorPlan.preset("exact", CONFIG.num_layers).layers[0]
    first, second = (OperatorPlan.from_dict(stage["plan"]) for stage in report["stages"][:2])

    assert first.layers == (FRIENDLY_LAYER, exact)
    assert second.layers == (FRIENDLY_LAYER, FRIENDLY_LAYER)


def test_student_has_target_plan(full_run, teacher_path):
    work_dir, report = full_run
    student = load_checkpoint(work_dir / STUDENT_FILE)
    teacher = load_checkpoint(teacher_path)

    assert student.plan == OperatorPlan.preset("friendly", CONFIG.num_layers)
    assert student.config == CONFIG
    assert student.max_len == SEQ_LEN
    assert student.metadata["teacher_weights_sha256"] == teacher.weights_digest()
    assert student.metadata["label_names"] == ["rotten", "fresh"]
    assert student.metadata["distill_report"]["stages"] == report["stages"]
    assert student.weights_digest() != teacher.weights_digest()


def test_report_and_state_written(full_run):
    work_dir, report = full_run
    saved = json.loads((work_dir / REPORT_FILE).read_text())
    state = json.loads((work_dir / STATE_FILE).read_text())

    assert saved["test_accuracy"] == report["test_accuracy"]
    assert 0.0 <= saved["teacher"]["test_accuracy"] <= 1.0
    assert state["completed_stages"] == 3
    assert state["total_stages"] == 3
    assert not (work_dir / LOCK_FILE).exists()


def test_stage_reduces_hidden_distance(full_run):
    _, report = full_run
    first = report["stages"][0]

    assert first["probe_before"]["hidden"] > 0.0
    assert first["probe_after"]["hidden"] < 0.8 * first["probe_before"]["hidden"]
    assert first["probe_after"]["attention"] < first["probe_before"]["attention"]


def test_resume_skips_completed_stages(tmp_path, teacher_path, data, full_run):
    def stop(record):
        raise StopAfterFirstStage(record["name"])

    with pytest.raises(StopAfterFirstStage):
        distill(tmp_path, teacher_path, FAST, data=data, on_stage_end=stop)
    interrupted = json.loads((tmp_path / STATE_FILE).read_text())
    assert interrupted["completed_stages"] == 1
    assert (tmp_path / PROGRESS_FILE).is_file()
    assert not (tmp_path / STUDENT_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()

    rerun_stages = []
    report = distill(tmp_path, teacher_path, FAST, data=data,
                     on_stage_end=lambda record: rerun_stages.append(record["name"]))

    assert rerun_stages == ["layer1", "finetune"]
    assert report["stages"][0] == interrupted["stages"][0]
    # A fresh optimizer per stage and per-stage seeds make the resumed run equal to one that
    # never stopped.
    resumed = load_checkpoint(tmp_path / STUDENT_FILE).params
    uninterrupted = load_checkpoint(full_run[0] / STUDENT_FILE).params
    np.testing.assert_allclose(resumed["layers"][1]["query"]["kernel"],
                               uninterrupted["layers"][1]["query"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(resumed["classifier"]["kernel"],
                               uninterrupted["classifier"]["kernel"], atol=1e-5)


def test_finished_run_trains_no_stage(full_run, teacher_path, data):
    work_dir, report = full_run
    rerun_stages = []

    again = distill(work_dir, teacher_path, FAST, data=data,
                    on_stage_end=lambda record: rerun_stages.append(record["name"]))

    assert rerun_stages == []
    assert again["stages"] == report["stages"]
    assert again["test_accuracy"] == report["test_accuracy"]


def test_resume_with_other_settings_raises(full_run, teacher_path, data):
    work_dir, _ = full_run
    changed = DistillConfig(**{**FAST.__dict__, "steps_per_stage": 21})

    with pytest.raises(DistillError) as raised:
        distill(work_dir, teacher_path, changed, data=data)

    message = str(raised.value)
    assert "steps_per_stage: 20" in message
    assert "21 now" in message
    assert "another working directory" in message


def test_resume_with_other_teacher_raises(full_run, data, tmp_path):
    work_dir, _ = full_run
    other = tmp_path / "other.npz"
    save_checkpoint(other, Checkpoint(init_params(CONFIG, seed=12, scale=0.3), CONFIG,
                                      OperatorPlan.preset("exact", CONFIG.num_layers), SEQ_LEN))

    with pytest.raises(DistillError, match="teacher_weights_sha256"):
        distill(work_dir, other, FAST, data=data)


def test_unreadable_state_raises(tmp_path, teacher_path, data):
    (tmp_path / STATE_FILE).write_text("{not json")

    with pytest.raises(DistillError, match="unreadable"):
        distill(tmp_path, teacher_path, FAST, data=data)

    assert not (tmp_path / LOCK_FILE).exists()


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_lock_of_live_process_raises(tmp_path, teacher_path, data, live_process):
    (tmp_path / LOCK_FILE).write_text(f"{live_process}\n")

    with pytest.raises(DistillError) as raised:
        distill(tmp_path, teacher_path, FAST, data=data)

    assert str(live_process) in str(raised.value)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(live_process)
    assert not (tmp_path / STATE_FILE).exists()


def test_stale_lock_taken_over(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    lock_path = tmp_path / LOCK_FILE
    lock_path.write_text(f"{dead_pid}\n")

    with caplog.at_level(logging.WARNING), WorkDirLock(lock_path):
        holder = lock_path.read_text().strip()

    assert holder == str(os.getpid())
    assert str(dead_pid) in caplog.text
    assert not lock_path.exists()


def test_unknown_plan_lists_presets():
    with pytest.raises(ValueError) as raised:
        DistillConfig(plan="fast")

    message = str(raised.value)
    assert "'fast'" in message
    assert "friendly-first-K" in message
    assert "exact" in message


def test_plan_longer_than_teacher_raises(tmp_path, teacher_path, data):
    plan = OperatorPlan.preset("friendly", CONFIG.num_layers + 1)

    with pytest.raises(ValueError, match="has 3 layers, but the teacher"):
        distill(tmp_path, teacher_path, FAST, data=data, target_plan=plan)


def test_friendly_first_beyond_teacher_raises(tmp_path, teacher_path, data):
    cfg = DistillConfig(**{**FAST.__dict__, "plan": "friendly-first-3"})

    with pytest.raises(ValueError, match="friendly-first-3.*model has 2"):
        distill(tmp_path, teacher_path, cfg, data=data)


def test_default_order_skips_unchanged_layers():
    exact = OperatorPlan.preset("exact", 4)
    target = OperatorPlan.preset("friendly-first-2", 4)

    order = substitution_order(exact, target, None)
    stages = build_stages(exact, target, order)

    assert order == (0, 1)
    assert [stage.layer for stage in stages] == [0, 1, None]
    assert stages[-1].plan == target


@pytest.mark.parametrize("order, fragment", [
    ((0, 4), "names layers [4]"),
    ((1,), "leaves out layers [0, 2, 3]"),
])
def test_invalid_order_raises(order, fragment):
    exact = OperatorPlan.preset("exact", 4)
    target = OperatorPlan.preset("friendly", 4)

    with pytest.raises(ValueError) as raised:
        substitution_order(exact, target, order)

    assert fragment in str(raised.value)


@pytest.mark.parametrize("field, value", [
    ("order", (1, 1)),
    ("order", (-1,)),
    ("batch_size", 0),
    ("steps_per_stage", -1),
    ("stage_learning_rate", 0.0),
    ("temperature", 0.0),
    ("hidden_weight", -1.0),
    ("train_limit", 0),
])
def test_config_rejects_invalid_value(field, value):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})
