"""Cost estimate: scaling rules, network terms, self-check, report languages and errors."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from cipherprompt.bench import estimate as est

MINILM = est.MODEL_PRESETS["minilm-l6"]

# Synthetic unit costs (seconds, bytes per driver unit) for the operators of each stage kind.
UNITS = {
    "embedding": {"dot": (2e-9, 30.0), "multiply": (1e-7, 8.0), "rsqrt": (3e-7, 50.0)},
    "layer": {"dot": (1e-9, 28.0), "dot_general": (4e-9, 40.0), "tanh": (2e-6, 900.0),
              "multiply": (3e-7, 60.0), "exponential": (1e-6, 700.0), "less": (5e-7, 300.0),
              "reduce": (4e-7, 200.0), "reciprocal": (2e-6, 1500.0), "rsqrt": (5e-5, 9000.0),
              "add": (1e-8, 0.0)},
    "head": {"dot_general": (1e-7, 20.0), "dot": (1e-8, 5.0)},
}
MESSAGES = {"embedding": 6, "layer": 40, "head": 4}
OVERHEAD = 0.02  # seconds per stage not attributed to any operator


def synthetic_cost(shape, seq, scale=1.0, embedding=True, head=True, **extra):
    """A cost dict in QueryCost.to_dict() form whose costs follow the estimate's own rules.

    Without ``embedding`` the first stage is the bench's free hidden-state input instead."""
    stages = []
    if not embedding:
        stages.append({"stage": "hidden_input", "seconds": 0.002, "bytes_sent": 0,
                       "bytes_received": 0, "messages_sent": 0, "messages_received": 0,
                       "operators": [{"operator": "add", "count": 1, "seconds": 0.0002,
                                      "bytes_sent": 0, "bytes_received": 0,
                                      "messages_sent": 0, "messages_received": 0}]})
    names = [*(["embedding"] if embedding else []), *(f"layer{i}" for i in range(shape.layers)),
             *(["head"] if head else [])]
    for name in names:
        kind = est.stage_kind(name)
        drivers = est.stage_drivers(kind, shape, seq)
        operators = []
        for operator, (seconds_unit, bytes_unit) in UNITS[kind].items():
            seconds_driver, bytes_driver = est.operator_drivers(kind, operator)
            total_bytes = round(bytes_unit * drivers[bytes_driver] * scale)
            operators.append({
                "operator": operator, "count": 1,
                "seconds": seconds_unit * drivers[seconds_driver] * scale,
                "bytes_sent": total_bytes // 2, "bytes_received": total_bytes - total_bytes // 2,
                "messages_sent": 1, "messages_received": 1,
            })
        stages.append({
            "stage": name,
            "seconds": sum(row["seconds"] for row in operators) + OVERHEAD,
            "bytes_sent": sum(row["bytes_sent"] for row in operators),
            "bytes_received": sum(row["bytes_received"] for row in operators),
            "messages_sent": MESSAGES[kind] // 2, "messages_received": MESSAGES[kind] // 2,
            "operators": operators,
        })
    return {
        **extra,
        "seconds": sum(stage["seconds"] for stage in stages),
        "bytes_sent": sum(stage["bytes_sent"] for stage in stages),
        "bytes_received": sum(stage["bytes_received"] for stage in stages),
        "messages": sum(stage["messages_sent"] + stage["messages_received"] for stage in stages),
        "stages": stages,
    }


def write_cost(path, data):
    path.write_text(json.dumps(data))
    return path


def load(path, shape=MINILM, seq=32):
    return est.load_measurement(path, shape, seq, "exact", "synthetic, no machine")


@pytest.fixture
def minilm_measurement(tmp_path):
    return load(write_cost(tmp_path / "query.json", synthetic_cost(MINILM, 32)))


def test_projection_identity_matches_measurement(minilm_measurement):
    units = est.fit_unit_costs([minilm_measurement])
    projected = est.project(units, MINILM, 32)
    assert projected.seconds == pytest.approx(minilm_measurement.seconds, rel=1e-12)
    assert projected.bytes == pytest.approx(minilm_measurement.bytes, rel=1e-12)
    assert projected.messages == pytest.approx(minilm_measurement.messages, rel=1e-12)


def test_identity_loopback_time_is_measured(minilm_measurement):
    units = est.fit_unit_costs([minilm_measurement])
    projected = est.project(units, MINILM, 32)
    loopback = est.NETWORK_PRESETS["loopback"]
    assert projected.time_s(loopback) == pytest.approx(minilm_measurement.seconds, rel=1e-12)


def test_doubling_bandwidth_halves_transfer(minilm_measurement):
    projected = est.project(est.fit_unit_costs([minilm_measurement]), MINILM, 128)
    slow = est.Network("slow", 100e6, 0.040)
    fast = est.Network("fast", 200e6, 0.040)
    assert projected.transfer_s(fast) == pytest.approx(projected.transfer_s(slow) / 2)
    assert projected.latency_s(fast) == projected.latency_s(slow)
    assert projected.time_s(slow) - projected.time_s(fast) == pytest.approx(
        projected.transfer_s(fast))


def test_latency_is_half_messages_times_rtt(minilm_measurement):
    projected = est.project(est.fit_unit_costs([minilm_measurement]), MINILM, 32)
    wan = est.NETWORK_PRESETS["wan"]
    assert projected.latency_s(wan) == pytest.approx(minilm_measurement.messages / 2 * 0.040)


def layer_operator_term(units, operator, seq, shape=MINILM):
    """Projected (seconds, bytes) of one layer operator for ``shape`` at ``seq``."""
    seconds_unit, bytes_unit = units.operators["layer"][operator]
    seconds_driver, bytes_driver = est.operator_drivers("layer", operator)
    drivers = est.stage_drivers("layer", shape, seq)
    return seconds_unit * drivers[seconds_driver], bytes_unit * drivers[bytes_driver]


def test_attention_product_seconds_scale_with_seq_squared(minilm_measurement):
    units = est.fit_unit_costs([minilm_measurement])
    seconds_32, _ = layer_operator_term(units, "dot_general", 32)
    seconds_64, _ = layer_operator_term(units, "dot_general", 64)
    assert seconds_64 == pytest.approx(4 * seconds_32)


def test_scaling_rules_per_driver():
    base = est.stage_drivers("layer", MINILM, 32)
    double_seq = est.stage_drivers("layer", MINILM, 64)
    assert double_seq[est.ATTENTION_MACS] == 4 * base[est.ATTENTION_MACS]
    assert double_seq[est.SCORE_ELEMENTS] == 4 * base[est.SCORE_ELEMENTS]
    assert double_seq[est.MATMUL_IO] == 2 * base[est.MATMUL_IO]
    assert double_seq[est.FFN_ELEMENTS] == 2 * base[est.FFN_ELEMENTS]
    assert double_seq[est.SCORE_ROWS] == 2 * base[est.SCORE_ROWS]

    wide = est.ModelShape("wide", hidden=768, heads=12, kv_heads=12, ffn=3072, layers=6,
                          vocab=30522)
    wide_drivers = est.stage_drivers("layer", wide, 32)
    # Every matrix doubles in both dimensions, so its input and output elements double.
    assert wide_drivers[est.MATMUL_IO] == 2 * base[est.MATMUL_IO]
    assert wide_drivers[est.ATTENTION_MACS] == 2 * base[est.ATTENTION_MACS]

    embedding = est.stage_drivers("embedding", MINILM, 32)
    assert embedding[est.EMBEDDING_IO] == 32 * (30522 + 384)


def test_grouped_query_attention_shrinks_key_value():
    full = est.ModelShape("full", hidden=576, heads=9, kv_heads=9, ffn=1536, layers=1,
                          vocab=11)
    grouped = est.ModelShape("grouped", hidden=576, heads=9, kv_heads=3, ffn=1536, layers=1,
                             vocab=11)
    seq, head = 7, 64
    saved = (est.stage_drivers("layer", full, seq)[est.MATMUL_IO]
             - est.stage_drivers("layer", grouped, seq)[est.MATMUL_IO])
    # Key and value projections each output (9 - 3) x 64 fewer elements per token.
    assert saved == 2 * seq * (9 - 3) * head


def test_layers_multiply_layer_stage(minilm_measurement):
    units = est.fit_unit_costs([minilm_measurement])
    twelve = est.ModelShape("twelve", hidden=384, heads=12, kv_heads=12, ffn=1536, layers=12,
                            vocab=30522)
    six_layers = est.project(units, MINILM, 32)
    twelve_layers = est.project(units, twelve, 32)
    assert twelve_layers.bytes_by_stage["layer"] == pytest.approx(
        2 * six_layers.bytes_by_stage["layer"])
    assert twelve_layers.bytes_by_stage["embedding"] == pytest.approx(
        six_layers.bytes_by_stage["embedding"])


def test_self_check_exact_on_consistent_points(tmp_path):
    bert_small = est.ModelShape("bert-small", hidden=512, heads=8, kv_heads=8, ffn=2048,
                                layers=4, vocab=30522)
    measurements = [
        load(write_cost(tmp_path / "a.json", synthetic_cost(MINILM, 32))),
        load(write_cost(tmp_path / "b.json", synthetic_cost(MINILM, 64, max_len=64)), seq=32),
        load(write_cost(tmp_path / "c.json", synthetic_cost(bert_small, 48)), bert_small, 48),
    ]
    checks = est.self_check(measurements)
    assert [check.held_out for check in checks] == [("minilm-l6", 32), ("minilm-l6", 64),
                                                    ("bert-small", 48)]
    for check in checks:
        # Only the per-stage overhead scales differently from the synthetic rules.
        assert abs(check.seconds_error) < 0.05, check
        assert check.bytes_error == pytest.approx(0.0, abs=1e-6)
        assert check.messages_error == pytest.approx(0.0, abs=1e-12)


def test_self_check_reports_held_out_error(tmp_path):
    fitted = load(write_cost(tmp_path / "fit.json", synthetic_cost(MINILM, 32)))
    # The held-out point costs 30% more bytes and seconds than the rules predict.
    held_out = load(write_cost(tmp_path / "held.json", synthetic_cost(MINILM, 64, scale=1.3)),
                    seq=64)
    checks = {check.held_out: check for check in est.self_check([fitted, held_out])}
    check = checks[("minilm-l6", 64)]
    assert check.fitted_on == (("minilm-l6", 32),)
    assert check.bytes_error == pytest.approx(1 / 1.3 - 1, rel=1e-6)
    assert -0.25 < check.seconds_error < -0.15
    assert check.messages_error == pytest.approx(0.0, abs=1e-12)


def test_self_check_rendered_with_errors(tmp_path):
    fitted = load(write_cost(tmp_path / "fit.json", synthetic_cost(MINILM, 32)))
    held_out = load(write_cost(tmp_path / "held.json", synthetic_cost(MINILM, 64, scale=1.3)),
                    seq=64)
    estimate = est.build_estimate([fitted, held_out], MINILM, 128, est.NETWORK_PRESETS["lan"])
    section = est.render_markdown(estimate, "en", "x").split("## Self-check")[1]
    assert "projected to minilm-l6 @ 64" in section
    assert "traffic -23.1%" in section
    assert "Pending" not in section


def test_self_check_pending_with_one_configuration(tmp_path):
    first = load(write_cost(tmp_path / "q1.json", synthetic_cost(MINILM, 32)))
    second = load(write_cost(tmp_path / "q2.json", synthetic_cost(MINILM, 32, scale=1.1)))
    assert est.self_check([first, second]) == []
    estimate = est.build_estimate([first, second], est.MODEL_PRESETS["bert-base"], 128,
                                  est.NETWORK_PRESETS["wan"])
    page = est.render_markdown(estimate, "en", "estimate.png")
    assert "Pending a second measurement" in page
    assert "%" not in page.split("## Self-check")[1].split("## Assumptions")[0]


def test_unknown_presets_list_valid_names():
    with pytest.raises(ValueError, match="valid presets: minilm-l6, bert-base, bert-large"):
        est.model_preset("gpt-5")
    with pytest.raises(ValueError, match="valid presets: loopback, lan, wan, custom"):
        est.network_preset("satellite")


@pytest.mark.parametrize("bandwidth, rtt", [(0, 10), (-5, 10), (100, 0), (100, -1)])
def test_custom_network_rejects_non_positive(bandwidth, rtt):
    with pytest.raises(ValueError, match="must be positive"):
        est.custom_network(bandwidth, rtt)


def test_custom_model_rejects_invalid_sizes():
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        est.ModelShape("custom", hidden=0, heads=1, kv_heads=1, ffn=4, layers=1, vocab=5)
    with pytest.raises(ValueError, match="not divisible"):
        est.ModelShape("custom", hidden=10, heads=3, kv_heads=3, ffn=4, layers=1, vocab=5)


def test_missing_measurement_file_named(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ValueError, match="not found: .*nowhere.json"):
        load(missing)


def test_malformed_measurement_file_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not readable JSON"):
        load(broken)
    wrong_shape = write_cost(tmp_path / "shape.json", {"seconds": 1})
    with pytest.raises(ValueError, match="shape.json: expected a JSON object with a list"):
        load(wrong_shape)
    data = synthetic_cost(MINILM, 32)
    data["stages"][1]["bytes_sent"] = "many"
    with pytest.raises(ValueError, match="bad.json, stage layer0: field 'bytes_sent'"):
        load(write_cost(tmp_path / "bad.json", data))


def test_layer_count_mismatch_rejected(tmp_path):
    path = write_cost(tmp_path / "q.json", synthetic_cost(MINILM, 32))
    with pytest.raises(ValueError, match="6 layer stages, but the source model bert-base"):
        load(path, est.MODEL_PRESETS["bert-base"])


def numbers_in(text):
    return sorted(re.findall(r"[-+]?\d[\d,]*(?:\.\d+)?", text))


def table_rows(page):
    return [line for line in page.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_japanese_page_same_numbers(tmp_path):
    measurement = load(write_cost(tmp_path / "q.json", synthetic_cost(MINILM, 32)))
    estimate = est.build_estimate([measurement], est.MODEL_PRESETS["bert-base"], 128,
                                  est.NETWORK_PRESETS["wan"])
    english = est.render_markdown(estimate, "en", "estimate.png")
    japanese = est.render_markdown(estimate, "ja", "estimate.png")
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", japanese)
    english_rows, japanese_rows = table_rows(english), table_rows(japanese)
    assert len(english_rows) == len(japanese_rows) == 3
    for english_row, japanese_row in zip(english_rows, japanese_rows, strict=True):
        english_cells = english_row.split("|")[1:]
        japanese_cells = japanese_row.split("|")[1:]
        assert len(english_cells) == len(japanese_cells)
        for english_cell, japanese_cell in zip(english_cells, japanese_cells, strict=True):
            assert numbers_in(english_cell) == numbers_in(japanese_cell)
    answer = english.split("## Answer")[1].split("|")[0]
    answer_ja = japanese.split("## 答え")[1].split("|")[0]
    chosen, chosen_ja = estimate.row(estimate.chosen), estimate.row(estimate.chosen, "ja")
    for key in ("time", "traffic", "time_1000", "traffic_1000"):
        assert chosen[key] in answer
        assert chosen_ja[key] in answer_ja
    # The Japanese page adds only the "1" of "1 クエリあたり" (per query) to the answer.
    extra = list(numbers_in(answer_ja))
    extra.remove("1")
    assert extra == numbers_in(answer)
    assert "CHEETAH" in japanese


def test_assumptions_translated_one_to_one():
    assert len(est.ASSUMPTIONS["ja"]) == len(est.ASSUMPTIONS["en"])
    for english, japanese in zip(est.ASSUMPTIONS["en"], est.ASSUMPTIONS["ja"], strict=True):
        for term in ("`dot`", "`dot_general`", "`multiply`", "`tanh`", "SwiGLU", "RTT"):
            assert (term in english) <= (term in japanese), (term, japanese)


def run_command(argv):
    parser = argparse.ArgumentParser()
    est.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", *argv])
    return args.handler(args)


def test_command_writes_report(tmp_path, capsys):
    path = write_cost(tmp_path / "q.json", synthetic_cost(MINILM, 32))
    out = tmp_path / "report"
    assert run_command(["--measured", str(path), "--model", "smollm2-135m", "--seq-len", "64",
                        "--network", "custom", "--bandwidth-mbit", "500", "--rtt-ms", "5",
                        "--lang", "ja", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["estimate.ja.md", "estimate.json",
                                                     "estimate.png"]
    assert (out / "estimate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((out / "estimate.json").read_text())
    assert numbers["network"] == "custom"
    assert set(numbers["per_network"]) == {"loopback", "lan", "wan", "custom"}
    custom = numbers["per_network"]["custom"]
    assert custom["transfer_s"] == pytest.approx(numbers["bytes"] * 8 / 500e6)
    assert "smollm2-135m" in capsys.readouterr().out


def test_command_unknown_network_preset(tmp_path):
    path = write_cost(tmp_path / "q.json", synthetic_cost(MINILM, 32))
    with pytest.raises(ValueError, match="unknown network preset 'moon'"):
        run_command(["--measured", str(path), "--network", "moon", "--out", str(tmp_path)])


def test_command_custom_model_needs_sizes(tmp_path):
    path = write_cost(tmp_path / "q.json", synthetic_cost(MINILM, 32))
    with pytest.raises(ValueError, match="--model custom needs --hidden"):
        run_command(["--measured", str(path), "--model", "custom", "--out", str(tmp_path)])


def test_duration_and_size_formats():
    assert est.format_duration(45.0) == "45 s"
    assert est.format_duration(600.0) == "10 min"
    assert est.format_duration(3 * 3600.0) == "3 h"
    assert est.format_duration(5 * 86400.0) == "5 days"
    assert est.format_duration(600.0, "ja") == "10 分"
    assert est.format_size(1.59e9) == "1.59 GB"
    assert est.format_size(2.5e15) == "2,500 TB"
    assert est.format_size(0) == "0 B"


# -- bench records and demo reports ----------------------------------------------------------------

SMALL = est.ModelShape("bert-L1-H128-A2", hidden=128, heads=2, kv_heads=2, ffn=512, layers=1,
                       vocab=30522)
SMALL_CONFIG = {"vocab_size": 30522, "hidden_size": 128, "num_layers": 1, "num_heads": 2,
                "intermediate_size": 512, "max_positions": 512}
MACHINE = {"cpu": "AMD EPYC", "cores": 2, "usable_cores": 2, "memory_gib": 23.5, "spu": "0.9.5"}


def bench_record(config, seq, plans, network=None, run_layers=None):
    """A record in the form ``cipherprompt bench`` writes; ``plans`` maps a plan to its queries."""
    return {
        "command": "cipherprompt bench ...",
        "max_len": seq,
        "machine": MACHINE,
        "network": network or {"preset": "loopback", "bandwidth_bit_s": None, "rtt_s": 0.0},
        "load_average": {"start": [10.06, 14.7, 21.4], "end": [10.24, 12.8, 19.1]},
        "model": {"name": "bert-base (changed by --config)", "config": config,
                  "run_layers": run_layers or config["num_layers"]},
        "plans": {plan: {"client_queries": queries} for plan, queries in plans.items()},
    }


def small_queries(seq, count, scale=1.0, head=False):
    return [synthetic_cost(SMALL, seq, scale, embedding=False, head=head) for _ in range(count)]


def load_all(path, shape=MINILM, seq=32):
    return est.load_measurements(path, shape, seq, "exact", "synthetic, no machine")


def test_bench_record_measurements_per_plan(tmp_path):
    record = bench_record(SMALL_CONFIG, 64, {"exact": small_queries(64, 3),
                                             "friendly": small_queries(64, 3, scale=0.5)})
    measurements = load_all(write_cost(tmp_path / "bench.json", record))

    # The first query of each plan pays the session's set-up and is left out.
    assert [(m.plan, m.query) for m in measurements] == [
        ("exact", (2, 3)), ("exact", (3, 3)), ("friendly", (2, 3)), ("friendly", (3, 3))]
    for measurement in measurements:
        assert measurement.configuration == ("bert-L1-H128-A2", 64)
        assert measurement.shape == SMALL
        assert not measurement.includes_setup
        assert "AMD EPYC, 2 usable cores" in measurement.machine
        assert "load average 10.1 at the start" in measurement.machine
        # The hidden-state input replaces the embedding in this run and is not fitted.
        assert set(measurement.stages) == {"layer"}


def test_bench_record_single_query_kept(tmp_path):
    record = bench_record(SMALL_CONFIG, 32, {"exact": small_queries(32, 1)})
    (measurement,) = load_all(write_cost(tmp_path / "bench.json", record))

    assert measurement.query == (1, 1)
    assert measurement.includes_setup


def test_bench_record_of_preset_shape(tmp_path):
    minilm_config = {"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
                     "intermediate_size": 1536}
    record = bench_record(minilm_config, 32, {"exact": [synthetic_cost(MINILM, 32)] * 2})
    measurements = load_all(write_cost(tmp_path / "bench.json", record),
                            shape=est.MODEL_PRESETS["bert-base"], seq=128)

    assert [m.configuration for m in measurements] == [("minilm-l6", 32)]
    assert measurements[0].shape is MINILM


def test_bench_shape_names():
    assert est.bench_shape(SMALL_CONFIG, 1).name == "bert-L1-H128-A2"
    odd_ffn = {**SMALL_CONFIG, "intermediate_size": 300}
    assert est.bench_shape(odd_ffn, 1).name == "bert-L1-H128-A2-F300"
    # One layer run of a 12-layer BERT-base is its own configuration, not the preset.
    base = {**SMALL_CONFIG, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072,
            "num_layers": 12}
    assert est.bench_shape(base, 12) is est.MODEL_PRESETS["bert-base"]
    assert est.bench_shape(base, 1).name == "bert-L1-H768-A12"


def test_bench_record_emulated_network_rejected(tmp_path):
    wan = {"preset": "wan", "bandwidth_bit_s": 100e6, "rtt_s": 0.04}
    record = bench_record(SMALL_CONFIG, 32, {"exact": small_queries(32, 2)}, network=wan)
    with pytest.raises(ValueError, match="emulated network 'wan'.*--network loopback"):
        load_all(write_cost(tmp_path / "wan.json", record))


def test_bench_record_missing_config_field(tmp_path):
    config = {key: value for key, value in SMALL_CONFIG.items() if key != "hidden_size"}
    record = bench_record(config, 32, {"exact": small_queries(32, 2)})
    with pytest.raises(ValueError, match="model config: field 'hidden_size' must be a positive"):
        load_all(write_cost(tmp_path / "bench.json", record))


def test_bench_record_layer_stages_checked(tmp_path):
    record = bench_record(SMALL_CONFIG, 32, {"exact": small_queries(32, 2)}, run_layers=2)
    with pytest.raises(ValueError, match="1 layer stages, but the source model bert-L2"):
        load_all(write_cost(tmp_path / "bench.json", record))


def test_demo_report_drops_first_query(tmp_path):
    queries = [{"text": "a", "cost": synthetic_cost(MINILM, 48, scale=scale)}
               for scale in (1.5, 1.0, 1.0)]
    report = {"command": "cipherprompt demo", "plan": "exact", "max_len": 48,
              "queries": queries}
    measurements = load_all(write_cost(tmp_path / "demo-report.json", report))

    assert [m.query for m in measurements] == [(2, 3), (3, 3)]
    assert [m.configuration for m in measurements] == [("minilm-l6", 48)] * 2
    assert measurements[0].bytes == pytest.approx(synthetic_cost(MINILM, 48)["bytes_sent"]
                                                  + synthetic_cost(MINILM, 48)["bytes_received"])


def test_select_plan():
    exact = est.Measurement(path=None, shape=SMALL, seq=32, plan="exact", machine="",
                            seconds=1, bytes=1, messages=1, stages={})
    friendly = est.Measurement(path=None, shape=SMALL, seq=32, plan="friendly", machine="",
                               seconds=1, bytes=1, messages=1, stages={})
    with pytest.raises(ValueError, match="operator plans exact, friendly; choose one with"):
        est.select_plan([exact, friendly], None)
    assert est.select_plan([exact, friendly], "friendly") == [friendly]
    assert est.select_plan([exact], None) == [exact]
    with pytest.raises(ValueError, match="no measurement of plan 'reference'"):
        est.select_plan([exact, friendly], "reference")


def test_self_check_across_bench_configurations(tmp_path):
    whole = load(write_cost(tmp_path / "minilm.json", synthetic_cost(MINILM, 32)))
    small_32 = load_all(write_cost(tmp_path / "small-32.json", bench_record(
        SMALL_CONFIG, 32, {"exact": small_queries(32, 3)})))
    # The 64-token run also has the head, and costs 30% more than the rules predict.
    small_64 = load_all(write_cost(tmp_path / "small-64.json", bench_record(
        SMALL_CONFIG, 64, {"exact": small_queries(64, 2, scale=1.3, head=True)})))
    checks = {check.held_out: check for check in est.self_check([whole, *small_32, *small_64])}

    assert set(checks) == {("minilm-l6", 32), ("bert-L1-H128-A2", 32), ("bert-L1-H128-A2", 64)}
    # No small run has the embedding, so the left-out MiniLM is compared on layers and head.
    assert checks[("minilm-l6", 32)].stages == ("layer", "head")
    assert checks[("bert-L1-H128-A2", 32)].stages == ("layer",)
    held_out = checks[("bert-L1-H128-A2", 64)]
    assert held_out.fitted_on == (("minilm-l6", 32), ("bert-L1-H128-A2", 32))
    assert held_out.stages == ("layer", "head")
    assert held_out.bytes_error == pytest.approx(1 / 1.3 - 1, rel=1e-6)
    assert held_out.measured["bytes"] == pytest.approx(
        small_64[0].stages["layer"].bytes + small_64[0].stages["head"].bytes)
    assert held_out.projected["bytes"] == pytest.approx(held_out.measured["bytes"] / 1.3)
    # Fitted partly on the dearer 64-token run, the 32-token projection comes out high.
    assert 0 < checks[("bert-L1-H128-A2", 32)].bytes_error < 0.3


def test_estimate_needs_embedding_and_head(tmp_path):
    small = load_all(write_cost(tmp_path / "small.json", bench_record(
        SMALL_CONFIG, 32, {"exact": small_queries(32, 2)})))
    with pytest.raises(ValueError, match="no measurement contains the embedding or head stage"):
        est.build_estimate(small, est.MODEL_PRESETS["bert-base"], 128,
                           est.NETWORK_PRESETS["wan"])


def test_command_checks_against_bench_records(tmp_path):
    cost = write_cost(tmp_path / "q.json", synthetic_cost(MINILM, 32))
    bench = write_cost(tmp_path / "bench.json", bench_record(SMALL_CONFIG, 64, {
        "exact": small_queries(64, 2, scale=1.3), "friendly": small_queries(64, 2)}))
    out = tmp_path / "report"
    argv = ["--measured", str(cost), str(bench), "--model", "bert-base", "--out", str(out)]
    with pytest.raises(ValueError, match="choose one with --plan"):
        run_command(argv)

    assert run_command([*argv, "--plan", "exact"]) == 0
    section = (out / "estimate.md").read_text().split("## Self-check")[1].split("## Assumptions")[0]
    assert ("projected to bert-L1-H128-A2 @ 64 and compared with its measurement over the "
            "layers: ") in section
    assert "traffic -23.1%" in section
    assert "Traffic and messages do not depend on the load" in section
    numbers = json.loads((out / "estimate.json").read_text())
    checks = {tuple(check["held_out"]): check for check in numbers["self_check"]}
    assert checks[("bert-L1-H128-A2", 64)]["stages"] == ["layer"]
    assert checks[("bert-L1-H128-A2", 64)]["bytes_error"] == pytest.approx(1 / 1.3 - 1)
    assert [source["query"] for source in numbers["sources"]] == [None, [2, 2]]

    assert run_command([*argv, "--plan", "exact", "--lang", "ja"]) == 0
    japanese = (out / "estimate.ja.md").read_text()
    assert "(レイヤーについて)" in japanese
    assert "(2 件中 2 件目のクエリ)" in japanese
    assert "AMD EPYC、使用可能なコア 2 個、23.5 GiB" in japanese
    assert "1 分間の負荷平均は開始時 10.1、終了時 10.2" in japanese


def test_committed_bench_records_load():
    # Records that `cipherprompt bench` wrote, to hold the reader to the real format.
    results = est.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    small = load_all(results / "small-h128-l1-32-loopback.json")
    assert {m.plan for m in small} == {"exact", "friendly", "reference"}
    assert {m.configuration for m in small} == {("bert-L1-H128-A2", 32)}
    assert [m.query for m in small if m.plan == "exact"] == [(2, 3), (3, 3)]
    assert all(set(m.stages) == {"layer"} for m in small)

    minilm = load_all(results / "minilm-32-loopback.json")
    assert [(m.plan, m.configuration, m.includes_setup) for m in minilm] == [
        ("exact", ("minilm-l6", 32), True), ("friendly", ("minilm-l6", 32), True),
        ("reference", ("minilm-l6", 32), True)]
    assert set(minilm[0].stages) == {"embedding", "layer", "head"}

    checks = est.self_check(est.select_plan([*small, *minilm], "exact"))
    assert [check.stages for check in checks] == [("layer",), ("layer",)]


def test_example_pages_are_generated():
    # docs/estimate-example is the output of the command that docs/estimate.md gives, so its
    # self-check figures are the projection errors that the committed records produce.
    root = est.Path(__file__).resolve().parents[1]
    results = root / "benchmarks" / "results"
    measurements = [
        measurement
        for name in ("minilm-32-loopback.json", "small-h128-l1-32-loopback.json",
                     "small-h128-l1-64-loopback.json", "bert-base-layer-128-loopback.json")
        for measurement in est.load_measurements(results / name, MINILM, 32, "exact",
                                                 "unused: bench records name their machine")
    ]
    estimate = est.build_estimate(est.select_plan(measurements, "exact"),
                                  est.MODEL_PRESETS["bert-base"], 128, est.NETWORK_PRESETS["wan"])
    held_out = {check.held_out: check for check in estimate.checks}[("bert-L1-H768-A12", 128)]
    assert held_out.fitted_on == (("minilm-l6", 32), ("bert-L1-H128-A2", 32),
                                  ("bert-L1-H128-A2", 64))

    for lang, page in (("en", "estimate.md"), ("ja", "estimate.ja.md")):
        committed = (root / "docs" / "estimate-example" / page).read_text()
        assert committed == est.render_markdown(estimate, lang, "estimate.png"), (
            f"docs/estimate-example/{page} is out of date; rerun the command in "
            "docs/estimate.md")


LSB_ON = {"protocol": "CHEETAH", "field": "FM64", "fraction_bits": 18, "mul_lsb_error": True,
          "optimize_denominator": True}


def test_mixed_engine_settings_rejected(tmp_path):
    on = bench_record(SMALL_CONFIG, 32, {"exact": small_queries(32, 2)})
    on["engine"] = LSB_ON
    off = bench_record(SMALL_CONFIG, 64, {"exact": small_queries(64, 2)})
    off["engine"] = {**LSB_ON, "mul_lsb_error": False}
    whole = load(write_cost(tmp_path / "minilm.json", synthetic_cost(MINILM, 32)))
    measurements = [whole, *load_all(write_cost(tmp_path / "on.json", on)),
                    *load_all(write_cost(tmp_path / "off.json", off))]
    with pytest.raises(ValueError, match="different SPU settings") as error:
        est.build_estimate(measurements, est.MODEL_PRESETS["bert-base"], 128,
                           est.NETWORK_PRESETS["wan"])
    assert "in on.json" in str(error.value)
    assert "in off.json" in str(error.value)


def test_engine_settings_on_page(tmp_path):
    record = bench_record(SMALL_CONFIG, 64, {"exact": small_queries(64, 2)})
    record["engine"] = LSB_ON
    whole = load(write_cost(tmp_path / "minilm.json", synthetic_cost(MINILM, 32)))
    small = load_all(write_cost(tmp_path / "small.json", record))
    estimate = est.build_estimate([whole, *small], est.MODEL_PRESETS["bert-base"], 128,
                                  est.NETWORK_PRESETS["wan"])
    page = est.render_markdown(estimate, "en", "estimate.png")
    assert ("SPU settings of the measurements: field FM64, fraction_bits 18, "
            "mul_lsb_error True") in page
    assert "1 of 2 measurements do not record them." in page
    assert "the traffic of a query under the default is higher than projected here" in page
    japanese = est.render_markdown(estimate, "ja", "estimate.png")
    assert "`mul_lsb_error` が有効な計測" in japanese
    assert est.Estimate.to_dict(estimate)["sources"][1]["engine"] == LSB_ON
