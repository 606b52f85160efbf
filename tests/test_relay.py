"""The delay relay: exact forwarding both ways, the added delay, half-close, its process form.

The delay checks are lower bounds: load on the machine can only make a round trip slower, so a
round trip shorter than the configured delay means the relay did not delay.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cipherprompt.bench.relay import DelayRelay, Route


class EchoServer:
    """A TCP server on 127.0.0.1 that sends back what it receives, then closes on end of stream."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection):
        with connection:
            while chunk := connection.recv(1 << 16):
                connection.sendall(chunk)

    def close(self):
        self.listener.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def _relay_to(port: int, delay_s: float, rate_bit_s: float | None = None) -> tuple[DelayRelay, int]:
    relay = DelayRelay([Route(("127.0.0.1", 0), ("127.0.0.1", port))], delay_s, rate_bit_s)
    (address,) = relay.start()
    return relay, address[1]


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _send_and_collect(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and return everything that comes back until end of stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        received = []
        reader = threading.Thread(target=lambda: received.append(_recv_all(sock)))
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(30)
    assert not reader.is_alive(), "the relay did not pass on the end of the stream"
    return received[0]


def test_relay_forwards_bytes_exactly(echo):
    payload = os.urandom(3 << 20)  # several chunks, so their order matters
    relay, port = _relay_to(echo.port, delay_s=0.0)
    try:
        echoed = _send_and_collect(port, payload)
    finally:
        relay.close()
    assert len(echoed) == len(payload)
    assert echoed == payload
    (stats,) = relay.snapshot()
    assert stats["connections"] == 1
    assert stats["bytes_forward"] == len(payload)
    assert stats["bytes_backward"] == len(payload)


def test_relay_keeps_order_when_paced(echo):
    payload = os.urandom(1 << 20)
    relay, port = _relay_to(echo.port, delay_s=0.002, rate_bit_s=200e6)
    try:
        echoed = _send_and_collect(port, payload)
    finally:
        relay.close()
    assert echoed == payload


def test_relay_delays_round_trip(echo):
    one_way = 0.05
    relay, port = _relay_to(echo.port, delay_s=one_way)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            round_trips = []
            for _ in range(3):
                started = time.perf_counter()
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                round_trips.append(time.perf_counter() - started)
    finally:
        relay.close()
    # Each byte waits one_way on the way out and again on the way back.
    assert min(round_trips) >= 2 * one_way, f"round trips {round_trips} shorter than 2 x {one_way}"


def test_relay_paces_to_rate(echo):
    rate_bit_s = 40e6
    payload = os.urandom(1 << 20)
    relay, port = _relay_to(echo.port, delay_s=0.0, rate_bit_s=rate_bit_s)
    try:
        started = time.perf_counter()
        _send_and_collect(port, payload)
        elapsed = time.perf_counter() - started
    finally:
        relay.close()
    # Both directions are paced, one after the other at most overlapping: at least one transfer.
    assert elapsed >= 8 * len(payload) / rate_bit_s


def test_relay_passes_half_close(echo):
    relay, port = _relay_to(echo.port, delay_s=0.01)
    try:
        echoed = _send_and_collect(port, b"last words")
    finally:
        relay.close()
    assert echoed == b"last words"


def test_relay_waits_for_late_target():
    # A party's link may dial its peer before the peer listens: the relay keeps retrying.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        late_port = probe.getsockname()[1]
    relay, port = _relay_to(late_port, delay_s=0.0)
    server = None
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        time.sleep(0.5)
        server = socket.create_server(("127.0.0.1", late_port))
        accepted, _ = server.accept()
        client.sendall(b"hello")
        assert accepted.recv(5) == b"hello"
        accepted.close()
        client.close()
    finally:
        relay.close()
        if server is not None:
            server.close()


def test_route_parse_rejects_malformed():
    assert Route.parse("127.0.0.1:1=10.0.0.2:2") == Route(("127.0.0.1", 1), ("10.0.0.2", 2))
    for text in ("127.0.0.1:1", "127.0.0.1=10.0.0.2:2", "a:1=b:x"):
        with pytest.raises(ValueError, match="expected"):
            Route.parse(text)


def test_relay_rejects_negative_delay():
    with pytest.raises(ValueError, match="must not be negative"):
        DelayRelay([Route(("127.0.0.1", 0), ("127.0.0.1", 1))], -0.001)


def test_relay_process_writes_stats_on_sigterm(echo, tmp_path):
    stats_file = tmp_path / "stats.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen_port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "cipherprompt.bench.relay", "--route",
         f"127.0.0.1:{listen_port}=127.0.0.1:{echo.port}", "--delay-ms", "1",
         "--stats-file", str(stats_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("relay ready")
        assert _send_and_collect(listen_port, b"abc" * 1000) == b"abc" * 1000
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    (route,) = json.loads(stats_file.read_text())["routes"]
    assert route["bytes_forward"] == 3000
    assert route["bytes_backward"] == 3000
