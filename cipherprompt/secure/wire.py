"""Framed messages on the control connection between client and server.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header ``{"kind", "payload",
"blobs"}`` and then the binary blobs whose lengths the header lists. The control connection
carries the handshake, query requests and the server's output share; the secure computation
itself runs on SPU's own link.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
from dataclasses import dataclass, field

# Version 2: model identity, plan hash and length buckets in the handshake; bucket per query.
PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 1 << 20
MAX_BLOB_BYTES = 1 << 30


class ProtocolError(RuntimeError):
    """The peer sent something that is not a valid frame, or closed the connection early."""


class PeerError(RuntimeError):
    """The peer reported an error and ended the session."""


@dataclass
class Message:
    kind: str
    payload: dict = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)
    # Bytes the frame took on the connection: length prefix, header and blobs.
    size: int = 0


def send_message(sock: socket.socket, kind: str, payload: dict | None = None,
                 blobs: list[bytes] | tuple = ()) -> int:
    """Send one frame; return the number of bytes it took on the connection."""
    header = json.dumps(
        {"kind": kind, "payload": payload or {}, "blobs": [len(blob) for blob in blobs]}
    ).encode()
    frame = struct.pack(">I", len(header)) + header + b"".join(blobs)
    sock.sendall(frame)
    return len(frame)


def _recv_exact(sock: socket.socket, count: int, what: str) -> bytes:
    chunks, received = [], 0
    while received < count:
        chunk = sock.recv(min(count - received, 1 << 20))
        if not chunk:
            raise ProtocolError(
                f"connection closed by peer after {received} of {count} bytes of the {what}"
            )
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket, expected: str | tuple[str, ...] | None = None) -> Message:
    """Read one frame; raise PeerError for an ``error`` frame and ProtocolError for bad input."""
    (length,) = struct.unpack(">I", _recv_exact(sock, 4, "frame length"))
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_recv_exact(sock, length, "frame header").decode("utf-8"))
        kind, payload, sizes = header["kind"], header["payload"], header["blobs"]
        if not isinstance(kind, str) or not isinstance(payload, dict):
            raise TypeError("kind must be a string and payload an object")
        if not all(type(size) is int and 0 <= size <= MAX_BLOB_BYTES for size in sizes):
            raise TypeError(f"invalid blob sizes {sizes!r}")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ProtocolError(f"malformed frame header: {error}") from error
    blobs = [_recv_exact(sock, size, f"{kind} blob") for size in sizes]
    if kind == "error":
        raise PeerError(payload.get("message", "peer reported an unspecified error"))
    if expected is not None:
        allowed = (expected,) if isinstance(expected, str) else expected
        if kind not in allowed:
            raise ProtocolError(f"expected a {' or '.join(allowed)} message, got {kind!r}")
    return Message(kind, payload, blobs, 4 + length + sum(sizes))


def wait_readable(sock: socket.socket, timeout_s: float) -> bool:
    """Wait until ``sock`` has data or end-of-stream to read; return False on timeout.

    A TLS socket may hold decrypted bytes that ``select`` cannot see, so those count first.
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
        return True
    readable, _, _ = select.select([sock], [], [], max(timeout_s, 0.0))
    return bool(readable)


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT``; raise ValueError naming the value and the expected form."""
    host, separator, port = str(text).rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid address {text!r}; expected HOST:PORT, e.g. 127.0.0.1:7870")
    return host.strip("[]"), int(port)


def free_port(host: str) -> int:
    """Return a TCP port that is free on ``host`` now; another process may still take it later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
