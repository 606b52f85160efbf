"""A TCP relay that delays each direction by a fixed time: network latency in user space.

Linux adds latency to a link with the ``netem`` queueing discipline. Where that kernel module is
missing, this relay replaces it: every chunk it reads is written to the other side one-way
delay later, in the order it arrived, in both directions. Bandwidth is limited by ``tc tbf`` on
the emulated link; where ``tc`` cannot be used, the relay can also pace each direction to a rate.

What the relay does not emulate: TCP over a long path. The sender's TCP connection ends at the
relay, a hop with almost no delay, so slow start, congestion control and losses happen on that
short hop only. A real network with the same latency and bandwidth can be slower, not faster.

The relay reads at most ``buffer_bytes`` ahead per direction, so a fast sender is slowed by TCP
flow control instead of filling the relay's memory. That caps a direction's throughput at
``buffer_bytes`` per one-way delay (16 MiB per 20 ms is 6.7 Gbit/s).

Run as a process: ``python -m cipherprompt.bench.relay --route LISTEN=TARGET --delay-ms D``.
It prints one ``relay ready`` line once it listens and writes its byte counts as JSON to
``--stats-file`` when it gets SIGTERM or SIGINT. It imports neither jax nor SPU, so it starts fast.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cipherprompt.files import write_json
from cipherprompt.secure.wire import parse_address

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 16 << 20
# Largest read from a socket. Each chunk read is delayed and written as one piece.
_CHUNK_BYTES = 256 << 10
# How long the relay keeps trying to reach a target that refuses connections. A party's link
# may dial its peer before the peer listens, so the relay keeps the accepted connection open.
_CONNECT_TIMEOUT_S = 60.0
_CONNECT_RETRY_S = 0.1


@dataclass(frozen=True)
class Route:
    """Connections accepted on ``listen`` are forwarded to ``target``."""

    listen: tuple[str, int]
    target: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Route:
        """Parse ``LISTEN_HOST:PORT=TARGET_HOST:PORT``."""
        listen, separator, target = text.partition("=")
        if not separator:
            raise ValueError(f"invalid route {text!r}; expected LISTEN_HOST:PORT=TARGET_HOST:PORT")
        return cls(parse_address(listen), parse_address(target))

    def __str__(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}={self.target[0]}:{self.target[1]}"


@dataclass
class RouteStats:
    route: str
    connections: int = 0
    # Bytes from the connecting side to the target, and back.
    bytes_forward: int = 0
    bytes_backward: int = 0


class _Direction:
    """One direction of one connection: a reader thread queues chunks, a writer sends them due."""

    def __init__(self, source: socket.socket, sink: socket.socket, delay_s: float,
                 rate_byte_s: float | None, buffer_bytes: int, on_bytes, on_error):
        self.source = source
        self.sink = sink
        self.delay_s = delay_s
        self.rate_byte_s = rate_byte_s
        self.buffer_bytes = buffer_bytes
        self.on_bytes = on_bytes
        self.on_error = on_error
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued_bytes = 0
        self.condition = threading.Condition()
        self.link_free_at = 0.0
        self.stopped = False
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify_all()

    def _due_time(self, size: int) -> float:
        now = time.monotonic()
        if self.rate_byte_s is None:
            return now + self.delay_s
        # Serialise the chunk at the paced rate after the previous one, then add the delay.
        self.link_free_at = max(now, self.link_free_at) + size / self.rate_byte_s
        return self.link_free_at + self.delay_s

    def _read(self) -> None:
        while True:
            try:
                chunk = self.source.recv(_CHUNK_BYTES)
            except OSError:
                chunk = b""
            with self.condition:
                while self.queued_bytes >= self.buffer_bytes and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                # An empty chunk marks the end of the stream, which is passed on after the delay too.
                self.queue.append((self._due_time(len(chunk)), chunk or None))
                self.queued_bytes += len(chunk)
                self.condition.notify_all()
            if not chunk:
                return

    def _write(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                due, chunk = self.queue[0]
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                if chunk is None:
                    self.sink.shutdown(socket.SHUT_WR)
                else:
                    self.sink.sendall(chunk)
            except OSError as error:
                self.on_error(error)
                return
            with self.condition:
                self.queue.popleft()
                if chunk is not None:
                    self.queued_bytes -= len(chunk)
                self.condition.notify_all()
            if chunk is None:
                return
            self.on_bytes(len(chunk))


class DelayRelay:
    """Forward TCP connections along ``routes``, delaying each direction by ``one_way_delay_s``.

    ``rate_bit_s`` paces each direction of each connection to that rate (None: no limit). Use it
    only where the link cannot be shaped by ``tc``: it applies per connection, not per link.
    """

    def __init__(self, routes: list[Route], one_way_delay_s: float,
                 rate_bit_s: float | None = None, buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        if not routes:
            raise ValueError("the relay needs at least one route")
        if one_way_delay_s < 0:
            raise ValueError(f"the one-way delay must not be negative, got {one_way_delay_s} s")
        if rate_bit_s is not None and rate_bit_s <= 0:
            raise ValueError(f"the rate must be positive, got {rate_bit_s} bit/s")
        if buffer_bytes < _CHUNK_BYTES:
            raise ValueError(f"buffer_bytes must be at least {_CHUNK_BYTES}, got {buffer_bytes}")
        self.routes = list(routes)
        self.delay_s = one_way_delay_s
        self.rate_byte_s = None if rate_bit_s is None else rate_bit_s / 8
        self.buffer_bytes = buffer_bytes
        self.stats = [RouteStats(str(route)) for route in self.routes]
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._sockets: set[socket.socket] = set()
        self._directions: list[_Direction] = []
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> list[tuple[str, int]]:
        """Listen on every route and return the bound addresses (port 0 picks a free port)."""
        try:
            for route in self.routes:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listeners.append(listener)
                try:
                    listener.bind(route.listen)
                except OSError as error:
                    raise OSError(error.errno, f"the relay cannot listen on "
                                  f"{route.listen[0]}:{route.listen[1]}: {error.strerror}") from None
                listener.listen(16)
        except BaseException:
            self.close()
            raise
        for index, listener in enumerate(self._listeners):
            thread = threading.Thread(target=self._accept, args=(index, listener), daemon=True)
            thread.start()
            self._threads.append(thread)
        return [listener.getsockname()[:2] for listener in self._listeners]

    def _accept(self, index: int, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                inbound, _ = listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._connect, args=(index, inbound), daemon=True)
            thread.start()

    def _connect(self, index: int, inbound: socket.socket) -> None:
        target = self.routes[index].target
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while True:
            try:
                outbound = socket.create_connection(target, timeout=10)
                break
            except OSError as error:
                if self._closing.is_set() or time.monotonic() > deadline:
                    log.warning("relay: connecting to %s:%d failed: %s; dropping the connection",
                                target[0], target[1], error)
                    inbound.close()
                    return
                time.sleep(_CONNECT_RETRY_S)
        stats = self.stats[index]
        for sock in (inbound, outbound):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def fail(error: OSError) -> None:
            # A write failed: the peer is gone, so end both directions of this connection.
            log.debug("relay: connection to %s ended: %s", target, error)
            for sock in (inbound, outbound):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def count(attribute: str):
            def add(size: int) -> None:
                with self._lock:
                    setattr(stats, attribute, getattr(stats, attribute) + size)
            return add

        directions = [
            _Direction(inbound, outbound, self.delay_s, self.rate_byte_s, self.buffer_bytes,
                       count("bytes_forward"), fail),
            _Direction(outbound, inbound, self.delay_s, self.rate_byte_s, self.buffer_bytes,
                       count("bytes_backward"), fail),
        ]
        with self._lock:
            if self._closing.is_set():
                inbound.close()
                outbound.close()
                return
            stats.connections += 1
            self._sockets.update((inbound, outbound))
            self._directions.extend(directions)
        for direction in directions:
            direction.start()

    def snapshot(self) -> list[dict]:
        """Return the byte counts per route so far."""
        with self._lock:
            return [vars(stats).copy() for stats in self.stats]

    def close(self) -> None:
        """Stop listening and end every connection, dropping the data still queued."""
        self._closing.set()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            sockets, directions = list(self._sockets), list(self._directions)
        for direction in directions:
            direction.stop()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cipherprompt.bench.relay",
        description="Forward TCP connections, delaying each direction by a fixed time.")
    parser.add_argument("--route", action="append", required=True, type=Route.parse,
                        help="LISTEN_HOST:PORT=TARGET_HOST:PORT; may be repeated")
    parser.add_argument("--delay-ms", type=float, required=True,
                        help="one-way delay in milliseconds, added in each direction")
    parser.add_argument("--rate-mbit", type=float, default=None,
                        help="pace each direction of each connection to this rate in Mbit/s "
                             "(default: no limit)")
    parser.add_argument("--stats-file", type=Path, default=None,
                        help="write the byte counts per route here as JSON on exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s relay: %(message)s")

    relay = DelayRelay(args.route, args.delay_ms / 1000,
                       None if args.rate_mbit is None else args.rate_mbit * 1e6)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    try:
        addresses = relay.start()
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("relay ready: " + " ".join(f"{host}:{port}" for host, port in addresses), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        relay.close()
        if args.stats_file is not None:
            write_json(args.stats_file, {"routes": relay.snapshot()})
    log.info("stopped (pid %d)", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
