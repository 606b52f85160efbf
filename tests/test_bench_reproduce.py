"""`cipherprompt bench --reproduce`: a record's command runs again and its figures are compared.

The sessions are replaced by a stand-in that returns fixed party records, so these tests check
the plumbing (the recorded command, engine and weights reach the new run) and the comparison,
in well under a second each. The real two-party runs of bench are in test_bench.py.
"""

import json
import shlex

import pytest

from cipherprompt.bench import compare
from cipherprompt.bench.reproduce import ReproduceError, load_record
from cipherprompt.cli import build_parser, main
from cipherprompt.secure.engine import EngineConfig

TINY = ('{"vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_heads": 2, '
        '"intermediate_size": 32, "max_positions": 32}')


def _party_record(sent: int, messages: int) -> dict:
    query = {"wall_seconds": 2.0, "seconds": 2.0, "bytes_sent": sent, "bytes_received": 2 * sent,
             "messages": messages,
             "stages": [{"stage": "hidden_input", "seconds": 0.0, "bytes_sent": 0,
                         "bytes_received": 0, "messages_sent": 0, "messages_received": 0},
                        {"stage": "layer0", "seconds": 2.0, "bytes_sent": sent,
                         "bytes_received": 2 * sent, "messages_sent": messages // 2,
                         "messages_received": messages - messages // 2}]}
    return {"program_sha256": "same", "stages": ["hidden_input", "layer0"],
            "compile_seconds": 1.0, "setup_seconds": 0.5, "peak_rss_kib": 1000,
            "queries": [query, query], "outputs": "unused.npy"}


@pytest.fixture
def sessions(monkeypatch):
    """Stand-in sessions; ``sizes[plan]`` sets the bytes, ``engines`` collects what ran."""
    state = {"sizes": {"exact": 1000, "friendly": 300}, "engines": []}

    def run_session(network, slot, model, max_len, engine, *args):
        state["engines"].append(dict(engine))
        sent = state["sizes"][model.plan["name"]]
        return {"server": _party_record(sent, 40), "client": _party_record(sent, 40)}

    monkeypatch.setattr("cipherprompt.bench.runner.run_session", run_session)
    monkeypatch.setattr(compare, "plaintext_max_error", lambda *args: None)
    return state


def _make_record(tmp_path, monkeypatch, engine: dict | None = None) -> tuple:
    out = tmp_path / "results" / "record.json"
    argv = ["bench", "--model", "bert-base", "--config", TINY, "--max-len", "8", "--plans",
            "exact,friendly", "--no-probe", "--work-dir", str(tmp_path / "first"),
            "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["cipherprompt", *argv])
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "cipherprompt " + shlex.join(argv)
    if engine is not None:
        record["engine"] = engine
        out.write_text(json.dumps(record))
    return out, record


def _reproduce(tmp_path, record_path, *extra) -> int:
    return main(["bench", "--reproduce", str(record_path), "--work-dir",
                 str(tmp_path / "again"), *extra])


def test_reproduce_reruns_record_and_agrees(tmp_path, monkeypatch, sessions, capsys):
    lsb_on = {**EngineConfig().to_dict(), "mul_lsb_error": True}
    path, recorded = _make_record(tmp_path, monkeypatch, engine=lsb_on)
    sessions["engines"].clear()

    assert _reproduce(tmp_path, path) == 0

    # The record's engine settings ran, not today's defaults.
    assert sessions["engines"] == [lsb_on, lsb_on]
    (new_path,) = (tmp_path / "again").glob("reproduce-record-*.json")
    new = json.loads(new_path.read_text())
    assert new["engine"] == lsb_on
    assert new["model"] == recorded["model"]
    assert list(new["plans"]) == ["exact", "friendly"]
    assert new["reproduces"]["reproduced"] is True
    assert new["reproduces"]["engine_same_as_default"] is False
    assert new["command"].startswith(f"cipherprompt bench --reproduce {path}")
    comparison = new_path.with_suffix(".comparison.md").read_text()
    assert "| exact | 3.0 KB | 3.0 KB | +0.0% |" in comparison
    assert comparison.rstrip().endswith("within the tolerance")
    assert comparison in capsys.readouterr().out


def test_reproduce_fails_when_bytes_differ(tmp_path, monkeypatch, sessions, capsys):
    path, _ = _make_record(tmp_path, monkeypatch)
    sessions["sizes"]["friendly"] = 360  # 20% more than recorded

    assert _reproduce(tmp_path, path) == 1

    out = capsys.readouterr().out
    assert "| friendly | 900 B | 1.1 KB | +20.0% |" in out
    assert "NOT reproduced" in out
    # A looser tolerance accepts the same difference.
    assert _reproduce(tmp_path, path, "--tolerance", "0.25") == 0


def test_reproduce_rejects_run_options(tmp_path, monkeypatch, sessions, capsys):
    path, _ = _make_record(tmp_path, monkeypatch)
    sessions["engines"].clear()
    assert _reproduce(tmp_path, path, "--plans", "exact") == 2
    assert "drop --plans" in capsys.readouterr().err
    assert _reproduce(tmp_path, path, "--tolerance", "2") == 2
    assert "--tolerance must lie between 0 and 1, got 2.0" in capsys.readouterr().err
    assert sessions["engines"] == []


def test_reproduce_needs_recorded_weights(tmp_path, monkeypatch, sessions, capsys):
    path, record = _make_record(tmp_path, monkeypatch)
    record["command"] += " --checkpoint exact=missing/teacher.npz"
    path.write_text(json.dumps(record))
    assert _reproduce(tmp_path, path) == 2
    assert "ran checkpoint missing/teacher.npz, which is not found here" in (
        capsys.readouterr().err)


def test_reproduce_rejects_reproduction_record(tmp_path, monkeypatch, sessions, capsys):
    path, record = _make_record(tmp_path, monkeypatch)
    record["command"] = f"cipherprompt bench --reproduce {path} (runs: {record['command']})"
    path.write_text(json.dumps(record))
    assert _reproduce(tmp_path, path) == 2
    assert "made by --reproduce; reproduce the record it names" in capsys.readouterr().err


def test_load_record_errors(tmp_path):
    with pytest.raises(ReproduceError, match="not found"):
        load_record(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ReproduceError, match="cannot read bench record"):
        load_record(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"command": "cipherprompt profile", "plans": {}}))
    with pytest.raises(ReproduceError, match="not a record of cipherprompt bench"):
        load_record(other)


def test_bench_parser_has_reproduce_options():
    args = build_parser().parse_args(["bench", "--reproduce", "r.json", "--tolerance", "0.1"])
    assert str(args.reproduce) == "r.json"
    assert args.tolerance == 0.1
