"""Measure an emulated link: round-trip time and throughput in each direction over one TCP path.

A benchmark states the network it requested. This probe measures what the emulation delivered,
through the same namespaces, ``tbf`` queues and relay that the parties use. It runs as two
processes, ``python -m cipherprompt.bench.probe serve --listen ADDRESS`` on the server's side
and ``python -m cipherprompt.bench.probe measure --connect ADDRESS`` on the client's side, which
prints the figures as one JSON line. It imports neither jax nor SPU, so it starts fast.

Requests on one connection, each a 1-byte command: ``p`` is echoed back (one round trip);
``u`` with an 8-byte length is followed by that many bytes, which the server acknowledges with
one byte once it has them all; ``d`` with an 8-byte length makes the server send that many bytes.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time

from cipherprompt.secure.wire import parse_address

_BLOCK = bytes(1 << 20)


def _recv_exact(sock: socket.socket, count: int) -> None:
    view = memoryview(bytearray(min(count, 1 << 20)))
    remaining = count
    while remaining:
        received = sock.recv_into(view, min(remaining, len(view)))
        if not received:
            raise ConnectionError(f"the peer closed the connection with {remaining} bytes to go")
        remaining -= received


def _send_count(sock: socket.socket, count: int) -> None:
    while count:
        size = min(count, len(_BLOCK))
        sock.sendall(_BLOCK[:size])
        count -= size


def serve(listen: tuple[str, int], connections: int = 1) -> None:
    """Serve ``connections`` probe connections on ``listen``, one after the other."""
    with socket.create_server(listen, reuse_port=False) as listener:
        print("probe ready", flush=True)
        for _ in range(connections):
            connection, _ = listener.accept()
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _answer(connection)


def _answer(connection: socket.socket) -> None:
    while command := connection.recv(1):
        if command == b"p":
            connection.sendall(b"p")
        elif command in (b"u", b"d"):
            header = bytearray()
            while len(header) < 8:
                part = connection.recv(8 - len(header))
                if not part:
                    return
                header += part
            (count,) = struct.unpack(">Q", header)
            if command == b"u":
                _recv_exact(connection, count)
                connection.sendall(b"k")
            else:
                _send_count(connection, count)
        else:
            raise ValueError(f"unknown probe command {command!r}")


def measure(target: tuple[str, int], transfer_bytes: int, pings: int = 20,
            connect_timeout_s: float = 30.0) -> dict:
    """Return the median round-trip time and the throughput each way, in seconds and bit/s.

    Throughput is the transfer size over the time from the request to the last byte, minus one
    measured round trip for the request and acknowledgement.
    """
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            sock = socket.create_connection(target, timeout=connect_timeout_s)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(600)
        round_trips = []
        for _ in range(pings):
            started = time.perf_counter()
            sock.sendall(b"p")
            _recv_exact(sock, 1)
            round_trips.append(time.perf_counter() - started)
        rtt = statistics.median(round_trips)

        started = time.perf_counter()
        sock.sendall(b"u" + struct.pack(">Q", transfer_bytes))
        _send_count(sock, transfer_bytes)
        _recv_exact(sock, 1)
        upload_s = time.perf_counter() - started

        started = time.perf_counter()
        sock.sendall(b"d" + struct.pack(">Q", transfer_bytes))
        _recv_exact(sock, transfer_bytes)
        download_s = time.perf_counter() - started
    return {
        "rtt_s": rtt,
        "rtt_min_s": min(round_trips),
        "transfer_bytes": transfer_bytes,
        "client_to_server_bit_s": 8 * transfer_bytes / max(upload_s - rtt, 1e-9),
        "server_to_client_bit_s": 8 * transfer_bytes / max(download_s - rtt, 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cipherprompt.bench.probe",
                                     description="Measure round-trip time and throughput.")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="serve probe connections")
    server.add_argument("--listen", type=parse_address, required=True, help="HOST:PORT")
    server.add_argument("--connections", type=int, default=1,
                        help="connections to serve before exiting (default: 1)")
    client = commands.add_parser("measure", help="measure through --connect; prints JSON")
    client.add_argument("--connect", type=parse_address, required=True, help="HOST:PORT")
    client.add_argument("--bytes", type=int, default=32 << 20,
                        help="bytes to transfer each way (default: 32 MiB)")
    client.add_argument("--pings", type=int, default=20, help="round trips to time (default: 20)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.listen, args.connections)
    else:
        print(json.dumps(measure(args.connect, args.bytes, args.pings)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
