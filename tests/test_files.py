"""Atomic writes: no half-written file under the final name, old content kept on failure."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cipherprompt.files import write_atomically, write_json, write_npz
from cipherprompt.secure.cost import QueryCost, StageCost, write_cost


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "profile.json"

    def write_half(temporary: Path) -> None:
        temporary.write_text('{"rows": [')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, write_half)

    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_content(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"accuracy": 0.8})

    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(target, {"accuracy": object()})

    assert json.loads(target.read_text()) == {"accuracy": 0.8}
    assert list(tmp_path.iterdir()) == [target]


def test_written_file_follows_umask(tmp_path):
    target = tmp_path / "report.json"
    previous = os.umask(0o022)
    try:
        write_atomically(target, lambda temporary: temporary.write_text("{}"))
    finally:
        os.umask(previous)

    assert target.read_text() == "{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [target]


def test_stale_temporary_file_is_not_reused(tmp_path):
    # A writer that used one fixed temporary name crashed and left this file. A new write must
    # neither fail on it nor rename it into place.
    target = tmp_path / "state.json"
    stale = tmp_path / ".state.json.tmp"
    stale.write_text('{"half')

    write_json(target, {"stage": 2})

    assert json.loads(target.read_text()) == {"stage": 2}
    assert stale.read_text() == '{"half'


def test_write_json_creates_missing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "report.json"

    write_json(target, {"ok": True})

    assert json.loads(target.read_text()) == {"ok": True}


def test_write_cost_puts_extra_entries_first(tmp_path):
    target = tmp_path / "cost.json"
    cost = QueryCost([StageCost("embedding", seconds=1.5, bytes_sent=10, bytes_received=20)])

    write_cost(target, cost, {"plan": "friendly"})

    written = json.loads(target.read_text())
    assert list(written)[0] == "plan"
    assert written["plan"] == "friendly"
    assert written == {"plan": "friendly", **cost.to_dict()}


def test_write_npz_keeps_exact_name(tmp_path):
    # np.savez given the temporary path (ending in .tmp) would append ".npz" to it, and the rename
    # would then miss the file it wrote.
    target = tmp_path / "logits.npz"

    write_npz(target, {"ref2k": np.arange(4, dtype=np.float32)})

    assert list(tmp_path.iterdir()) == [target]
    assert np.load(target)["ref2k"].tolist() == [0.0, 1.0, 2.0, 3.0]
