"""``cipherprompt profile``: attribution by the model's steps, report files and input errors.

The two-party runs use a tiny random checkpoint (vocabulary 300, hidden size 24, two layers)
and 8 tokens, so the server and client processes finish a profile in well under a minute.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cipherprompt.bench.profile_report import (
    OPERATOR_ORDER,
    attribute,
    group_rows,
    query_total,
)
from cipherprompt.checkpoint import Checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig, classifier_blocks, init_params
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure.cost import QueryCost, StageCost

CONFIG = BertConfig(vocab_size=300, hidden_size=24, num_layers=2, num_heads=3,
                    intermediate_size=40, max_positions=32)
SEQ_LEN = 8


def _profile_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cipherprompt", "profile", *args]


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_profile_command(*args), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.npz"
    params = init_params(CONFIG, seed=3, scale=0.1)
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)
    save_checkpoint(path, Checkpoint(params, CONFIG, plan, SEQ_LEN, {"name": "tiny"}))
    return path


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, tmp_path_factory) -> Path:
    """Profile the tiny checkpoint with the friendly-first-1 plan through the CLI."""
    out = tmp_path_factory.mktemp("profile") / "report"
    result = _run_cli("--checkpoint", str(tiny_checkpoint), "--plan", "friendly-first-1",
                      "--seq-len", str(SEQ_LEN), "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _synthetic_cost(plan: OperatorPlan) -> QueryCost:
    cost = QueryCost()
    for index, (block, step) in enumerate(
            (block, step) for block in classifier_blocks(CONFIG, plan) for step in block.steps):
        cost.stages.append(StageCost(f"{block.scope}/{step.name}", seconds=0.5 + index,
                                     bytes_sent=1000 * index + 7, bytes_received=300 + index,
                                     messages_sent=index, messages_received=2))
    return cost


def test_attribution_rows_sum_to_total():
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)
    cost = _synthetic_cost(plan)

    rows = attribute(cost, classifier_blocks(CONFIG, plan))
    total = query_total(cost, "steps")

    assert sum(row.bytes_sent for row in rows) == total.bytes_sent
    assert sum(row.bytes_received for row in rows) == total.bytes_received
    assert sum(row.messages for row in rows) == total.messages
    assert sum(row.seconds for row in rows) == pytest.approx(total.seconds)
    assert sum(len(row.steps) for row in rows) == len(cost.stages)


def test_attribution_covers_every_operator_kind():
    plan = OperatorPlan.preset("friendly-first-1", CONFIG.num_layers)

    rows = attribute(_synthetic_cost(plan), classifier_blocks(CONFIG, plan))

    assert {row.operator for row in rows} == set(OPERATOR_ORDER)
    assert [row.operator for row in group_rows(rows, "operator")] == list(OPERATOR_ORDER)
    assert [row.block for row in group_rows(rows, "block")] == [
        "embedding", "layer0", "layer1", "head"]


def test_attribution_rejects_fused_stages():
    plan = OperatorPlan.preset("exact", CONFIG.num_layers)
    cost = QueryCost([StageCost("layer0", seconds=1.0)])

    with pytest.raises(ValueError, match="'layer0' is not a step"):
        attribute(cost, classifier_blocks(CONFIG, plan))


def test_profile_rows_sum_to_total(profiled):
    report = json.loads((profiled / "profile.json").read_text())
    rows, total = report["rows"], report["total"]

    for key in ("bytes_sent", "bytes_received", "messages"):
        assert sum(row[key] for row in rows) == total[key], key
    assert sum(row["seconds"] for row in rows) == pytest.approx(total["seconds"])
    assert sum(row["bytes_share"] for row in rows) == pytest.approx(1.0)
    assert sum(row["seconds_share"] for row in rows) == pytest.approx(1.0)
    assert total["bytes_sent"] > 0
    assert total["bytes_received"] > 0


def test_profile_lists_every_operator_kind(profiled):
    report = json.loads((profiled / "profile.json").read_text())
    pairs = {(row["block"], row["operator"]) for row in report["rows"]}

    assert {row["operator"] for row in report["rows"]} == set(OPERATOR_ORDER)
    for layer in ("layer0", "layer1"):
        for operator in ("linear", "attention_products", "attention_normaliser", "activation",
                         "layer_normaliser"):
            assert (layer, operator) in pairs
    assert report["config"]["plan"]["name"] == "friendly-first-1"
    assert report["config"]["plan"]["layers"][0]["activation"] == "relu"


def test_profile_parties_see_same_bytes(profiled):
    # Both parties parse their own SPU profile: what one sends, the other receives.
    report = json.loads((profiled / "profile.json").read_text())

    assert report["server_view"]["bytes_received"] == report["total"]["bytes_sent"]
    assert report["server_view"]["bytes_sent"] == report["total"]["bytes_received"]


def test_profile_matches_plaintext_and_fused(profiled):
    report = json.loads((profiled / "profile.json").read_text())

    for label in ("warm-up", "fused", "steps"):
        assert report["max_abs_logit_error"][label] < 1e-3, label
    # Measured equal to within a few kB on this model: the steps run the same operations.
    assert report["attribution_overhead"]["bytes_ratio"] == pytest.approx(1.0, abs=0.05)
    assert report["warm_up"]["bytes_sent"] > report["fused"]["bytes_sent"]


def test_profile_writes_csv_and_chart(profiled):
    report = json.loads((profiled / "profile.json").read_text())
    with open(profiled / "profile.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))

    assert len(lines) == len(report["rows"])
    assert sum(int(line["bytes_sent"]) for line in lines) == report["total"]["bytes_sent"]
    assert (profiled / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [path.name for path in profiled.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--plan", "fastest"), ["'fastest'", "valid presets", "exact"]),
        (("--seq-len", "33"), ["--seq-len 33", "3..32", "choose --seq-len"]),
        (("--seq-len", "2"), ["--seq-len 2", "3..32"]),
        (("--text", "a film"), ["300 tokens", "leave out --text"]),
    ],
)
def test_profile_rejects_bad_input(tiny_checkpoint, tmp_path, args, expected):
    result = _run_cli("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
                      *args)

    assert result.returncode == 2
    for text in expected:
        assert text in result.stderr, result.stderr


def test_profile_rejects_unknown_shape(tmp_path):
    result = _run_cli("--model", "gpt-5", "--out", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "'gpt-5'" in result.stderr
    assert "minilm-l6" in result.stderr


def test_profile_rejects_unwritable_out(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    result = _run_cli("--checkpoint", str(tiny_checkpoint), "--out", str(blocker / "report"))

    assert result.returncode == 2
    assert str(blocker / "report") in result.stderr
    assert "--out" in result.stderr


def test_profile_requires_model_source(tmp_path):
    result = _run_cli("--out", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "--checkpoint" in result.stderr


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def test_profile_ctrl_c_leaves_no_report(tiny_checkpoint, tmp_path):
    # NOTE: in one full-suite run of 678 tests the profile finished (exit 0) before the party
    # processes were found and SIGINT was sent. Reruns passed. The cause is not known.
    out = tmp_path / "report"
    process = subprocess.Popen(
        _profile_command("--checkpoint", str(tiny_checkpoint), "--out", str(out)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    parties: list[int] = []
    while time.monotonic() < deadline and not (out / "spu-logs" / "spu-client.log").exists():
        time.sleep(0.2)
    while time.monotonic() < deadline and len(parties) < 2:
        parties = [pid for pid in _children(process.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        time.sleep(0.2)
    assert len(parties) >= 2, "the party processes did not start"

    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr[-2000:]
    assert not (out / "profile.json").exists()
    assert not (out / "profile.csv").exists()
    for pid in parties:
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{pid}"), f"party process {pid} outlived the profile"


def test_model_shapes_include_presets():
    from cipherprompt.bench.profile import model_shapes

    shapes = model_shapes()

    assert shapes["minilm-l6"] == BertConfig()
    assert shapes["bert-base"].hidden_size == 768
    assert shapes["bert-base"].num_layers == 12
    assert "smollm2-135m" not in shapes
    assert shapes["tiny"].vocab_size == 30522


def test_text_query_is_tokenized(tmp_path):
    from cipherprompt.bench.profile import ProfileConfig, query_tokens, resolve_model

    cfg = ProfileConfig(out_dir=tmp_path, model="tiny", seq_len=16, text="a gorgeous film")
    model = resolve_model(cfg)

    ids, mask = query_tokens(cfg, model)

    assert ids.shape == (1, 16)
    assert mask.shape == (1, 16)
    assert 4 <= mask.sum() < 16
    assert mask[0, -1] == 0.0
