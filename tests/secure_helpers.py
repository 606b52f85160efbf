"""Shared pieces of the two-party server tests: a tiny checkpoint, waits, RSS and a TCP relay.

The tiny model keeps the real 30,522-token vocabulary (the client tokenizes real text) but has
hidden size 24 and two layers, so each private query takes seconds under CHEETAH.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from cipherprompt.checkpoint import Checkpoint, save_checkpoint
from cipherprompt.models.bert import BertConfig, classify, init_params, pooling_weights
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure.launch import check_health

# Private logits against plaintext float32 logits of the same model. Measured: about 5e-5
# (24 fractional bits, plus SPU's own exp, tanh and reciprocal approximations inside the exact
# operators). A masking or share-handling bug gives errors of order 0.1.
LOGIT_BOUND = 1e-3
SHORT_TEXT = "a gorgeous, witty, seductive movie."

# A client process for fault tests: one session, queries until killed. Prints "query N" after
# each finished query.
CLIENT_LOOP = """
import sys
from cipherprompt.secure.client import PrivateClassifier
with PrivateClassifier(sys.argv[1], work_dir=sys.argv[2]) as client:
    for number in range(int(sys.argv[3])):
        client.classify("a gorgeous, witty, seductive movie.")
        print("query", number + 1, flush=True)
"""


def make_tiny_checkpoint(path: Path, max_len: int = 16):
    config = BertConfig(vocab_size=30522, hidden_size=24, num_layers=2, num_heads=3,
                        intermediate_size=40, max_positions=64)
    params = init_params(config, seed=3, scale=0.1)
    plan = OperatorPlan.preset("exact", config.num_layers)
    save_checkpoint(path, Checkpoint(params, config, plan, max_len,
                                     {"name": "tiny", "label_names": ["rotten", "fresh"]}))
    return path, params, config, plan


def plaintext_logits(params, config, plan, tokenizer, text: str, max_len: int) -> np.ndarray:
    encoded = tokenizer.encode(text, max_len)
    mask = encoded.mask[None, :]
    forward = partial(classify, config=config, plan=plan)
    return np.asarray(forward(params, tokens=encoded.ids[None, :], mask=mask,
                              pool_weights=pooling_weights(mask)))[0]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.2) -> float:
    """Poll ``condition`` until it holds; return the seconds it took; fail after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - started


def wait_for_log(log_path: Path, text: str, timeout_s: float = 30) -> None:
    """Wait until the server's log contains ``text``; the server logs a session's end last."""
    wait_for(lambda: text in log_path.read_text(errors="replace"), timeout_s,
             f"{text!r} in {log_path}")


# Seconds a health probe may take: a loaded 2-core machine can stall the server for seconds.
HEALTH_TIMEOUT_S = 30


def session_states(address: str, **health_options) -> list[str]:
    status = check_health(address, timeout_s=HEALTH_TIMEOUT_S, **health_options)
    return [session["state"] for session in status["sessions"]]


def no_active_sessions(address: str, **health_options) -> bool:
    status = check_health(address, timeout_s=HEALTH_TIMEOUT_S, **health_options)
    return status["active_sessions"] == 0


def assert_no_tracebacks(log_path: Path) -> None:
    """Fail when the server logged an uncaught exception."""
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS line for process {pid}")


def start_client_loop(address: str, work_dir: Path, queries: int = 100) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT_LOOP, address, str(work_dir), str(queries)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


class Relay:
    """A TCP relay on 127.0.0.1 that forwards to ``target`` and records the bytes of each side.

    ``upstream`` contains what the connecting side sent, ``downstream`` what the target replied,
    each as one bytearray per accepted connection.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.upstream: list[bytearray] = []
        self.downstream: list[bytearray] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._closing = False
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                inbound, _ = self._listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target, timeout=10)
            except OSError:
                inbound.close()
                continue
            outbound.settimeout(None)
            sent, answered = bytearray(), bytearray()
            self.upstream.append(sent)
            self.downstream.append(answered)
            self._sockets += [inbound, outbound]
            for source, sink, record in ((inbound, outbound, sent),
                                         (outbound, inbound, answered)):
                threading.Thread(target=self._pump, args=(source, sink, record),
                                 daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        try:
            while chunk := source.recv(1 << 16):
                record += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def sent_bytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.upstream)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
