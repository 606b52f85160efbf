"""Measured CHEETAH cost per operator: the results file, the generated table and the benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cipherprompt.ops import ACTIVATIONS, ATTENTION_NORMALISERS, LAYER_NORMALISERS
from cipherprompt.ops.costs import (
    DOC_PATH,
    REPO_ROOT,
    RESULTS_PATH,
    TABLE_END,
    TABLE_START,
    load_results,
    operator_key,
    render_table,
    update_doc,
)

ALL_OPERATORS = [*ACTIVATIONS.values(), *ATTENTION_NORMALISERS.values(),
                 *LAYER_NORMALISERS.values()]
BENCHMARK = REPO_ROOT / "benchmarks" / "operator_costs.py"
METRICS = ("seconds", "bytes_sent", "bytes_received", "bytes", "messages")


def _table_of(text: str) -> str:
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


@pytest.mark.parametrize("cls", ALL_OPERATORS, ids=lambda cls: f"{cls.kind}/{cls.name}")
def test_results_cover_operator(cls):
    entry = cls.cheetah_cost()

    assert entry["kind"] == cls.kind
    assert entry["name"] == cls.name
    for metric in METRICS:
        assert metric in entry["per_element"]
        assert metric in entry["fixed"]
    assert entry["per_element"]["bytes"] > 0
    assert len(entry["runs_by_size"]) == len(load_results()["sizes"])


def test_results_record_machine_and_load():
    results = load_results()

    assert results["machine"]["cpu"]
    assert results["machine"]["usable_cores"] >= 1
    assert len(results["machine"]["load_average_1_5_15_min"]) == 3
    assert len(results["load_after"]["load_average_1_5_15_min"]) == 3
    assert results["engine"]["protocol"] == "CHEETAH"
    assert results["engine"]["field"] == "FM64"


def test_doc_lists_every_operator():
    table = _table_of(DOC_PATH.read_text())

    for cls in ALL_OPERATORS:
        assert f"| {cls.kind} | `{cls.name}` |" in table, cls.name


def test_doc_table_is_generated():
    # The table must be exactly what the classes and the results file give, never hand-edited.
    expected = render_table(load_results())

    assert _table_of(DOC_PATH.read_text()) == expected, (
        "docs/operators.md is out of date; run python benchmarks/operator_costs.py "
        "--render-only")


def test_missing_results_name_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks/operator_costs.py"):
        ACTIVATIONS["relu"].cheetah_cost(tmp_path / "absent.json")


def test_missing_entry_names_command(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"operators": {}}))

    with pytest.raises(KeyError, match="activation/relu"):
        ACTIVATIONS["relu"].cheetah_cost(path)


def test_update_doc_rejects_missing_markers(tmp_path):
    doc = tmp_path / "operators.md"
    doc.write_text("# Operators\n")

    with pytest.raises(ValueError, match="markers"):
        update_doc(doc, load_results())


def test_operator_key_format():
    assert operator_key("activation", "relu") == "activation/relu"


def _run_benchmark(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARK), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_benchmark_measures_subset(tmp_path):
    out, doc = tmp_path / "costs.json", tmp_path / "operators.md"
    doc.write_text(f"# Operators\n\n{TABLE_START}\n{TABLE_END}\n")
    selected = ["activation/relu", "attention_normaliser/2quad", "layer_normaliser/rmsnorm"]

    result = _run_benchmark("--out", str(out), "--doc", str(doc), "--sizes", "1024,3072",
                            "--repeat", "1", "--operators", ",".join(selected), "--work-dir",
                            str(tmp_path / "work"))

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results["operators"]) == sorted(selected)
    for key in selected:
        entry = results["operators"][key]
        assert [run["elements"] for run in entry["runs_by_size"]] in (
            [1024, 3072], [1152, 3072])
        assert entry["runs_by_size"][1]["bytes"] > 0
        assert entry["cheetah_max_abs_error"] < 0.05, key
    assert results["load_after"]["uptime"] is not None
    table = _table_of(doc.read_text())
    assert "| activation | `relu` |" in table
    assert "| activation | `gelu_tanh` |" in table
    assert "not measured" in table


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--sizes", "4096"), "at least two different"),
        (("--sizes", "1024,1100", "--operators", "attention_normaliser/softmax"),
         "same input shapes"),
        (("--operators", "activation/swish"), "unknown operators activation/swish"),
        (("--repeat", "0"), "--repeat must be at least 1"),
    ],
)
def test_benchmark_rejects_bad_input(tmp_path, args, expected):
    result = _run_benchmark("--out", str(tmp_path / "costs.json"), "--doc", "none", *args,
                            timeout=120)

    assert result.returncode == 2
    assert expected in result.stderr
    assert not (tmp_path / "costs.json").exists()


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("operator_costs", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_keeps_full_results(tmp_path):
    check_out = _benchmark_module().check_out

    with pytest.raises(ValueError, match="pass another --out"):
        check_out(RESULTS_PATH, "activation/relu")
    check_out(RESULTS_PATH, None)
    check_out(tmp_path / "costs.json", "activation/relu")


def test_results_file_is_committed():
    assert RESULTS_PATH.exists(), f"run {BENCHMARK.name} to create {RESULTS_PATH}"


def test_installed_package_reads_results(tmp_path):
    # A non-editable install has no repository around the package, so the results file must
    # travel as package data. Build from a copy, so that no build output lands in the checkout.
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "cipherprompt", source / "cipherprompt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", str(source), "--target", str(target),
         "--no-deps", "--no-build-isolation", "--no-index", "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "cipherprompt" / "ops" / "operator-costs.json").is_file()

    probe = subprocess.run(
        [sys.executable, "-c",
         "from cipherprompt.ops import ACTIVATIONS\n"
         "from cipherprompt.ops.costs import RESULTS_PATH\n"
         "print(RESULTS_PATH)\n"
         "print(ACTIVATIONS['relu'].cheetah_cost()['name'])"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)})
    assert probe.returncode == 0, probe.stderr[-3000:]
    results_path, name = probe.stdout.split()
    assert Path(results_path).is_relative_to(target)
    assert name == "relu"
