"""Decoder distillation on a tiny random Llama-shaped decoder and random token windows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cipherprompt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig
from cipherprompt.models.bert import init_params as init_bert_params
from cipherprompt.models.llama import LlamaConfig, forward, init_params
from cipherprompt.plan import DECODER_EXACT_LAYER, DECODER_FRIENDLY_LAYER, OperatorPlan
from cipherprompt.train.decoder_distill import (
    LOCK_FILE,
    PROGRESS_FILE,
    REPORT_FILE,
    STATE_FILE,
    STUDENT_FILE,
    DecoderData,
    DecoderDistillConfig,
    build_decoder_stages,
    distill_decoder,
    merge_trainable,
    relative_error,
    split_trainable,
)
from cipherprompt.train.distill import DistillError

# Distinct sizes, so a transposed axis cannot pass: 6 query heads of size 6 in 2 groups of 3.
CONFIG = LlamaConfig(vocab_size=53, hidden_size=36, num_layers=3, num_heads=6, num_kv_heads=2,
                     intermediate_size=44, max_positions=64, rope_theta=10000.0)
SEQ_LEN = 16
# Large learning rates: the tiny student moves visibly within a few dozen steps.
FAST = DecoderDistillConfig(seq_len=SEQ_LEN, layer_steps=40, layer_batch_size=8,
                            layer_learning_rate=1e-3, final_steps=24, final_batch_size=8,
                            final_learning_rate=1e-4, probe_windows=16)


class StopAfterFirstStage(Exception):
    pass


@pytest.fixture(scope="module")
def data() -> DecoderData:
    rng = np.random.default_rng(5)
    return DecoderData(rng.integers(0, CONFIG.vocab_size, (160, SEQ_LEN)).astype(np.int32),
                       rng.integers(0, CONFIG.vocab_size, (16, SEQ_LEN)).astype(np.int32),
                       {"rule": "random windows"})


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    # Weights at scale 0.3 spread the attention scores, so power softmax differs from softmax.
    params = init_params(CONFIG, seed=1, scale=0.3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.npz"
    plan = OperatorPlan.preset("decoder-exact", CONFIG.num_layers)
    save_checkpoint(path, Checkpoint(params, CONFIG, plan, SEQ_LEN,
                                     {"name": "tiny", "tokenizer": {"kind": "bytes"}}))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, teacher_path, data):
    work_dir = tmp_path_factory.mktemp("full")
    report = distill_decoder(work_dir, teacher_path, FAST, data=data)
    return work_dir, report


def held_out_kl(teacher: Checkpoint, params, plan: OperatorPlan, ids: np.ndarray) -> float:
    """Mean KL(teacher || model) of next-token distributions, from whole-model forward passes."""
    def log_probs(model_params, model_plan):
        logits, _ = forward(model_params, CONFIG, model_plan, jnp.asarray(ids))
        logits = np.asarray(logits, np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    teacher_log_probs = log_probs(teacher.params, teacher.plan)
    kl = np.sum(np.exp(teacher_log_probs) * (teacher_log_probs - log_probs(params, plan)), -1)
    return float(np.mean(kl))


def test_stages_cover_each_layer_then_end_to_end(full_run):
    _, report = full_run

    assert [stage["name"] for stage in report["stages"]] == [
        "layer0", "layer1", "layer2", "end-to-end"]
    assert [stage["layer"] for stage in report["stages"]] == [0, 1, 2, None]
    assert report["order"] == [0, 1, 2]


def test_stage_plans_substitute_one_more_layer():
    teacher = OperatorPlan.preset("decoder-exact", 3)
    target = OperatorPlan.preset("decoder-friendly", 3)

    stages = build_decoder_stages(teacher, target)

    assert stages[0].plan.layers == (DECODER_FRIENDLY_LAYER, DECODER_EXACT_LAYER,
                                     DECODER_EXACT_LAYER)
    assert stages[1].plan.layers == (DECODER_FRIENDLY_LAYER,) * 2 + (DECODER_EXACT_LAYER,)
    assert all(stage.plan.is_decoder for stage in stages)
    assert stages[-1].plan == target


def test_override_plan_substitutes_only_changed_kind():
    teacher = OperatorPlan.preset("decoder-exact", 3)
    target = OperatorPlan.preset("decoder-exact+activation=hard_swish", 3)

    stages = build_decoder_stages(teacher, target)

    assert [stage.layer for stage in stages] == [0, 1, 2, None]
    assert stages[0].plan.layers[0].activation == "hard_swish"
    assert stages[0].plan.layers[0].attention_normaliser == "softmax"


def test_layer_stages_reduce_probe_distance(full_run):
    _, report = full_run

    for stage in report["stages"][:-1]:
        assert stage["probe_distance_before"] > 0.0
        assert stage["probe_distance_after"] < stage["probe_distance_before"], stage["name"]


def test_end_to_end_stage_reduces_probe_kl(full_run):
    _, report = full_run
    stage = report["stages"][-1]

    assert stage["probe_kl_after"] < stage["probe_kl_before"]


def test_student_closer_to_teacher_than_undistilled(full_run, teacher_path, data):
    # Measured independently of the training code: whole-model forward passes on the
    # held-out windows, the substituted operators with and without distilled weights.
    work_dir, _ = full_run
    teacher = load_checkpoint(teacher_path)
    student = load_checkpoint(work_dir / STUDENT_FILE)

    undistilled = held_out_kl(teacher, teacher.params, student.plan, data.held_out)
    distilled = held_out_kl(teacher, student.params, student.plan, data.held_out)

    assert undistilled > 0.0
    assert distilled < 0.9 * undistilled


def test_student_has_target_plan(full_run, teacher_path):
    work_dir, report = full_run
    student = load_checkpoint(work_dir / STUDENT_FILE)
    teacher = load_checkpoint(teacher_path)

    assert student.plan == OperatorPlan.preset("decoder-friendly", CONFIG.num_layers)
    assert student.config == CONFIG
    assert student.metadata["name"] == "tiny-decoder-friendly"
    assert student.metadata["tokenizer"] == {"kind": "bytes"}
    assert student.metadata["teacher_weights_sha256"] == teacher.weights_digest()
    assert student.metadata["distill_report"]["stages"] == report["stages"]
    np.testing.assert_array_equal(student.params["embeddings"]["word"],
                                  teacher.params["embeddings"]["word"])


def test_report_has_each_stage_perplexity(full_run):
    work_dir, report = full_run
    saved = json.loads((work_dir / REPORT_FILE).read_text())

    for stage in saved["stages"]:
        assert np.isfinite(stage["probe_perplexity"]), stage["name"]
        assert stage["probe_perplexity"] > 1.0
    assert saved["held_out_perplexity"] == report["held_out_perplexity"]
    assert saved["perplexity_ratio"] == pytest.approx(
        saved["held_out_perplexity"] / saved["teacher"]["held_out_perplexity"])
    assert saved["data"]["probe_windows"] == 16
    assert not (work_dir / LOCK_FILE).exists()


def test_resume_equals_uninterrupted_run(tmp_path, teacher_path, data, full_run):
    def stop(record):
        raise StopAfterFirstStage(record["name"])

    with pytest.raises(StopAfterFirstStage):
        distill_decoder(tmp_path, teacher_path, FAST, data=data, on_stage_end=stop)
    interrupted = json.loads((tmp_path / STATE_FILE).read_text())
    assert interrupted["completed_stages"] == 1
    assert (tmp_path / PROGRESS_FILE).is_file()
    assert not (tmp_path / STUDENT_FILE).exists()

    rerun = []
    report = distill_decoder(tmp_path, teacher_path, FAST, data=data,
                             on_stage_end=lambda record: rerun.append(record["name"]))

    assert rerun == ["layer1", "layer2", "end-to-end"]
    resumed = load_checkpoint(tmp_path / STUDENT_FILE).params
    uninterrupted = load_checkpoint(full_run[0] / STUDENT_FILE).params
    for index in range(CONFIG.num_layers):
        for name in ("query", "down"):
            np.testing.assert_array_equal(resumed["layers"][index][name]["kernel"],
                                          uninterrupted["layers"][index][name]["kernel"])
    assert report["held_out_perplexity"] == full_run[1]["held_out_perplexity"]
    for ours, theirs in zip(report["stages"], full_run[1]["stages"]):
        assert {**ours, "seconds": 0} == {**theirs, "seconds": 0}


def test_finished_run_trains_no_stage(full_run, teacher_path, data):
    work_dir, report = full_run
    rerun = []

    again = distill_decoder(work_dir, teacher_path, FAST, data=data,
                            on_stage_end=lambda record: rerun.append(record["name"]))

    assert rerun == []
    assert again["stages"] == report["stages"]


def test_resume_with_other_settings_raises(full_run, teacher_path, data):
    work_dir, _ = full_run
    changed = DecoderDistillConfig(**{**FAST.__dict__, "layer_steps": 41})

    with pytest.raises(DistillError) as raised:
        distill_decoder(work_dir, teacher_path, changed, data=data)

    message = str(raised.value)
    assert "layer_steps: 40" in message
    assert "41 now" in message


def test_resume_with_other_data_raises(full_run, teacher_path, data):
    work_dir, _ = full_run
    other = DecoderData(data.train[::-1].copy(), data.held_out, data.split)

    with pytest.raises(DistillError, match="data_sha256"):
        distill_decoder(work_dir, teacher_path, FAST, data=other)


def test_unknown_plan_lists_presets():
    with pytest.raises(ValueError) as raised:
        DecoderDistillConfig(plan="fast")

    message = str(raised.value)
    assert "'fast'" in message
    assert "decoder-friendly" in message


@pytest.mark.parametrize("plan", ["friendly", "exact+activation=relu"])
def test_encoder_plan_rejected(plan):
    with pytest.raises(ValueError, match="is not a decoder plan"):
        DecoderDistillConfig(plan=plan)


def test_plan_equal_to_teacher_rejected(tmp_path, teacher_path, data):
    cfg = DecoderDistillConfig(**{**FAST.__dict__, "plan": "decoder-exact"})

    with pytest.raises(ValueError, match="nothing to distill"):
        distill_decoder(tmp_path, teacher_path, cfg, data=data)


def test_classifier_teacher_rejected(tmp_path, data):
    bert = BertConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=3,
                      intermediate_size=40, max_positions=32)
    path = tmp_path / "classifier.npz"
    save_checkpoint(path, Checkpoint(init_bert_params(bert), bert,
                                     OperatorPlan.preset("exact", 2), 16))

    with pytest.raises(RuntimeError, match="contains a classifier, not a decoder"):
        distill_decoder(tmp_path / "run", path, FAST, data=data)


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_work_dir_in_use_raises(tmp_path, teacher_path, data, live_process):
    (tmp_path / LOCK_FILE).write_text(f"{live_process}\n")

    with pytest.raises(DistillError) as raised:
        distill_decoder(tmp_path, teacher_path, FAST, data=data)

    assert "in use" in str(raised.value)
    assert str(live_process) in str(raised.value)
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize(
    ("name", "layer_keys"),
    [
        ("layers", {"attention_norm", "query", "key", "value", "attention_output", "mlp_norm",
                    "gate", "up", "down"}),
        ("mlp-norms", {"attention_norm", "mlp_norm", "gate", "up", "down"}),
        ("norms", {"attention_norm", "mlp_norm"}),
    ],
)
def test_split_trainable_selects_parameters(name, layer_keys):
    params = init_params(CONFIG, seed=2)

    trainable, frozen = split_trainable(params, name)

    assert set(trainable) == {"layers", "final_norm"}
    assert all(set(layer) == layer_keys for layer in trainable["layers"])
    assert "embeddings" in frozen
    merged = merge_trainable(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)


def test_relative_error_ignores_token_scale():
    rng = np.random.default_rng(3)
    teacher = rng.standard_normal((2, 5, 7)).astype(np.float32)
    student = teacher + 0.1 * rng.standard_normal((2, 5, 7)).astype(np.float32)
    # One token a thousand times larger, with the same relative error, leaves the mean as it is.
    scaled_teacher, scaled_student = teacher.copy(), student.copy()
    scaled_teacher[0, 0] *= 1000.0
    scaled_student[0, 0] *= 1000.0

    plain = float(relative_error(jnp.asarray(student), jnp.asarray(teacher)))
    scaled = float(relative_error(jnp.asarray(scaled_student), jnp.asarray(scaled_teacher)))

    assert plain == pytest.approx(scaled, rel=1e-4)
    expected = np.mean(np.sum((student - teacher) ** 2, -1) / np.sum(teacher**2, -1))
    assert plain == pytest.approx(expected, rel=1e-5)


def test_report_has_undistilled_figure(full_run):
    _, report = full_run

    assert report["undistilled_probe_perplexity"] > 1.0
    assert report["undistilled_probe_perplexity"] != report["teacher"]["probe_perplexity"]
    assert set(report["teacher"]) == {"path", "plan", "held_out_perplexity", "probe_perplexity"}


@pytest.mark.parametrize(
    ("plan", "message"),
    [("friendly", "is not a decoder plan"), ("fast", "unknown operator plan 'fast'")],
)
def test_command_rejects_plan_before_work(tmp_path, capsys, plan, message):
    from cipherprompt.cli import main

    status = main(["distill-decoder", "--plan", plan, "--work-dir", str(tmp_path)])

    assert status == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
