"""Parsing SPU's profile log into per-stage and per-operator costs."""

from __future__ import annotations

import csv
import io

import pytest

from cipherprompt.secure.cost import QueryCost, format_cost_table, parse_run

PREFIX = "[2026-12-04 20:51:19.297] [info] [api.cc:223] - "


def operator_line(name, count, seconds, sent, received, actions_sent, actions_received):
    return (
        f"{PREFIX}pphlo.{name}, executed {count} times, duration {seconds}s, send bytes {sent} "
        f"recv bytes {received}, send actions {actions_sent}, recv actions {actions_received}"
    )


def run_log(operators, seconds, link):
    """A profile block for one program run, built from the format strings in SPU 0.9.5's libspu."""
    sent, received, actions_sent, actions_received = link
    lines = [
        "[2026-12-04 20:51:19.100] [info] [api.cc:165] [Profiling] SPU execution f completed, "
        f"input processing took 2e-06s, execution took {seconds}s, output processing took "
        "1.1e-05s, total time 0.068138s.",
        "[2026-12-04 20:51:19.297] [info] [api.cc:209] HLO profiling: total time 0.06",
        *(operator_line(*row) for row in operators),
        f"[2026-12-04 20:51:19.298] [info] [api.cc:259] Link details: total send bytes {sent}, "
        f"recv bytes {received}, send actions {actions_sent}, recv actions {actions_received}",
    ]
    return "\n".join(lines) + "\n"


EMBEDDING_LOG = run_log(
    [
        ("dot", 1, "0.051585141", 255882, 185036, 2, 2),
        ("add", 3, "0.000120", 0, 0, 0, 0),
        ("rsqrt", 1, "1.5e-03", 39552, 10820, 20, 20),
    ],
    "0.068125248",
    (295434, 195916, 22, 22),
)
LAYER_LOG = run_log(
    [
        ("dot", 4, "0.2", 1000000, 900000, 8, 8),
        ("exponential", 1, "0.35", 400000, 300000, 30, 30),
    ],
    "0.61",
    (1400000, 1200000, 38, 38),
)


def make_query_cost():
    return QueryCost(
        stages=[parse_run(EMBEDDING_LOG, "embedding"), parse_run(LAYER_LOG, "layer0")],
        wall_seconds=1.5,
    )


def test_parse_run_totals():
    cost = parse_run(EMBEDDING_LOG, "embedding")

    assert cost.stage == "embedding"
    assert cost.seconds == pytest.approx(0.068125248)
    assert cost.bytes_sent == 295434
    assert cost.bytes_received == 195916
    assert cost.messages_sent == 22
    assert cost.messages_received == 22


def test_parse_run_operator_rows():
    cost = parse_run(EMBEDDING_LOG, "embedding")

    assert [row.operator for row in cost.operators] == ["dot", "add", "rsqrt"]
    dot, add, rsqrt = cost.operators
    assert dot.count == 1
    assert dot.seconds == pytest.approx(0.051585141)
    assert (dot.bytes_sent, dot.bytes_received) == (255882, 185036)
    assert (dot.messages_sent, dot.messages_received) == (2, 2)
    assert add.count == 3
    assert rsqrt.seconds == pytest.approx(1.5e-3)
    assert (rsqrt.messages_sent, rsqrt.messages_received) == (20, 20)


def test_parse_run_ignores_other_lines():
    text = "[info] starting link\nsome unrelated output\n" + EMBEDDING_LOG + "[info] done\n"

    cost = parse_run(text, "embedding")

    assert len(cost.operators) == 3
    assert cost.bytes_sent == 295434


def test_parse_run_without_link_line():
    text = EMBEDDING_LOG.replace("Link details", "Link summary")

    with pytest.raises(ValueError) as raised:
        parse_run(text, "layer3")

    message = str(raised.value)
    assert "Link details" in message
    assert "'layer3'" in message


def test_parse_run_empty_text():
    with pytest.raises(ValueError, match="Link details"):
        parse_run("", "embedding")


def test_query_totals_sum_stages():
    cost = make_query_cost()

    assert cost.seconds == pytest.approx(0.068125248 + 0.61)
    assert cost.bytes_sent == 295434 + 1400000
    assert cost.bytes_received == 195916 + 1200000
    assert cost.messages == 22 + 22 + 38 + 38


def test_by_operator_sums_stages():
    rows = {row.operator: row for row in make_query_cost().by_operator()}

    assert sorted(rows) == ["add", "dot", "exponential", "rsqrt"]
    assert rows["dot"].count == 5
    assert rows["dot"].seconds == pytest.approx(0.251585141)
    assert rows["dot"].bytes_sent == 255882 + 1000000
    assert rows["dot"].bytes_received == 185036 + 900000
    assert rows["dot"].messages_sent == 10
    assert rows["exponential"].bytes_sent == 400000


def test_by_operator_most_bytes_first():
    names = [row.operator for row in make_query_cost().by_operator()]

    assert names == ["dot", "exponential", "rsqrt", "add"]


def test_by_operator_chosen_stages():
    rows = {row.operator: row for row in make_query_cost().by_operator({"layer0"})}

    assert sorted(rows) == ["dot", "exponential"]
    assert rows["dot"].count == 4
    assert rows["dot"].bytes_sent == 1000000


def test_by_operator_leaves_stages_unchanged():
    cost = make_query_cost()

    cost.by_operator()
    cost.by_operator()

    assert cost.stages[0].operators[0].count == 1
    assert cost.stages[1].operators[0].bytes_sent == 1000000


def test_cost_table_rows():
    table = format_cost_table(make_query_cost())
    lines = table.splitlines()

    assert lines[0].startswith("stage / operator")
    assert any(line.startswith("embedding ") for line in lines)
    assert any(line.startswith("layer0 ") for line in lines)
    assert any(line.startswith("dot ") for line in lines)
    assert not any(line.startswith("add ") for line in lines)
    assert lines[-1].startswith("total ")
    assert "100.0%" in lines[-1]
    assert "1.7 MB" in lines[-1]
    assert "1.4 MB" in lines[-1]


def test_to_csv_one_row_per_operator():
    rows = list(csv.reader(io.StringIO(make_query_cost().to_csv())))

    assert rows[0][:2] == ["stage", "operator"]
    assert [row[:2] for row in rows[1:]] == [
        ["embedding", "dot"],
        ["embedding", "add"],
        ["embedding", "rsqrt"],
        ["layer0", "dot"],
        ["layer0", "exponential"],
    ]
    assert rows[1][2:] == ["1", "0.051585", "255882", "185036", "2", "2"]


def test_to_dict_totals():
    data = make_query_cost().to_dict()

    assert data["wall_seconds"] == 1.5
    assert data["bytes_sent"] == 1695434
    assert [stage["stage"] for stage in data["stages"]] == ["embedding", "layer0"]
    assert data["operators"][0]["operator"] == "dot"
