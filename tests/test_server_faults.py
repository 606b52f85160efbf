"""Faulty clients against one server process: each fault ends its own session only.

Every test checks that the server is still serving afterwards. Measured recovery times are
printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from secure_helpers import (
    SHORT_TEXT,
    assert_no_tracebacks,
    make_tiny_checkpoint,
    no_active_sessions,
    rss_kib,
    session_states,
    start_client_loop,
    wait_for,
    wait_for_log,
)

from cipherprompt.secure.client import HandshakeError, PrivateClassifier
from cipherprompt.secure.handshake import READY_FIELDS
from cipherprompt.secure.launch import ServerProcess, check_health
from cipherprompt.secure.wire import (
    PROTOCOL_VERSION,
    PeerError,
    recv_message,
    send_message,
)
from cipherprompt.tokenizer import TextTooLongError

IDLE_TIMEOUT_S = 20
# Long enough for one protocol step of the tiny model on a loaded 2-core machine. The server
# also gives a client's link this long to connect.
LINK_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.npz")[0]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("server")
    arguments = ("--idle-timeout", str(IDLE_TIMEOUT_S), "--link-timeout", str(LINK_TIMEOUT_S),
                 "--shutdown-grace", "20")
    with ServerProcess(checkpoint, work_dir, extra_args=arguments,
                       start_timeout_s=300) as process:
        yield process


def _assert_serving(server) -> None:
    """Check that the process runs, has no session left, and replies to a new client's hello."""
    assert server.process.poll() is None
    assert_no_tracebacks(server.log_path)
    wait_for(lambda: no_active_sessions(server.address), 60, "the session to end")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        send_message(sock, "hello", {"protocol_version": PROTOCOL_VERSION})
        welcome = recv_message(sock, "welcome").payload
    assert welcome["model"] == "tiny"
    wait_for(lambda: no_active_sessions(server.address), 60, "the probe session to end")


def _wait_for_query(address: str, client: subprocess.Popen) -> None:
    def querying() -> bool:
        assert client.poll() is None, f"client exited early: {client.stdout.read()}"
        return "query" in session_states(address)

    wait_for(querying, 300, "the client's query to start")


def _raw_session(server):
    """Open a control connection through hello and welcome; return (socket, welcome)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    send_message(sock, "hello", {"protocol_version": PROTOCOL_VERSION})
    return sock, recv_message(sock, "welcome").payload


def test_client_killed_mid_query(server, tmp_path):
    client = start_client_loop(server.address, tmp_path / "killed")
    try:
        _wait_for_query(server.address, client)
        client.kill()
        killed = time.monotonic()
        client.wait()
        recovery = wait_for(lambda: no_active_sessions(server.address), 60,
                            "the killed client's session to end")
    finally:
        client.kill()
        client.wait()
    print(f"\nclient SIGKILLed mid-query: session ended {recovery:.2f} s later")
    assert recovery < 10

    started = time.monotonic()
    with PrivateClassifier(server.address, work_dir=tmp_path / "next") as next_client:
        assert next_client.classify(SHORT_TEXT).label in (0, 1)
    print(f"next client: connected and answered {time.monotonic() - killed:.1f} s after the kill "
          f"({time.monotonic() - started:.1f} s for its own session)")
    wait_for_log(server.log_path, "client closed the control connection during query")
    assert server.process.poll() is None


@pytest.mark.slow
def test_client_stopped_mid_query(server, tmp_path):
    client = start_client_loop(server.address, tmp_path / "stopped")
    try:
        _wait_for_query(server.address, client)
        os.kill(client.pid, signal.SIGSTOP)
        # A receive waits for the link timeout; a send times out, is retried once and fails.
        recovery = wait_for(lambda: no_active_sessions(server.address), 2 * LINK_TIMEOUT_S + 60,
                            "the stopped client's session to end")
    finally:
        client.kill()
        client.wait()
    print(f"\nclient SIGSTOPped mid-query: session ended {recovery:.1f} s later "
          f"(link timeout {LINK_TIMEOUT_S} s)")
    _assert_serving(server)


def test_client_silent_after_handshake(server):
    sock, welcome = _raw_session(server)
    with sock:
        terms = {name: welcome[name] for name in READY_FIELDS}
        # Nothing listens at this client_link: the client never starts SPU's runtime.
        send_message(sock, "ready", {**terms, "client_link": f"127.0.0.1:{_free_port()}"})
        recv_message(sock, "start")
        wait_for(lambda: "connecting" in session_states(server.address), 30,
                 "the link to start connecting")
        recovery = wait_for(lambda: no_active_sessions(server.address), LINK_TIMEOUT_S + 60,
                            "the silent client's session to end")
    print(f"\nclient silent after the handshake: session ended {recovery:.1f} s later")
    _assert_serving(server)


def test_client_idle_after_connect(server, tmp_path):
    with PrivateClassifier(server.address, work_dir=tmp_path) as client:
        waited = wait_for(lambda: no_active_sessions(server.address), IDLE_TIMEOUT_S + 60,
                          "the idle session to end")
        with pytest.raises(PeerError, match="idle for more than"):
            client.classify(SHORT_TEXT)
    print(f"\nidle client: session ended {waited:.1f} s after connecting "
          f"(idle timeout {IDLE_TIMEOUT_S} s)")
    wait_for_log(server.log_path, 'outcome="idle timeout"')
    _assert_serving(server)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _send_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and return whatever the server replies."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass  # the server may reset the connection, with our bytes unread, at any point
    return answer


def _frame(header: bytes) -> bytes:
    return struct.pack(">I", len(header)) + header


@pytest.mark.parametrize("data", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-request"),
    pytest.param(struct.pack(">I", 100) + b"x" * 10, id="truncated-frame"),
    pytest.param(_frame(b"{not json"), id="header-not-json"),
    pytest.param(_frame(b'{"kind": "ready", "payload": {}, "blobs": []}'), id="wrong-first-kind"),
    pytest.param(b"\x00\x00", id="truncated-length"),
])
def test_malformed_handshake(server, data):
    _send_raw(server.port, data)
    _assert_serving(server)


@pytest.mark.parametrize("hello, message", [
    ({}, "protocol_version differs: client None"),
    ({"protocol_version": PROTOCOL_VERSION, "expect": "exact"}, "'expect' must be an object"),
    ({"protocol_version": PROTOCOL_VERSION, "expect": {"model": "bert-base"}},
     "model differs: client expects 'bert-base', server has 'tiny'"),
])
def test_invalid_hello(server, hello, message):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        send_message(sock, "hello", hello)
        with pytest.raises(PeerError) as raised:
            recv_message(sock, "welcome")
    assert message in str(raised.value)
    _assert_serving(server)


@pytest.mark.parametrize("client_link, message", [
    ("nonsense", "invalid client_link"),
    ("10.1.2.3:4000", "client_link host 10.1.2.3 differs"),
])
def test_invalid_client_link(server, client_link, message):
    sock, welcome = _raw_session(server)
    with sock:
        terms = {name: welcome[name] for name in READY_FIELDS}
        send_message(sock, "ready", {**terms, "client_link": client_link})
        with pytest.raises(PeerError) as raised:
            recv_message(sock, "start")
    assert message in str(raised.value)
    _assert_serving(server)


def test_disconnect_after_welcome(server):
    sock, _ = _raw_session(server)
    sock.close()
    _assert_serving(server)


def test_plan_mismatch(server, tmp_path):
    client = PrivateClassifier(server.address, work_dir=tmp_path, expected_plan="friendly")
    with pytest.raises(HandshakeError) as raised:
        client.connect()
    message = str(raised.value)
    assert "plan differs" in message
    assert "'friendly'" in message
    assert "'exact'" in message
    wait_for_log(server.log_path,
                 "rejected: plan differs: client expects 'friendly', server has 'exact'")
    _assert_serving(server)


def test_ready_mismatch_names_fields(server):
    sock, welcome = _raw_session(server)
    with sock:
        terms = {name: welcome[name] for name in READY_FIELDS}
        terms["buckets"] = [16, 32]
        terms["plan_sha256"] = "0" * 64
        send_message(sock, "ready", {**terms, "client_link": "127.0.0.1:1"})
        with pytest.raises(PeerError) as raised:
            recv_message(sock, "start")
    message = str(raised.value)
    assert "buckets differs: server [16], client [16, 32]" in message
    assert f"plan_sha256 differs: server '{welcome['plan_sha256']}', client '{'0' * 64}'" in message
    assert "program_sha256" not in message
    _assert_serving(server)


def test_overlong_prompt(server, tmp_path):
    with PrivateClassifier(server.address, work_dir=tmp_path) as client:
        with pytest.raises(TextTooLongError) as raised:
            client.classify("word " * 40)
        assert "16 tokens" in str(raised.value)
        assert "--truncate" in str(raised.value)
        truncated = client.classify("word " * 40, truncate=True)
    assert truncated.num_tokens == 16
    assert truncated.bucket == 16
    _assert_serving(server)


def test_unserved_bucket_ends_session(server, tmp_path):
    client = PrivateClassifier(server.address, work_dir=tmp_path)
    client.connect()
    try:
        send_message(client._socket, "query", {"bucket": 20})
        with pytest.raises(PeerError, match="bucket 20 is not one of this server's length "
                                            "buckets 16"):
            recv_message(client._socket, "output_share")
        client._session_ok = False
    finally:
        client.close()
    _assert_serving(server)


def _sessions_with_rss(server, tmp_path, count: int, query: bool) -> list[int]:
    """Run ``count`` sessions one after another; return the server's RSS in KiB after each."""
    figures = []
    for number in range(count):
        with PrivateClassifier(server.address, work_dir=tmp_path / f"s{number}") as client:
            if query:
                client.classify(SHORT_TEXT)
        wait_for(lambda: no_active_sessions(server.address), 60, "the session to end")
        figures.append(rss_kib(server.process.pid))
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("query", [False, True], ids=["handshake-only", "one-query-each"])
def test_rss_over_twenty_sessions(server, tmp_path, query):
    figures = _sessions_with_rss(server, tmp_path, 20, query)
    growth = (figures[-1] - figures[0]) / figures[0]
    print(f"\nserver RSS over 20 sessions ({'one query each' if query else 'handshake only'}): "
          f"after session 1 {figures[0]} KiB, after session 20 {figures[-1]} KiB, "
          f"max {max(figures)} KiB, growth {100 * growth:+.1f}%")
    print("RSS after each session (KiB): " + json.dumps(figures))
    assert growth <= 0.10
    _assert_serving(server)


def test_server_serves_after_faults(server, tmp_path):
    with PrivateClassifier(server.address, work_dir=tmp_path) as client:
        assert client.classify(SHORT_TEXT).label in (0, 1)
    assert server.process.poll() is None
    status = check_health(server.address)
    assert status["status"] == "serving"
    assert status["sessions_ended"] > 0


# -- shutdown ---------------------------------------------------------------------------------


def test_sigterm_idle_exits_promptly(checkpoint, tmp_path):
    with ServerProcess(checkpoint, tmp_path, start_timeout_s=300) as server:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
        seconds = time.monotonic() - started
    print(f"\nSIGTERM while idle: exit status {code} after {seconds:.2f} s")
    assert code == 0
    assert seconds < 5
    assert "server stopped" in server.log_path.read_text()


def test_sigterm_during_session(checkpoint, tmp_path):
    arguments = ("--shutdown-grace", "120", "--log-json")
    with ServerProcess(checkpoint, tmp_path / "server", extra_args=arguments,
                       start_timeout_s=300) as server:
        client = subprocess.Popen(
            [sys.executable, "-m", "cipherprompt", "classify", "--server", server.address,
             "--work-dir", str(tmp_path / "client"), SHORT_TEXT, SHORT_TEXT, SHORT_TEXT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            _wait_for_query(server.address, client)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=180)
            seconds = time.monotonic() - started
            output, errors = client.communicate(timeout=120)
        finally:
            client.kill()
            client.wait()
    print(f"\nSIGTERM mid-query: server exit status {code} after {seconds:.1f} s; "
          f"client exit status {client.returncode}")
    assert code == 0
    assert output.split()[0] in ("rotten", "fresh"), "the running query finished"
    assert client.returncode == 2
    assert "shutting down" in errors
    ends = [json.loads(line) for line in server.log_path.read_text().splitlines()
            if line.startswith("{") and '"session_end"' in line]
    assert [entry["outcome"] for entry in ends] == ["shutdown"]
    assert ends[0]["queries"] == 1
