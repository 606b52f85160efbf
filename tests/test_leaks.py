"""What leaves the client, and what the server holds, during a private query.

The client's control connection and both directions of SPU's link run through byte-recording
relays on 127.0.0.1. Nothing the client sends may contain its text, its token ids (in any
integer encoding or as JSON) or its one-hot rows (float32, or SPU's 64-bit fixed point). The
server process runs with SPU's reconstruct patched to raise, and its log must not contain the
logits or the probabilities.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import textwrap

import numpy as np
import pytest
from secure_helpers import SHORT_TEXT, Relay, assert_no_tracebacks, make_tiny_checkpoint

from cipherprompt.secure import client as client_module
from cipherprompt.secure import server as server_module
from cipherprompt.secure import worker as worker_module
from cipherprompt.secure.client import PrivateClassifier
from cipherprompt.secure.engine import EngineConfig
from cipherprompt.secure.launch import ServerProcess

VOCAB_SIZE = 30522
# Bytes of zeros kept on each side of a one-hot 1 when searching for a fixed-point row.
ROW_CONTEXT_BYTES = 128

# Loaded by the server's interpreter at start-up: any reconstruction in the server process
# (its session children included) raises and leaves a marker file.
RECONSTRUCT_GUARD = textwrap.dedent("""
    import os
    import spu
    import spu.libspu as libspu

    def _refuse(*args, **kwargs):
        with open(os.environ["CIPHERPROMPT_RECONSTRUCT_MARKER"], "a") as marker:
            marker.write(f"reconstruct called in process {os.getpid()}\\n")
        raise AssertionError("the server process must never reconstruct a secret")

    spu.Io.reconstruct = _refuse
    libspu.IoWrapper.Reconstruct = _refuse
""")


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.npz")[0]
    guard_dir = tmp_path_factory.mktemp("guard")
    (guard_dir / "sitecustomize.py").write_text(RECONSTRUCT_GUARD)
    marker = guard_dir / "reconstruct-called.txt"
    python_path = os.pathsep.join(filter(None, [str(guard_dir), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": python_path, "CIPHERPROMPT_RECONSTRUCT_MARKER": str(marker)}
    with ServerProcess(checkpoint, tmp_path_factory.mktemp("server"), env=env,
                       start_timeout_s=300) as process:
        yield process, marker


def _patterns(client: PrivateClassifier, text: str, bucket: int) -> dict[str, bytes]:
    """Every encoding of the client's secret input that a leak could take."""
    encoded = client.tokenizer.encode(text, bucket)
    ids = encoded.ids[: encoded.length]
    content = ids[1:-1]  # without [CLS] and [SEP], which every text shares
    patterns = {"text": text.encode("utf-8")}
    for word in text.replace(",", " ").replace(".", " ").split():
        if len(word) >= 6:
            patterns[f"word {word!r}"] = word.encode("utf-8")
    for dtype in ("<i4", ">i4", "<i8", ">i8"):
        patterns[f"ids {dtype}"] = content.astype(dtype).tobytes()
        patterns[f"padded ids {dtype}"] = encoded.ids.astype(dtype).tobytes()
    patterns["ids json"] = json.dumps(content.tolist()).encode()
    patterns["ids compact json"] = json.dumps(content.tolist(), separators=(",", ":")).encode()

    row = np.zeros(VOCAB_SIZE, np.float32)
    row[content[0]] = 1.0
    patterns["one-hot row float32"] = row.tobytes()
    # A one-hot row split across messages still has a 1 between long runs of zeros.
    zeros = bytes(ROW_CONTEXT_BYTES)
    patterns["one-hot window float32"] = zeros + np.float32(1.0).tobytes() + zeros
    one = 1 << EngineConfig().fraction_bits  # 1.0 in SPU's 64-bit fixed point
    for order in ("little", "big"):
        patterns[f"one-hot window fixed point {order}"] = zeros + one.to_bytes(8, order) + zeros
    return patterns


def _leaks(data: bytes, patterns: dict[str, bytes]) -> list[str]:
    return [name for name, pattern in patterns.items() if pattern in data]


@pytest.fixture
def relayed_client(guarded_server, tmp_path, monkeypatch):
    """A client whose control connection and SPU link run through recording relays."""
    server, _ = guarded_server
    control = Relay(("127.0.0.1", server.port))
    relays: dict[str, Relay] = {}
    send_message = client_module.send_message
    secure_party = client_module.SecureParty

    def send_through_relay(sock, kind, payload=None, blobs=()):
        if kind == "ready":
            # The server reaches the client's link through a relay.
            host, port = payload["client_link"].rsplit(":", 1)
            relays["client_link"] = Relay((host, int(port)))
            payload = {**payload, "client_link": relays["client_link"].address}
        return send_message(sock, kind, payload, blobs)

    def party_through_relay(rank, server_link, client_link, *args, **kwargs):
        host, port = server_link.rsplit(":", 1)
        relays["server_link"] = Relay((host, int(port)))
        return secure_party(rank, relays["server_link"].address, client_link, *args, **kwargs)

    monkeypatch.setattr(client_module, "send_message", send_through_relay)
    monkeypatch.setattr(client_module, "SecureParty", party_through_relay)
    client = PrivateClassifier(control.address, work_dir=tmp_path)
    try:
        yield client, control, relays
    finally:
        client.close()
        for relay in (control, *relays.values()):
            relay.close()


def test_client_sends_no_plaintext(relayed_client):
    client, control, relays = relayed_client
    client.connect()
    prediction = client.classify(SHORT_TEXT)
    client.close()

    # What the client sent: its control frames, its requests on the link, and its replies to
    # the server's requests on the link.
    sent = {
        "control": control.sent_bytes(),
        "link requests": relays["server_link"].sent_bytes(),
        "link answers": b"".join(bytes(chunk) for chunk in relays["client_link"].downstream),
    }
    patterns = _patterns(client, SHORT_TEXT, prediction.bucket)
    print("\nbytes sent by the client: " + ", ".join(f"{name} {len(data)}"
                                                     for name, data in sent.items()))
    assert len(sent["link requests"]) > 1_000_000, "the relay missed SPU's traffic"
    for name, data in sent.items():
        assert _leaks(data, patterns) == [], f"{name} contains the client's input"

    # The search finds each pattern when it is there.
    for pattern_name, pattern in patterns.items():
        assert _leaks(sent["link requests"] + pattern, {pattern_name: pattern}) == [pattern_name]


def test_server_never_reconstructs(guarded_server, tmp_path):
    server, marker = guarded_server
    with PrivateClassifier(server.address, work_dir=tmp_path) as client:
        prediction = client.classify(SHORT_TEXT)
    assert not marker.exists(), marker.read_text()

    assert_no_tracebacks(server.log_path)
    log = server.log_path.read_text(errors="replace")
    assert "session end" in log
    for value in [*prediction.logits.tolist(), *prediction.probabilities.tolist()]:
        for form in (f"{value:.5f}", f"{value:.6f}", repr(value)):
            assert form not in log, f"the server log contains the output value {form}"
    assert SHORT_TEXT not in log


def test_server_code_never_reconstructs():
    call = re.compile(r"reconstruct\(", re.IGNORECASE)
    for module in (server_module, worker_module):
        assert call.search(inspect.getsource(module)) is None, module.__name__
