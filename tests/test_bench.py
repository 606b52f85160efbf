"""`cipherprompt bench`: plans side by side on one model, the record, ratios and accuracy.

The end-to-end runs use a tiny random model (vocabulary 64, hidden 16, two layers) with the
server and client in separate processes, so a session takes seconds.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from cipherprompt.bench import compare
from cipherprompt.bench.compare import (
    BenchConfig,
    extrapolate,
    format_report,
    network_from_args,
    ratios,
    read_accuracy,
    run_bench,
    summarise_queries,
)
from cipherprompt.bench.estimate import NETWORK_PRESETS, Network
from cipherprompt.bench.runner import SessionError
from cipherprompt.checkpoint import Checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig, init_params
from cipherprompt.plan import OperatorPlan

TINY = {"vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
        "intermediate_size": 32, "max_positions": 32}
# Private outputs of the tiny model against plaintext float32; measured about 1e-5.
OUTPUT_BOUND = 1e-3


def _checkpoint(path: Path, plan: str, seed: int) -> Path:
    config = BertConfig(**TINY)
    save_checkpoint(path, Checkpoint(init_params(config, seed=seed, scale=0.1), config,
                                     OperatorPlan.preset(plan, config.num_layers), 8,
                                     {"name": f"tiny-{plan}"}))
    return path


def _evaluate_report(path: Path, checkpoint: Path, plan: str) -> Path:
    """Write the fields of an evaluate-report.json that bench reads."""
    from cipherprompt.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    path.write_text(json.dumps({
        "checkpoint": {"path": str(checkpoint), "plan": plan, "max_len": 8,
                       "weights_sha256": loaded.weights_digest()},
        "data": {"sentences": 1265},
        "float_serve_len": {"accuracy": 0.8182},
        "ref2k": {"accuracy": 0.8150},
        "cheetah": {"completed": 3, "accuracy": 2 / 3},
    }))
    return path


def _query(seconds, sent, received, messages, stages=None):
    stages = stages or [("embedding", seconds, sent, received, messages)]
    return {
        "wall_seconds": seconds, "seconds": seconds, "bytes_sent": sent,
        "bytes_received": received, "messages": messages,
        "stages": [{"stage": name, "seconds": s, "bytes_sent": b1, "bytes_received": b2,
                    "messages_sent": m // 2, "messages_received": m - m // 2}
                   for name, s, b1, b2, m in stages],
    }


# -- figures --------------------------------------------------------------------------------


def test_summary_leaves_out_first_query():
    summary = summarise_queries([_query(10.0, 1000, 2000, 50), _query(4.0, 600, 800, 20),
                                 _query(6.0, 400, 600, 40)])
    assert summary["seconds"] == pytest.approx(5.0)
    assert summary["bytes_client_to_server"] == pytest.approx(500)
    assert summary["bytes_server_to_client"] == pytest.approx(700)
    assert summary["messages"] == pytest.approx(30)
    assert summary["queries_counted"] == 2
    assert summary["first_query"]["seconds"] == 10.0


def test_summary_of_one_query_is_that_query():
    summary = summarise_queries([_query(3.0, 100, 200, 7)])
    assert summary["seconds"] == 3.0
    assert summary["queries_counted"] == 1


def test_extrapolation_scales_layers_only():
    stages = [("hidden_input", 0.5, 0, 0, 0), ("layer0", 10.0, 100, 300, 40),
              ("head", 1.0, 5, 5, 2)]
    summary = summarise_queries([_query(11.5, 105, 305, 42, stages)])
    projected = extrapolate(summary, num_layers=12)
    assert projected["spu_seconds"] == pytest.approx(0.5 + 12 * 10.0 + 1.0)
    assert projected["bytes_client_to_server"] == pytest.approx(12 * 100 + 5)
    assert projected["bytes_server_to_client"] == pytest.approx(12 * 300 + 5)
    assert projected["messages"] == pytest.approx(12 * 40 + 2)


def test_ratios_pair_friendly_with_each_baseline():
    def plan(seconds, sent, received, messages):
        return {"per_query": {"seconds": seconds, "bytes_client_to_server": sent,
                              "bytes_server_to_client": received, "messages": messages}}

    rows = ratios({"exact": plan(10.0, 300, 700, 100), "friendly": plan(4.0, 100, 100, 50),
                   "reference": plan(20.0, 1000, 1000, 400)})
    by_baseline = {row["denominator"]: row for row in rows}
    assert set(by_baseline) == {"exact", "reference"}
    assert by_baseline["exact"]["time"] == pytest.approx(0.4)
    assert by_baseline["exact"]["communication"] == pytest.approx(0.2)
    assert by_baseline["exact"]["messages"] == pytest.approx(0.5)
    assert by_baseline["reference"]["time"] == pytest.approx(0.2)
    assert by_baseline["reference"]["communication"] == pytest.approx(0.1)
    assert "erf" in by_baseline["reference"]["denominator_label"]


def test_ratios_skip_baseline_pairs():
    plan = {"per_query": {"seconds": 1.0, "bytes_client_to_server": 1,
                          "bytes_server_to_client": 1, "messages": 1}}
    assert ratios({"exact": plan, "reference": plan}) == []
    ablation = ratios({"exact": plan, "exact+activation=relu": plan})
    assert [row["numerator"] for row in ablation] == ["exact+activation=relu"]


def test_checkpoint_option_splits_at_last_equals(tmp_path):
    mapping = compare._plan_paths(["exact+activation=relu=student.npz", "exact=t.npz"],
                                  "--checkpoint")
    assert mapping == {"exact+activation=relu": Path("student.npz"), "exact": Path("t.npz")}
    with pytest.raises(ValueError, match="expected PLAN=PATH"):
        compare._plan_paths(["teacher.npz"], "--checkpoint")


# -- options --------------------------------------------------------------------------------


class _Args:
    def __init__(self, network=None, bandwidth=None, rtt=None):
        self.network, self.bandwidth, self.rtt = network, bandwidth, rtt


def test_network_options():
    assert network_from_args(_Args()) == NETWORK_PRESETS["loopback"]
    assert network_from_args(_Args("wan")) == NETWORK_PRESETS["wan"]
    custom = network_from_args(_Args(bandwidth=250, rtt=10))
    assert custom.bandwidth_bit_s == 250e6
    assert custom.rtt_s == 0.01
    assert math.isinf(network_from_args(_Args(rtt=5)).bandwidth_bit_s)
    with pytest.raises(ValueError, match="custom network"):
        network_from_args(_Args("lan", rtt=5))
    with pytest.raises(ValueError, match="needs --bandwidth"):
        network_from_args(_Args("custom"))


def test_config_rejects_checkpoint_of_plan_not_run(tmp_path):
    with pytest.raises(ValueError, match="does not run: reference"):
        BenchConfig(plans=("exact", "friendly"), checkpoints={"reference": tmp_path / "x.npz"})
    with pytest.raises(ValueError, match="twice"):
        BenchConfig(plans=("exact", "exact"))
    with pytest.raises(ValueError, match="unknown model"):
        BenchConfig(model="gpt-2")


def test_checkpoint_must_match_plan(tmp_path):
    student = _checkpoint(tmp_path / "student.npz", "friendly", seed=2)
    config = BenchConfig(plans=("exact",), checkpoints={"exact": student})
    with pytest.raises(ValueError, match="trained with plan 'friendly'"):
        compare._plan_setups(config)


def test_every_plan_needs_a_checkpoint_once_one_has(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher.npz", "exact", seed=1)
    config = BenchConfig(plans=("exact", "friendly", "reference"),
                         checkpoints={"exact": teacher})
    with pytest.raises(ValueError, match="plan 'friendly' has no checkpoint"):
        compare._plan_setups(config)


def test_reference_reuses_exact_weights(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher.npz", "exact", seed=1)
    setups, _, max_len = compare._plan_setups(
        BenchConfig(plans=("exact", "reference"), checkpoints={"exact": teacher}))
    exact, reference = setups
    assert max_len == 8
    assert reference.checkpoint_sha256 == exact.checkpoint_sha256
    assert reference.model.plan["name"] == "reference"
    assert reference.model.plan["layers"][0]["activation"] == "gelu_erf"
    assert exact.model.plan["layers"][0]["activation"] == "gelu_tanh"


def test_accuracy_report_of_other_checkpoint_rejected(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher.npz", "exact", seed=1)
    other = _checkpoint(tmp_path / "other.npz", "exact", seed=5)
    report = _evaluate_report(tmp_path / "report.json", other, "exact")
    setups, _, _ = compare._plan_setups(BenchConfig(plans=("exact",),
                                                    checkpoints={"exact": teacher}))
    with pytest.raises(ValueError, match="not for the weights"):
        read_accuracy(report, "exact", setups[0])


def test_accuracy_report_for_plan_read(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher.npz", "exact", seed=1)
    report = _evaluate_report(tmp_path / "report.json", teacher, "exact")
    setups, _, _ = compare._plan_setups(BenchConfig(plans=("exact",),
                                                    checkpoints={"exact": teacher}))
    accuracy = read_accuracy(report, "exact", setups[0])
    assert accuracy["ref2k"] == 0.8150
    assert accuracy["cheetah"] == pytest.approx(2 / 3)
    assert accuracy["cheetah_sentences"] == 3


def test_failed_run_leaves_no_record(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise SessionError("a party process failed")

    monkeypatch.setattr("cipherprompt.bench.runner.run_session", fail)
    out = tmp_path / "results" / "record.json"
    config = BenchConfig(config_overrides=TINY, max_len=8, plans=("exact", "friendly"),
                         probe=False, out=out, work_dir=tmp_path / "work")
    with pytest.raises(SessionError):
        run_bench(config)
    assert not out.exists()
    assert not out.with_suffix(".md").exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == []


def _party_record(rank: int) -> dict:
    stages = [("embedding", 1.0, 10, 20, 4), ("layer0", 2.0, 30, 40, 6),
              ("layer1", 2.0, 30, 40, 6), ("head", 0.1, 1, 1, 2)]
    return {"rank": rank, "program_sha256": "same", "stages": [name for name, *_ in stages],
            "compile_seconds": 1.0, "setup_seconds": 0.5, "peak_rss_kib": 1000,
            "queries": [_query(5.1, 71, 101, 18, stages)] * 2, "outputs": "unused.npy"}


def test_failed_plan_keeps_finished_plans(tmp_path, monkeypatch):
    def run_session(network, slot, model, *args):
        if model.plan["name"] == "friendly":
            raise SessionError("a party process failed")
        return {"server": _party_record(0), "client": _party_record(1)}

    monkeypatch.setattr("cipherprompt.bench.runner.run_session", run_session)
    monkeypatch.setattr(compare, "plaintext_max_error", lambda *args: None)
    out = tmp_path / "record.json"
    config = BenchConfig(config_overrides=TINY, max_len=8, plans=("exact", "friendly"),
                         probe=False, out=out, work_dir=tmp_path / "work")
    with pytest.raises(SessionError, match="plans that finished are recorded"):
        run_bench(config)
    record = json.loads(out.read_text())
    assert record["complete"] is False
    assert "a party process failed" in record["failure"]
    assert list(record["plans"]) == ["exact"]
    assert record["ratios"] == []
    assert "Incomplete" in out.with_suffix(".md").read_text()


# -- end to end -----------------------------------------------------------------------------


def test_bench_runs_plans_side_by_side(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher.npz", "exact", seed=1)
    student = _checkpoint(tmp_path / "student.npz", "friendly", seed=2)
    report = _evaluate_report(tmp_path / "eval.json", teacher, "exact")
    out = tmp_path / "results" / "record.json"
    config = BenchConfig(plans=("exact", "friendly"),
                         checkpoints={"exact": teacher, "friendly": student},
                         accuracy_reports={"exact": report}, queries=2, probe=False, out=out,
                         work_dir=tmp_path / "work", command="cipherprompt bench (test)")
    record = run_bench(config)

    saved = json.loads(out.read_text())
    assert saved["complete"] is True
    assert saved["command"] == "cipherprompt bench (test)"
    assert saved["network"]["emulation"] == "loopback"
    assert saved["machine"]["cores"] == os.cpu_count()
    assert set(saved["plans"]) == {"exact", "friendly"}
    for name, plan in saved["plans"].items():
        assert plan["stages_run"] == ["embedding", "layer0", "layer1", "head"]
        assert plan["per_query"]["queries_counted"] == 1
        assert plan["per_query"]["bytes_client_to_server"] > 0
        assert plan["per_query"]["bytes_server_to_client"] > 0
        assert plan["output_check"]["max_abs_error"] < OUTPUT_BOUND, name
    exact, friendly = saved["plans"]["exact"], saved["plans"]["friendly"]
    # The client's bytes must agree with the server's view of the same link.
    assert exact["server_per_query"]["bytes_server_to_client"] == pytest.approx(
        exact["per_query"]["bytes_client_to_server"], rel=0.01)
    assert exact["weights"]["sha256"] != friendly["weights"]["sha256"]
    assert exact["accuracy"]["ref2k"] == 0.8150
    assert friendly["accuracy"] is None
    (ratio,) = saved["ratios"]
    assert ratio["numerator"] == "friendly"
    assert ratio["denominator"] == "exact"
    friendly_bytes = (friendly["per_query"]["bytes_client_to_server"]
                      + friendly["per_query"]["bytes_server_to_client"])
    exact_bytes = (exact["per_query"]["bytes_client_to_server"]
                   + exact["per_query"]["bytes_server_to_client"])
    assert ratio["communication"] == pytest.approx(friendly_bytes / exact_bytes)
    assert ratio["communication"] < 1  # ReLU and 2Quad move fewer bytes than tanh and softmax

    table = out.with_suffix(".md").read_text()
    assert table == format_report(record)
    assert "| friendly |" in table
    assert "not measured" in table
    assert "REF2K 0.8150 (1265 sentences)" in table


@pytest.mark.slow
def test_bench_single_layer_through_relay(tmp_path):
    # A BERT-base-like run at tiny size: the first layer of two with a random shared input,
    # extrapolated to both layers, the parties linked through the delay relay on 127.0.0.1.
    out = tmp_path / "record.json"
    config = BenchConfig(model="bert-base", config_overrides=TINY, max_len=8,
                         plans=("exact", "friendly", "reference"), queries=1,
                         network=Network("custom", math.inf, 0.01), use_namespaces=False,
                         out=out, work_dir=tmp_path / "work")
    record = run_bench(config)
    assert record["network"]["emulation"] == "relay on 127.0.0.1"
    assert record["network"]["measured"]["rtt_s"] >= 0.01
    assert record["model"]["stages"] == ["hidden_input", "layer0"]
    assert record["extrapolation"]["layers"] == 2
    assert "embedding is not included" in record["extrapolation"]["rule"]
    for plan in record["plans"].values():
        assert plan["output_check"]["max_abs_error"] < 1e-2
        layer = plan["per_query"]["stages"][1]
        assert plan["extrapolated"]["bytes_client_to_server"] == pytest.approx(
            2 * layer["bytes_client_to_server"])
        relay_bytes = sum(route["bytes_forward"] + route["bytes_backward"]
                          for route in plan["relay"]["routes"])
        # The relay carried at least what SPU counted: SPU counts payload, the relay also
        # framing, set-up and the output share.
        assert relay_bytes >= (plan["per_query"]["bytes_client_to_server"]
                               + plan["per_query"]["bytes_server_to_client"])
    assert {row["denominator"] for row in record["ratios"]} == {"exact", "reference"}
    assert np.isfinite([row["time"] for row in record["extrapolated_ratios"]]).all()
