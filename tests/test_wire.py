"""Framed control messages over a local socket pair, and address parsing."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from cipherprompt.secure.wire import (
    MAX_HEADER_BYTES,
    PeerError,
    ProtocolError,
    parse_address,
    recv_message,
    send_message,
)


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    left.settimeout(5.0)
    right.settimeout(5.0)
    yield left, right
    left.close()
    right.close()


def send_raw_header(sock: socket.socket, header: bytes, tail: bytes = b"") -> None:
    sock.sendall(struct.pack(">I", len(header)) + header + tail)


def test_round_trip_with_blobs(pair):
    left, right = pair
    blobs = [b"\x00\x01\x02", b"", bytes(range(256)) * 10]

    send_message(left, "query", {"id": 3, "plan": "exact"}, blobs)
    message = recv_message(right, expected="query")

    assert message.kind == "query"
    assert message.payload == {"id": 3, "plan": "exact"}
    assert message.blobs == blobs


def test_round_trip_without_payload(pair):
    left, right = pair

    send_message(left, "bye")
    message = recv_message(right)

    assert message.kind == "bye"
    assert message.payload == {}
    assert message.blobs == []


def test_consecutive_frames_stay_apart(pair):
    left, right = pair

    send_message(left, "first", {"n": 1}, [b"abc"])
    send_message(left, "second", {"n": 2}, [b"defg"])

    first = recv_message(right)
    second = recv_message(right)
    assert (first.kind, first.blobs) == ("first", [b"abc"])
    assert (second.kind, second.blobs) == ("second", [b"defg"])


def test_expected_kinds_tuple(pair):
    left, right = pair

    send_message(left, "result", {"ok": True})

    assert recv_message(right, expected=("error", "result")).kind == "result"


def test_error_frame_raises_peer_error(pair):
    left, right = pair

    send_message(left, "error", {"message": "plan digest mismatch"})

    with pytest.raises(PeerError, match="plan digest mismatch"):
        recv_message(right, expected="result")


def test_error_frame_without_message(pair):
    left, right = pair

    send_message(left, "error")

    with pytest.raises(PeerError, match="unspecified error"):
        recv_message(right)


def test_unexpected_kind(pair):
    left, right = pair

    send_message(left, "query")

    with pytest.raises(ProtocolError) as raised:
        recv_message(right, expected=("hello", "result"))

    message = str(raised.value)
    assert "hello or result" in message
    assert "'query'" in message


def test_peer_closes_mid_blob(pair):
    left, right = pair
    header = json.dumps({"kind": "share", "payload": {}, "blobs": [100]}).encode()

    send_raw_header(left, header, b"x" * 10)
    left.close()

    with pytest.raises(ProtocolError, match="after 10 of 100 bytes"):
        recv_message(right)


def test_peer_closes_mid_header(pair):
    left, right = pair

    left.sendall(struct.pack(">I", 50) + b'{"kind": ')
    left.close()

    with pytest.raises(ProtocolError, match="frame header"):
        recv_message(right)


def test_peer_closes_before_length(pair):
    left, right = pair

    left.sendall(b"\x00\x00")
    left.close()

    with pytest.raises(ProtocolError, match="frame length"):
        recv_message(right)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b"\xff\xfe",
        b'["kind", "payload"]',
        b'{"kind": "query", "payload": {}}',
        b'{"kind": 7, "payload": {}, "blobs": []}',
        b'{"kind": "query", "payload": [], "blobs": []}',
        b'{"kind": "query", "payload": {}, "blobs": [-1]}',
        b'{"kind": "query", "payload": {}, "blobs": ["3"]}',
    ],
)
def test_malformed_header(pair, header):
    left, right = pair

    send_raw_header(left, header)

    with pytest.raises(ProtocolError, match="malformed frame header"):
        recv_message(right)


def test_oversized_header_length(pair):
    left, right = pair

    left.sendall(struct.pack(">I", MAX_HEADER_BYTES + 1))

    with pytest.raises(ProtocolError, match="exceeds"):
        recv_message(right)


def test_parse_address_host_port():
    assert parse_address("127.0.0.1:7870") == ("127.0.0.1", 7870)
    assert parse_address("[::1]:7870") == ("::1", 7870)
    assert parse_address("server.example:65535") == ("server.example", 65535)


@pytest.mark.parametrize("text", ["localhost", ":80", "host:0", "host:70000", "host:abc", "host:"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError) as raised:
        parse_address(text)

    message = str(raised.value)
    assert repr(text) in message
    assert "HOST:PORT" in message
