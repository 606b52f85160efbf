"""Sessions of a server with two length buckets: padding, pinning, busy slots and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from secure_helpers import (
    LOGIT_BOUND,
    SHORT_TEXT,
    assert_no_tracebacks,
    make_tiny_checkpoint,
    no_active_sessions,
    plaintext_logits,
    start_client_loop,
    wait_for,
    wait_for_log,
)

from cipherprompt.checkpoint import Checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig, init_params
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure.client import HandshakeError, PrivateClassifier, ServerBusyError
from cipherprompt.secure.handshake import (
    find_differences,
    parse_buckets,
    pick_bucket,
    validate_buckets,
)
from cipherprompt.secure.launch import ServerProcess, check_health
from cipherprompt.tokenizer import WordPieceTokenizer

BUCKETS = (16, 32)
# About 20 tokens: too long for bucket 16.
MEDIUM_TEXT = "an uneven but often funny film about two brothers, a dog and a very long road trip"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.npz")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("server")
    arguments = ("--buckets", ",".join(map(str, BUCKETS)), "--idle-timeout", "120")
    with ServerProcess(tiny[0], work_dir, extra_args=arguments, start_timeout_s=300) as process:
        yield process


def _classify_cli(*arguments, stdin: bytes | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "cipherprompt", "classify", *arguments],
                          input=stdin, capture_output=True, timeout=timeout, check=False)


# -- buckets ----------------------------------------------------------------------------------


def test_pick_bucket_smallest_that_fits():
    assert pick_bucket(3, BUCKETS) == 16
    assert pick_bucket(16, BUCKETS) == 16
    assert pick_bucket(17, BUCKETS) == 32
    assert pick_bucket(33, BUCKETS) is None


def test_parse_and_validate_buckets():
    assert parse_buckets("32, 16") == (32, 16)
    assert validate_buckets((32, 16), 64) == (16, 32)
    with pytest.raises(ValueError, match="invalid bucket list '16,abc'"):
        parse_buckets("16,abc")
    with pytest.raises(ValueError, match="bucket 100 is outside 3..64"):
        validate_buckets((16, 100), 64)
    with pytest.raises(ValueError, match="duplicates"):
        validate_buckets((16, 16), 64)


def test_find_differences_names_both_sides():
    lines = find_differences({"plan": "exact", "buckets": (16,)}, {"plan": "friendly",
                             "buckets": [16]}, ("plan", "buckets"), "server", "client")
    assert lines == ["plan differs: server 'exact', client 'friendly'"]


def test_same_logits_in_two_buckets(server, tiny, tmp_path):
    _, params, config, plan = tiny
    with PrivateClassifier(server.address, work_dir=tmp_path) as client:
        assert client.buckets == BUCKETS
        in_small = client.classify(SHORT_TEXT)
        in_large = client.classify(SHORT_TEXT, bucket=32)
        medium = client.classify(MEDIUM_TEXT)
    expected = plaintext_logits(params, config, plan, WordPieceTokenizer(), SHORT_TEXT, 16)

    assert in_small.bucket == 16
    assert in_large.bucket == 32
    assert medium.bucket == 32
    assert 16 < medium.num_tokens <= 32
    assert np.abs(in_small.logits - expected).max() < LOGIT_BOUND
    assert np.abs(in_large.logits - expected).max() < LOGIT_BOUND
    assert np.abs(in_small.logits - in_large.logits).max() < LOGIT_BOUND
    wait_for_log(server.log_path, "buckets=16:1,32:2")


def test_health_lists_buckets(server):
    status = check_health(server.address)
    assert status["buckets"] == list(BUCKETS)
    assert status["max_len"] == 32
    assert status["protocol_version"] == 2
    assert len(status["weights_sha256"]) == 64
    assert status["tls"] is False
    assert_no_tracebacks(server.log_path)


# -- sessions and pins ------------------------------------------------------------------------


def test_second_client_gets_busy(server, tmp_path):
    with (PrivateClassifier(server.address, work_dir=tmp_path / "first"),
          pytest.raises(ServerBusyError, match="server busy: all 1 sessions are in use")):
        PrivateClassifier(server.address, work_dir=tmp_path / "second").connect()
    wait_for(lambda: no_active_sessions(server.address), 60, "the first session to end")
    with PrivateClassifier(server.address, work_dir=tmp_path / "third") as client:
        assert client.buckets == BUCKETS


@pytest.mark.parametrize("pins, message", [
    ({"expected_model": "bert-base"},
     "model differs: client expects 'bert-base', server has 'tiny'"),
    ({"expected_weights_sha256": "0" * 64},
     f"weights_sha256 differs: client expects '{'0' * 64}', server has"),
    ({"expected_plan": "friendly"},
     "plan differs: client expects 'friendly', server has 'exact'"),
])
def test_pins_rejected_by_server(server, tmp_path, pins, message):
    with pytest.raises(HandshakeError) as raised:
        PrivateClassifier(server.address, work_dir=tmp_path, **pins).connect()
    assert message in str(raised.value)
    wait_for_log(server.log_path, message)


def test_matching_pins_accepted(server, tmp_path):
    digest = check_health(server.address)["weights_sha256"]
    client = PrivateClassifier(server.address, work_dir=tmp_path, expected_model="tiny",
                               expected_weights_sha256=digest, expected_plan="exact")
    with client:
        assert client.plan.name == "exact"


# -- command-line input -----------------------------------------------------------------------


def test_cli_file_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("un film très réussi".encode("latin-1"))
    result = _classify_cli("--server", "127.0.0.1:9", "--file", str(path))
    errors = result.stderr.decode()
    assert result.returncode == 2
    assert f"--file {path} is not valid UTF-8: byte 0xe8 at offset 10" in errors
    assert "iconv" in errors


def test_cli_stdin_invalid_utf8():
    result = _classify_cli("--server", "127.0.0.1:9", "-", stdin=b"bad \xff\xfe bytes")
    assert result.returncode == 2
    assert "standard input is not valid UTF-8: byte 0xff at offset 4" in result.stderr.decode()


def test_cli_missing_file(tmp_path):
    result = _classify_cli("--server", "127.0.0.1:9", "--file", str(tmp_path / "absent.txt"))
    assert result.returncode == 2
    assert "cannot read --file" in result.stderr.decode()


def test_cli_no_text():
    result = _classify_cli("--server", "127.0.0.1:9")
    assert result.returncode == 2
    assert "no text to classify" in result.stderr.decode()


def test_cli_stdin_text(server, tmp_path):
    result = _classify_cli("--server", server.address, "--work-dir", str(tmp_path),
                           "--json", str(tmp_path / "query.json"), "-",
                           stdin=SHORT_TEXT.encode() + b"\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[0] in ("rotten", "fresh")
    assert '"bucket": 16' in (tmp_path / "query.json").read_text()


def test_cli_overlong_text(server, tmp_path):
    result = _classify_cli("--server", server.address, "--work-dir", str(tmp_path),
                           "word " * 40)
    errors = result.stderr.decode()
    assert result.returncode == 2
    assert "more than 32 tokens, the server's largest length bucket" in errors
    assert "--truncate" in errors


def test_cli_model_sha256_mismatch(server, tmp_path):
    result = _classify_cli("--server", server.address, "--work-dir", str(tmp_path),
                           "--model-sha256", "ab" * 32, SHORT_TEXT)
    assert result.returncode == 2
    assert "weights_sha256 differs" in result.stderr.decode()


# -- server start-up errors -------------------------------------------------------------------


def _serve(*arguments, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "cipherprompt", "serve", "--port", "0",
                           *arguments], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_serve_rejects_inconsistent_checkpoint(tmp_path):
    config = BertConfig(vocab_size=30522, hidden_size=24, num_layers=2, num_heads=3,
                        intermediate_size=40, max_positions=64)
    params = init_params(config, seed=3, scale=0.1)
    params["classifier"]["kernel"] = np.zeros((24, 3), np.float32)
    path = tmp_path / "bad.npz"
    save_checkpoint(path, Checkpoint(params, config, OperatorPlan.preset("exact", 2), 16))
    result = _serve("--checkpoint", str(path), "--work-dir", str(tmp_path))
    assert result.returncode == 2
    assert "does not match its own model configuration" in result.stderr
    assert "classifier/kernel has shape (24, 3), the configuration needs (24, 2)" in result.stderr


def test_serve_rejects_unreadable_checkpoint(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip archive")
    result = _serve("--checkpoint", str(path), "--work-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"checkpoint {path} is unreadable" in result.stderr


def test_serve_rejects_ref2k(tiny, tmp_path):
    # Before the check, this server started and classified every text with the same logits.
    result = _serve("--checkpoint", str(tiny[0]), "--work-dir", str(tmp_path), "--protocol",
                    "REF2K", timeout=120)
    assert result.returncode == 2
    assert ("argument --protocol: SPU protocol 'REF2K' does not work between a server and a "
            "client process") in result.stderr
    assert "Start the server with --protocol CHEETAH or SEMI2K" in result.stderr
    assert "'cipherprompt evaluate' for a classifier checkpoint" in result.stderr


def test_semi2k_logits_match_plaintext(tiny, tmp_path):
    path, params, config, plan = tiny
    arguments = ("--buckets", "16", "--protocol", "SEMI2K")
    texts = (SHORT_TEXT, "dull and boring")
    with ServerProcess(path, tmp_path / "server", extra_args=arguments,
                       start_timeout_s=300) as server:
        with PrivateClassifier(server.address, work_dir=tmp_path / "client") as client:
            predictions = [client.classify(text) for text in texts]
            protocol = client.engine.protocol

    assert protocol == "SEMI2K"
    tokenizer = WordPieceTokenizer()
    for text, prediction in zip(texts, predictions):
        expected = plaintext_logits(params, config, plan, tokenizer, text, 16)
        error = np.abs(prediction.logits - expected).max()
        assert error < LOGIT_BOUND, f"{text!r}: logit error {error:.2e}"


@pytest.mark.parametrize("arguments, message", [
    (("--buckets", "16,abc"), "invalid bucket list '16,abc'"),
    (("--buckets", "16,100"), "length bucket 100 is outside 3..64"),
    (("--buckets", "16", "--max-len", "16"), "pass either --max-len or --buckets"),
])
def test_serve_rejects_invalid_buckets(tiny, tmp_path, arguments, message):
    result = _serve("--checkpoint", str(tiny[0]), "--work-dir", str(tmp_path), *arguments)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_two_concurrent_sessions(tiny, tmp_path):
    arguments = ("--max-sessions", "2", "--buckets", "16")
    with ServerProcess(tiny[0], tmp_path / "server", extra_args=arguments,
                       start_timeout_s=300) as server:
        # Separate processes: SPU's log, the source of cost figures, is one file per process.
        clients = [start_client_loop(server.address, tmp_path / f"client{number}", queries=2)
                   for number in (1, 2)]
        try:
            wait_for(lambda: check_health(server.address)["active_sessions"] == 2, 120,
                     "both sessions to run at once")
            outputs = [client.communicate(timeout=600)[0] for client in clients]
        finally:
            for client in clients:
                client.kill()
                client.wait()
        for client, output in zip(clients, outputs, strict=True):
            assert client.returncode == 0, output
            assert "query 2" in output
        assert server.process.poll() is None
