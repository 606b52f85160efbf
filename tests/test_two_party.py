"""Client and server in separate processes on 127.0.0.1, with a tiny random model.

The model keeps the real 30,522-token vocabulary (the client tokenizes real text) but has hidden
size 24 and two layers, so each private query takes seconds under CHEETAH.
"""

import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cipherprompt.checkpoint import Checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig, classify, init_params, pooling_weights
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure import client as client_module
from cipherprompt.secure.client import HandshakeError, PrivateClassifier, ServerUnreachableError
from cipherprompt.secure.engine import compile_classifier
from cipherprompt.secure.launch import ServerProcess, check_health
from cipherprompt.secure.wire import PROTOCOL_VERSION, PeerError, recv_message, send_message
from cipherprompt.tokenizer import EmptyTextError, TextTooLongError

MAX_LEN = 16
# Private logits against plaintext float32 logits of the same model. Measured: about 5e-5
# (24 fractional bits, plus SPU's own exp, tanh and reciprocal approximations inside the exact
# operators). A masking or share-handling bug gives errors of order 0.1.
LOGIT_BOUND = 1e-3
TEXTS = ["a gorgeous, witty, seductive movie.", "dull, lifeless and far too long"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    config = BertConfig(vocab_size=30522, hidden_size=24, num_layers=2, num_heads=3,
                        intermediate_size=40, max_positions=64)
    params = init_params(config, seed=3, scale=0.1)
    plan = OperatorPlan.preset("exact", config.num_layers)
    path = tmp_path_factory.mktemp("model") / "tiny.npz"
    save_checkpoint(path, Checkpoint(params, config, plan, MAX_LEN,
                                     {"name": "tiny", "label_names": ["rotten", "fresh"]}))
    return path, params, config, plan


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("server")
    with ServerProcess(tiny_model[0], work_dir, extra_args=("--idle-timeout", "60"),
                       start_timeout_s=120) as process:
        yield process.address, process.process, work_dir


def _plaintext_logits(tiny_model, client, text):
    _, params, config, plan = tiny_model
    encoded = client.tokenizer.encode(text, MAX_LEN)
    mask = encoded.mask[None, :]
    forward = partial(classify, config=config, plan=plan)
    return np.asarray(forward(params, tokens=encoded.ids[None, :], mask=mask,
                              pool_weights=pooling_weights(mask)))[0]


def test_private_logits_match_plaintext(server, tiny_model, tmp_path):
    address, process, _ = server
    with PrivateClassifier(address, work_dir=tmp_path) as client:
        for text in TEXTS:  # several queries in one session
            prediction = client.classify(text)
            expected = _plaintext_logits(tiny_model, client, text)
            error = np.abs(prediction.logits - expected).max()
            assert error < LOGIT_BOUND, f"{text!r}: logit error {error:.2e}"
            assert prediction.label == int(np.argmax(expected))
            assert prediction.probabilities.sum() == pytest.approx(1.0)
            assert prediction.cost.bytes_sent > 0
            assert [stage.stage for stage in prediction.cost.stages] == [
                "embedding", "layer0", "layer1", "head"]
    assert process.poll() is None


def test_client_errors_keep_session(server, tmp_path):
    address, process, _ = server
    with PrivateClassifier(address, work_dir=tmp_path) as client:
        with pytest.raises(EmptyTextError):
            client.classify("   ")
        with pytest.raises(TextTooLongError, match="truncat"):
            client.classify("word " * 40)
        truncated = client.classify("word " * 40, truncate=True)
        assert truncated.num_tokens == MAX_LEN
    assert process.poll() is None


def test_unreachable_server_error():
    with pytest.raises(ServerUnreachableError, match="cipherprompt serve"):
        PrivateClassifier(f"127.0.0.1:{_free_port()}", connect_timeout_s=2).connect()


def test_client_rejects_program_mismatch(server, tmp_path, monkeypatch):
    address, process, _ = server

    def compile_other_plan(config, plan, max_len, engine, batch=1):
        return compile_classifier(config, OperatorPlan.preset("friendly", plan.num_layers),
                                  max_len, engine, batch=batch)

    monkeypatch.setattr(client_module, "compile_classifier", compile_other_plan)
    with pytest.raises(HandshakeError, match="program_sha256 differs"):
        PrivateClassifier(address, work_dir=tmp_path).connect()
    monkeypatch.undo()
    with PrivateClassifier(address, work_dir=tmp_path) as client:
        assert client.classify(TEXTS[0]).label in (0, 1)
    assert process.poll() is None


def test_server_rejects_program_mismatch(server):
    address, process, _ = server
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        send_message(sock, "hello", {"protocol_version": PROTOCOL_VERSION})
        welcome = recv_message(sock, "welcome").payload
        assert len(welcome["program_sha256"]) == 64
        send_message(sock, "ready", {"program_sha256": "0" * 64, "client_link": "127.0.0.1:1"})
        with pytest.raises(PeerError, match="program_sha256 differs"):
            recv_message(sock, "start")
    assert process.poll() is None


def test_server_rejects_protocol_version(server):
    address, process, _ = server
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        send_message(sock, "hello", {"protocol_version": 999})
        with pytest.raises(PeerError, match="protocol_version differs"):
            recv_message(sock, "welcome")
    assert process.poll() is None


def test_cli_classify_unreachable_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "classify", "--server",
         f"127.0.0.1:{_free_port()}", "fine film"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "cannot reach a cipherprompt server" in result.stderr


def test_cli_classify_invalid_address():
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "classify", "--server", "localhost", "x"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "expected HOST:PORT" in result.stderr


def test_cli_classify_prints_label(server, tmp_path):
    address, _, _ = server
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "classify", "--server", address, "--work-dir",
         str(tmp_path), "--json", str(tmp_path / "query.json"), TEXTS[0]],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in ("rotten", "fresh")
    assert "embedding" in result.stdout
    assert (tmp_path / "query.json").exists()


def test_cli_classify_empty_text(server, tmp_path):
    address, _, _ = server
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "classify", "--server", address, "--work-dir",
         str(tmp_path), "  "],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "empty" in result.stderr


def test_server_port_in_use(tiny_model, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cipherprompt", "serve", "--checkpoint", str(tiny_model[0]),
             "--port", str(port), "--work-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 2
    assert "--port" in result.stderr


def test_server_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cipherprompt", "serve", "--checkpoint",
         str(tmp_path / "absent.npz"), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "not found" in result.stderr


def test_health_reports_serving(server):
    address, process, _ = server
    status = check_health(address)
    assert status["status"] == "serving"
    assert status["plan"] == "exact"
    assert status["max_len"] == MAX_LEN
    assert status["active_sessions"] == 0


def test_server_survives_silent_connection(server):
    address, process, _ = server
    host, port = address.split(":")
    socket.create_connection((host, int(port)), timeout=5).close()
    assert check_health(address)["status"] == "serving"
    assert process.poll() is None


def test_batched_query_matches_plaintext(tiny_model, tmp_path):
    work_dir = tmp_path / "server"
    with ServerProcess(tiny_model[0], work_dir, extra_args=("--batch", "3"),
                       start_timeout_s=120) as process:
        with PrivateClassifier(process.address, work_dir=tmp_path / "client") as client:
            assert client.batch == 3
            # Two texts in a three-text query: the client fills the third row with a copy.
            predictions = client.classify_batch(TEXTS)
            assert len(predictions) == len(TEXTS)
            for text, prediction in zip(TEXTS, predictions):
                expected = _plaintext_logits(tiny_model, client, text)
                error = np.abs(prediction.logits - expected).max()
                assert error < LOGIT_BOUND, f"{text!r}: logit error {error:.2e}"
                assert prediction.query_texts == len(TEXTS)
            assert predictions[0].cost is predictions[1].cost
            with pytest.raises(ValueError, match="1 to 3 texts"):
                client.classify_batch(TEXTS * 2)
