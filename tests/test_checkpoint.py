"""Checkpoint files: round trip, identity digest, damaged files and interrupted writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cipherprompt.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    flatten,
    load_checkpoint,
    save_checkpoint,
)
from cipherprompt.models.bert import BertConfig, init_params
from cipherprompt.plan import OperatorPlan

CONFIG = BertConfig(
    vocab_size=50,
    hidden_size=24,
    num_layers=2,
    num_heads=3,
    intermediate_size=40,
    max_positions=16,
)
METADATA = {"task": "sentiment", "accuracy": 0.875, "labels": ["rotten", "fresh"]}


def make_checkpoint(seed: int = 0) -> Checkpoint:
    return Checkpoint(
        params=init_params(CONFIG, seed=seed),
        config=CONFIG,
        plan=OperatorPlan.preset("friendly-first-1", CONFIG.num_layers),
        max_len=12,
        metadata=dict(METADATA),
    )


def folder_names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_round_trip_keeps_every_array(tmp_path):
    checkpoint = make_checkpoint()
    path = tmp_path / "model.npz"

    save_checkpoint(path, checkpoint)
    loaded = load_checkpoint(path)

    expected = flatten(checkpoint.params)
    restored = flatten(loaded.params)
    assert sorted(restored) == sorted(expected)
    for key, value in expected.items():
        assert restored[key].dtype == np.float32, key
        np.testing.assert_array_equal(restored[key], value, err_msg=key)


def test_round_trip_keeps_structure(tmp_path):
    path = tmp_path / "model.npz"

    save_checkpoint(path, make_checkpoint())
    params = load_checkpoint(path).params

    assert isinstance(params["layers"], list)
    assert len(params["layers"]) == CONFIG.num_layers
    assert params["embeddings"]["word"].shape == (CONFIG.vocab_size, CONFIG.hidden_size)
    assert params["layers"][1]["intermediate"]["kernel"].shape == (24, 40)


def test_round_trip_keeps_config_plan_metadata(tmp_path):
    checkpoint = make_checkpoint()
    path = tmp_path / "model.npz"

    save_checkpoint(path, checkpoint)
    loaded = load_checkpoint(path)

    assert loaded.config == CONFIG
    assert loaded.plan == checkpoint.plan
    assert loaded.plan.digest() == checkpoint.plan.digest()
    assert loaded.max_len == 12
    assert loaded.metadata == METADATA
    assert loaded.weights_digest() == checkpoint.weights_digest()


def test_save_creates_missing_folder(tmp_path):
    path = tmp_path / "runs" / "first" / "model.npz"

    save_checkpoint(path, make_checkpoint())

    assert load_checkpoint(path).config == CONFIG


def test_weights_digest_changes_with_one_weight():
    checkpoint = make_checkpoint()
    before = checkpoint.weights_digest()
    checkpoint.params["layers"][1]["output"]["bias"][5] += 1e-3

    assert checkpoint.weights_digest() != before


def test_weights_digest_equal_for_equal_weights():
    assert make_checkpoint(seed=3).weights_digest() == make_checkpoint(seed=3).weights_digest()
    assert make_checkpoint(seed=3).weights_digest() != make_checkpoint(seed=4).weights_digest()


def test_load_missing_path(tmp_path):
    path = tmp_path / "absent.npz"

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert str(path) in message
    assert "not found" in message


def test_load_truncated_file(tmp_path):
    path = tmp_path / "model.npz"
    save_checkpoint(path, make_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert str(path) in message
    assert "unreadable" in message


def test_load_corrupted_file(tmp_path):
    # Overwrite bytes in the middle, inside stored array data, so the zip CRC check fails.
    path = tmp_path / "model.npz"
    save_checkpoint(path, make_checkpoint())
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_load_text_file(tmp_path):
    path = tmp_path / "model.npz"
    path.write_text("not a checkpoint\n")

    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_load_npz_without_metadata(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, weights=np.zeros(3, np.float32))

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert str(path) in message
    assert "not a cipherprompt checkpoint" in message


def test_load_other_format_version(tmp_path):
    meta = {
        "format_version": FORMAT_VERSION + 1,
        "config": CONFIG.to_dict(),
        "plan": OperatorPlan.preset("exact", CONFIG.num_layers).to_dict(),
        "max_len": 12,
        "metadata": {},
    }
    path = tmp_path / "future.npz"
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert f"format {FORMAT_VERSION + 1}" in message
    assert "retrain" in message


def test_load_malformed_metadata(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, __meta__=np.frombuffer(b'{"format_version": 1}', np.uint8))

    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(path)


def interrupting_savez(file, **arrays):
    # Write part of an archive, as a save cut off by a full disk or a signal would.
    file.write(b"PK\x03\x04" + bytes(1000))
    raise OSError("disk full")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    monkeypatch.setattr(np, "savez", interrupting_savez)

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_checkpoint())

    assert not path.exists()
    assert folder_names(tmp_path) == []


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    previous = make_checkpoint(seed=1)
    save_checkpoint(path, previous)
    saved_bytes = path.read_bytes()
    monkeypatch.setattr(np, "savez", interrupting_savez)

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_checkpoint(seed=2))

    assert folder_names(tmp_path) == ["model.npz"]
    assert path.read_bytes() == saved_bytes
    monkeypatch.undo()
    assert load_checkpoint(path).weights_digest() == previous.weights_digest()


def test_save_replaces_previous(tmp_path):
    path = tmp_path / "model.npz"
    save_checkpoint(path, make_checkpoint(seed=1))
    newer = make_checkpoint(seed=2)

    save_checkpoint(path, newer)

    assert folder_names(tmp_path) == ["model.npz"]
    assert load_checkpoint(path).weights_digest() == newer.weights_digest()
