"""``cipherprompt evaluate`` on a tiny random model: REF2K against float, the report, resume, lock.

The model keeps the real 30,522-token vocabulary but has hidden size 24 and two layers, so the
REF2K runs take seconds and the one CHEETAH query of the end-to-end run well under a minute.
"""

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

from cipherprompt import evaluate as evaluate_module
from cipherprompt.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from cipherprompt.data import Example
from cipherprompt.evaluate import (
    CHEETAH_RESULTS,
    LOCK_NAME,
    REF2K_RESULTS,
    REPORT_NAME,
    EvaluateConfig,
    ReferenceRunner,
    ResultLog,
    WorkDirInUseError,
    WorkDirLock,
    add_parser,
    compare_logits,
    evaluate,
    sample_indices,
)
from cipherprompt.models.bert import BertConfig, classify, init_params, pooling_weights
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure import launch
from cipherprompt.secure.engine import EngineConfig
from cipherprompt.tokenizer import WordPieceTokenizer

MAX_LEN = 16
# REF2K logits against float32 logits of the same model. Measured at most 1.6e-4 on 40 test
# sentences (18 fractional bits, plus SPU's own exp, tanh and reciprocal approximations). A
# row mix-up or a wrong mask gives differences of order 0.1.
REF2K_BOUND = 2e-3
# CHEETAH against REF2K: truncation of shares adds errors in the last bits.
PROTOCOL_BOUND = 1e-3
EXAMPLES = [
    Example("a gorgeous, witty, seductive movie.", 1, "first"),
    Example("dull, lifeless and far too long", 0, "first"),
    # Longer than MAX_LEN tokens: every evaluation truncates it.
    Example("the plot wanders from one forgettable set piece to the next, and the cast seems "
            "as bored by it as the audience", 0, "second"),
    Example("an honest, moving portrait of a family", 1, "third"),
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = BertConfig(vocab_size=30522, hidden_size=24, num_layers=2, num_heads=3,
                        intermediate_size=40, max_positions=64)
    params = init_params(config, seed=3, scale=0.1)
    plan = OperatorPlan.preset("exact", config.num_layers)
    path = tmp_path_factory.mktemp("model") / "tiny.npz"
    checkpoint = Checkpoint(params, config, plan, MAX_LEN,
                            {"name": "tiny", "label_names": ["rotten", "fresh"]})
    save_checkpoint(path, checkpoint)
    return path, checkpoint


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, tmp_path_factory):
    """One whole evaluate run: 4 float and REF2K sentences, 1 CHEETAH sentence."""
    work_dir = tmp_path_factory.mktemp("evaluate")
    config = EvaluateConfig(checkpoint=tiny_checkpoint[0], work_dir=work_dir, sample=1,
                            batch=3)
    report = evaluate(config, examples=EXAMPLES)
    return config, report


def test_reference_matches_float(tiny_checkpoint):
    _, checkpoint = tiny_checkpoint
    texts = [example.text for example in EXAMPLES] + ["not bad at all"]
    ids, mask = WordPieceTokenizer().encode_batch(texts, MAX_LEN, True)
    runner = ReferenceRunner(checkpoint, EngineConfig(protocol="REF2K"), batch=3)
    # Two runs: a full batch and a partial one that the runner fills up.
    logits = np.concatenate([runner.logits(ids[:3], mask[:3]), runner.logits(ids[3:], mask[3:])])
    forward = partial(classify, config=checkpoint.config, plan=checkpoint.plan)
    expected = np.asarray(forward(checkpoint.params, tokens=ids, mask=mask,
                                  pool_weights=pooling_weights(mask)))
    assert logits.shape == expected.shape
    error = np.abs(logits - expected).max()
    assert error < REF2K_BOUND, f"REF2K logit error {error:.2e}"
    spread = np.abs(expected - expected[0]).max()
    assert spread > 10 * REF2K_BOUND, "the sentences' logits are too alike to catch a row mix-up"


def test_reference_rejects_cheetah_engine(tiny_checkpoint):
    with pytest.raises(ValueError, match="REF2K"):
        ReferenceRunner(tiny_checkpoint[1], EngineConfig(protocol="CHEETAH"), batch=1)


def test_report_contains_every_figure(finished_run):
    config, report = finished_run
    assert json.loads((config.work_dir / REPORT_NAME).read_text()) == report
    assert report["command"].startswith("cipherprompt evaluate --checkpoint")
    assert report["data"]["sentences"] == len(EXAMPLES)
    assert report["float_serve_len"]["max_len"] == MAX_LEN
    assert report["float_serve_len"]["truncated_sentences"] == 1
    assert report["float_train_len"]["max_len"] == 64
    assert report["float_train_len"]["truncated_sentences"] == 0
    assert 0.0 <= report["float_serve_len"]["accuracy"] <= 1.0
    assert set(report["error_terms"]) == {"float_vs_ref2k", "ref2k_vs_cheetah",
                                          "float_vs_cheetah"}


def test_report_ref2k_close_to_float(finished_run):
    config, report = finished_run
    ref2k = report["ref2k"]
    assert ref2k["engine"]["protocol"] == "REF2K"
    assert ref2k["engine"]["fraction_bits"] == EngineConfig().fraction_bits
    assert ref2k["vs_float"]["sentences"] == len(EXAMPLES)
    assert ref2k["vs_float"]["max_logit_difference"] < REF2K_BOUND
    assert ref2k["seconds_per_sentence"] > 0
    lines = (config.work_dir / REF2K_RESULTS).read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2, 3]
    logits = np.load(config.work_dir / "logits.npz")
    assert logits["ref2k"].shape == (len(EXAMPLES), 2)


def test_report_cheetah_close_to_ref2k(finished_run):
    config, report = finished_run
    cheetah = report["cheetah"]
    assert cheetah["completed"] == 1
    assert cheetah["vs_ref2k"]["max_logit_difference"] < PROTOCOL_BOUND
    assert cheetah["vs_float"]["max_logit_difference"] < REF2K_BOUND + PROTOCOL_BOUND
    row = cheetah["sentences"][0]
    assert row["index"] == sample_indices(1, len(EXAMPLES), seed=0)[0]
    assert row["protocol_error"] < PROTOCOL_BOUND
    assert row["bytes_sent"] > 0
    assert len((config.work_dir / CHEETAH_RESULTS).read_text().splitlines()) == 1
    assert (config.work_dir / LOCK_NAME).read_text() == ""  # released


def test_rerun_skips_done_sentences(finished_run, monkeypatch):
    config, report = finished_run

    def fail(*args, **kwargs):
        raise AssertionError("a finished sentence was run again")

    # Neither a REF2K runtime nor a server may start: every sentence is done.
    monkeypatch.setattr(evaluate_module, "ReferenceRunner", fail)
    monkeypatch.setattr(launch, "ServerProcess", fail)
    again = evaluate(config, examples=EXAMPLES)
    assert again["ref2k"]["sentences_this_run"] == 0
    assert again["cheetah"]["queries_this_run"] == 0
    assert again["cheetah"]["sentences"] == report["cheetah"]["sentences"]
    assert again["ref2k"]["vs_float"] == report["ref2k"]["vs_float"]
    assert len((config.work_dir / CHEETAH_RESULTS).read_text().splitlines()) == 1


def test_report_survives_cheetah_failure(finished_run, tmp_path, monkeypatch):
    config, _ = finished_run
    shutil.copytree(config.work_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / REPORT_NAME).unlink()

    class FailingServer:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("the server process exited with code 1")

    monkeypatch.setattr(launch, "ServerProcess", FailingServer)
    larger = dataclasses.replace(config, work_dir=tmp_path, sample=2)
    with pytest.raises(RuntimeError, match="exited with code 1"):
        evaluate(larger, examples=EXAMPLES)
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    assert report["ref2k"]["vs_float"]["sentences"] == len(EXAMPLES)
    assert report["cheetah"]["sample"] == 2
    assert report["cheetah"]["completed"] == 1
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released after the failure


def test_batched_cheetah_resumes_run(finished_run, tmp_path):
    config, report = finished_run
    shutil.copytree(config.work_dir, tmp_path, dirs_exist_ok=True)
    # One sentence is done; the other three run as one query of two and one of one.
    larger = dataclasses.replace(config, work_dir=tmp_path, sample=4, cheetah_batch=2)
    again = evaluate(larger, examples=EXAMPLES)
    cheetah = again["cheetah"]
    assert cheetah["completed"] == 4
    assert cheetah["queries_this_run"] == 2
    assert cheetah["vs_ref2k"]["max_logit_difference"] < PROTOCOL_BOUND
    assert sorted(row["query_sentences"] for row in cheetah["sentences"]) == [1, 1, 2, 2]
    assert cheetah["sentences"][0] == report["cheetah"]["sentences"][0]
    assert "--cheetah-batch 2" in again["command"]


def test_rerun_rejects_other_sentences(finished_run):
    config, _ = finished_run
    changed = [Example("an entirely different sentence", 1, "x"), *EXAMPLES[1:]]
    with pytest.raises(ValueError, match="another split seed or data set"):
        evaluate(config, examples=changed)


def test_result_log_drops_partial_line(tmp_path):
    path = tmp_path / "results.jsonl"
    texts = ["first text", "second text"]
    ResultLog(path, "setup", texts).append([{"index": 0, "logits": [0.5, -0.5]}])
    with open(path, "a") as results:
        results.write('{"index": 1, "log')
    reloaded = ResultLog(path, "setup", texts)
    assert list(reloaded.records) == [0]
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["index"] == 0


def test_result_log_rejects_other_setup(tmp_path):
    path = tmp_path / "results.jsonl"
    ResultLog(path, "setup-a", ["text"]).append([{"index": 0, "logits": [1.0, 0.0]}])
    with pytest.raises(ValueError, match="another checkpoint or engine"):
        ResultLog(path, "setup-b", ["text"])


def test_compare_logits_names_disagreements():
    reference = np.array([[1.0, 0.0], [0.1, 0.2], [0.0, 3.0]], np.float32)
    other = np.array([[1.0, 0.1], [0.3, 0.2], [0.0, 2.5]], np.float32)
    figures = compare_logits(reference, other, indices=[7, 11, 13])
    assert figures["sentences"] == 3
    assert figures["disagreements"] == 1
    assert figures["disagreeing_sentences"] == [11]
    assert figures["max_reference_margin_of_disagreements"] == pytest.approx(0.1)
    assert figures["label_agreement"] == pytest.approx(2 / 3)
    assert figures["max_logit_difference"] == pytest.approx(0.5)


def test_compare_logits_without_disagreements():
    logits = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    figures = compare_logits(logits, logits)
    assert figures["disagreeing_sentences"] == []
    assert figures["max_reference_margin_of_disagreements"] is None
    assert figures["max_logit_difference"] == 0.0


def test_sample_indices_nest():
    assert sample_indices(3, 50, seed=0) == sample_indices(10, 50, seed=0)[:3]
    assert sorted(sample_indices(50, 50, seed=1)) == list(range(50))


def test_lock_rejects_second_holder(tmp_path):
    lock_path = tmp_path / LOCK_NAME
    with WorkDirLock(lock_path):
        assert lock_path.read_text().strip() == str(os.getpid())
        with pytest.raises(WorkDirInUseError, match=f"PID {os.getpid()}"):
            with WorkDirLock(lock_path):
                pass
        assert lock_path.read_text().strip() == str(os.getpid())
    assert lock_path.read_text() == ""


def test_lock_rejects_other_process(tmp_path):
    lock_path = tmp_path / LOCK_NAME
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from cipherprompt.evaluate import WorkDirLock; "
         "lock = WorkDirLock(sys.argv[1]).__enter__(); print('locked', flush=True); "
         "sys.stdin.read()", str(lock_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkDirInUseError, match=f"PID {holder.pid}"):
            with WorkDirLock(lock_path):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # The holder ended without releasing: its PID stays, but the lock can be taken.
    with WorkDirLock(lock_path):
        assert lock_path.read_text().strip() == str(os.getpid())


def test_lock_takes_over_stale_pid(tmp_path, caplog):
    lock_path = tmp_path / LOCK_NAME
    lock_path.write_text("999999999\n")  # a PID left by a run that was killed
    with caplog.at_level(logging.WARNING, logger="cipherprompt.evaluate"):
        with WorkDirLock(lock_path):
            assert lock_path.read_text().strip() == str(os.getpid())
    assert "stale lock" in caplog.text
    assert "999999999" in caplog.text


def test_evaluate_rejects_locked_work_dir(tiny_checkpoint, tmp_path):
    config = EvaluateConfig(checkpoint=tiny_checkpoint[0], work_dir=tmp_path, sample=0)
    with WorkDirLock(tmp_path / LOCK_NAME):
        with pytest.raises(WorkDirInUseError, match="in use by the evaluate run"):
            evaluate(config, examples=EXAMPLES)
    assert not (tmp_path / REPORT_NAME).exists()


def test_cli_missing_checkpoint(tmp_path):
    parser = argparse.ArgumentParser(prog="cipherprompt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", "--checkpoint", str(tmp_path / "absent.npz"),
                              "--work-dir", str(tmp_path / "out"), "--sample", "2"])
    assert args.sample == 2
    assert args.batch == 32
    with pytest.raises(CheckpointError, match="not found"):
        args.handler(args)
    assert not (tmp_path / "out").exists()
