"""The server's side of one session, run in a child process forked from the server.

A session runs in its own process because of how SPU's link (spu 0.9.5) fails. When a send on
the link fails, for example because the client was killed mid-query, the link ends the whole
process with exit status 255. Stopping a link also waits for the peer without a time limit.
In a child process either failure ends that one session, and the server can kill a child that
hangs. The child gets the compiled programs and the weights by fork, so a session starts
without loading or compiling anything. It uses only SPU's runtime and NumPy, never JAX.

The child reports to the server through a pipe, one dict per event: ``state``
(``connecting``, ``setup``, ``idle``, ``query``, ``closing``), ``query`` (the accepted request's
fields, such as its bucket, and the link bytes of a finished query) and ``end`` (the outcome and
the control connection's byte counts).

What a session serves comes from its ``SessionRequests``: ``ClassifierRequests`` here, and
``DecoderRequests`` in ``decoder.py`` for text generation.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import numpy as np
import spu.libspu as libspu

from cipherprompt.secure.cost import QueryCost
from cipherprompt.secure.engine import CLIENT_RANK, SERVER_RANK, CompiledModel, EngineConfig
from cipherprompt.secure.party import LinkOptions, SecureParty, describe_spu_error, share_to_blobs
from cipherprompt.secure.wire import (
    Message,
    PeerError,
    ProtocolError,
    recv_message,
    send_message,
    wait_readable,
)

log = logging.getLogger(__name__)

# How often an idle session checks for a shutdown request while it waits for the client.
_POLL_INTERVAL_S = 0.5
# Seconds a session waits after its last query before it ends for a shutdown. The client's link
# acknowledges the last messages asynchronously, and in spu 0.9.5 a failed acknowledgement
# (the server's link gone) ends the client process. The 2 s are an estimate, not a guarantee.
_ACK_GRACE_S = 2.0
# prctl option from <linux/prctl.h>: the signal a process gets when the thread that forked it ends.
_PR_SET_PDEATHSIG = 1


class SessionRequests(Protocol):
    """The requests of one session besides ``close``, checked and run in the child process."""

    # Message kinds the client may send as requests.
    kinds: tuple[str, ...]

    def accept(self, message: Message) -> dict:
        """Check a request; return the fields that name what runs. Raise ValueError if invalid."""

    def run(self, party: SecureParty, accepted: dict) -> tuple[QueryCost, libspu.Share]:
        """Run an accepted request; return its cost and the server's share of the output."""


class ClassifierRequests:
    """``query`` requests of a classifier session: one bucket's program per query."""

    kinds = ("query",)

    def __init__(self, programs: dict[int, CompiledModel],
                 client_shapes: dict[int, dict[str, tuple[int, ...]]]):
        self.programs = programs
        # Shapes of the client's inputs (onehot, mask, pool) per bucket.
        self.client_shapes = client_shapes

    def accept(self, message: Message) -> dict:
        return {"bucket": _check_bucket(message.payload.get("bucket"), self.programs)}

    def run(self, party: SecureParty, accepted: dict) -> tuple[QueryCost, libspu.Share]:
        bucket = accepted["bucket"]
        # The client's inputs are secrets it owns: the server infeeds zero placeholders.
        for name, shape in self.client_shapes[bucket].items():
            party.set_secret(name, np.zeros(shape, np.float32), owner=CLIENT_RANK)
        program = self.programs[bucket]
        cost = party.run(program)
        return cost, party.output_share(program)


@dataclass
class SessionTask:
    """Everything the child process needs to run one session; it arrives by fork, not pickling."""

    session_id: int
    server_link: str
    client_link: str
    engine: EngineConfig
    link: LinkOptions
    requests: SessionRequests
    weights: dict[str, np.ndarray]
    idle_timeout_s: float
    spu_log: Path
    # Descriptors the child inherits from the server and must close: the listening socket and
    # other sessions' connections.
    inherited_fds: list[int] = field(default_factory=list)


class _SessionEnded(Exception):
    """Ends the session loop with an outcome; ``notice`` is sent to the client when set."""

    def __init__(self, outcome: str, notice: str | None = None):
        super().__init__(outcome)
        self.outcome = outcome
        self.notice = notice


class _Counters:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


def run_session_process(task: SessionTask, connection: socket.socket, report: Connection) -> None:
    """Entry point of the child process: run the session, report its end, exit without cleanup.

    The exit skips destructors on purpose: destroying a link whose peer is gone can end the
    process or block (see the module docstring).
    """
    parent = os.getppid()
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process handles Ctrl-C
    die_with_parent(parent)
    for fd in task.inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass

    counters = _Counters()
    try:
        outcome = _serve(task, connection, report, counters, stop_requested)
    except Exception as error:  # the child must always report and exit
        log.exception("session %d failed", task.session_id)
        outcome = f"error: {type(error).__name__}: {error}"
    try:
        report.send({"event": "end", "outcome": outcome, "control_bytes_sent": counters.sent,
                     "control_bytes_received": counters.received})
    except OSError as error:
        log.warning("session %d: reporting the outcome %r failed: %s", task.session_id, outcome,
                    error)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the server's session thread or process ends."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl is unavailable; a session process may outlive a killed server")
    if os.getppid() != parent:  # the server died before prctl took effect
        os._exit(1)


def _serve(task: SessionTask, connection: socket.socket, report: Connection,
           counters: _Counters, stop_requested: list) -> str:
    party = None
    queries = 0
    last_query_end = 0.0
    try:
        report.send({"event": "state", "state": "connecting"})
        party = SecureParty(
            SERVER_RANK, task.server_link, task.client_link, task.engine, task.spu_log,
            task.link, on_linked=lambda: report.send({"event": "state", "state": "setup"}),
        )
        for name, value in task.weights.items():
            party.set_secret(name, value, owner=SERVER_RANK)
        while True:
            report.send({"event": "state", "state": "idle"})
            message = _next_message(task, connection, counters, stop_requested, queries,
                                    last_query_end)
            if message.kind == "close":
                report.send({"event": "state", "state": "closing"})
                party.close()
                return "closed"
            accepted = task.requests.accept(message)
            if stop_requested:
                raise _SessionEnded("shutdown", "the server is shutting down; the query was not "
                                                "run. Reconnect later.")
            # The client starts its side of the run only after this, so a rejected query
            # never leaves the client's link waiting for a server that does not run.
            counters.sent += send_message(connection, "query_accepted", accepted)
            report.send({"event": "state", "state": "query", **accepted})
            cost, share = task.requests.run(party, accepted)
            counters.sent += send_message(
                connection, "output_share",
                {"server_seconds": cost.seconds, **accepted,
                 "server_peak_memory_kib": peak_memory_kib()},
                share_to_blobs(share),
            )
            last_query_end = time.monotonic()
            queries += 1
            report.send({"event": "query", **accepted, "seconds": cost.wall_seconds,
                         "link_bytes_sent": cost.bytes_sent,
                         "link_bytes_received": cost.bytes_received})
    except _SessionEnded as ended:
        if ended.notice is not None:
            _try_send_error(connection, ended.notice, counters)
        return ended.outcome
    except PeerError as error:
        return f"ended by client: {error}"
    except ProtocolError as error:
        _try_send_error(connection, str(error), counters)
        return f"protocol error: {error}"
    except ValueError as error:
        _try_send_error(connection, str(error), counters)
        return f"invalid request: {error}"
    except TimeoutError:
        return "control connection timed out inside a message"
    except OSError as error:
        return f"control connection failed: {error}"
    except RuntimeError as error:
        # SPU raises RuntimeError for link failures, such as a peer silent for longer than
        # the link timeout.
        reason = describe_spu_error(error)
        _try_send_error(connection, f"the secure computation failed on the server: {reason}",
                        counters)
        return f"SPU error: {reason}"


def _next_message(task: SessionTask, connection: socket.socket, counters: _Counters,
                  stop_requested: list, queries: int, last_query_end: float):
    """Wait for the client's next request or ``close``; end the session on idle or shutdown.

    After a shutdown request only ``close`` is accepted; a request gets the shutdown notice.
    """
    deadline = time.monotonic() + task.idle_timeout_s
    shutdown = _SessionEnded(
        "shutdown",
        f"the server is shutting down; the session ended after {queries} queries. "
        "Reconnect later.",
    )
    while True:
        if stop_requested and time.monotonic() - last_query_end >= _ACK_GRACE_S:
            raise shutdown
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _SessionEnded(
                "idle timeout",
                f"session idle for more than {task.idle_timeout_s:g} s; the server closed it. "
                "Reconnect to continue.",
            )
        if wait_readable(connection, min(_POLL_INTERVAL_S, remaining)):
            # Once a frame has started, the whole of it must arrive within the idle timeout.
            connection.settimeout(task.idle_timeout_s)
            message = recv_message(connection, (*task.requests.kinds, "close"))
            counters.received += message.size
            if stop_requested and message.kind != "close":
                raise shutdown
            return message


def _check_bucket(bucket, programs: dict[int, CompiledModel]) -> int:
    if type(bucket) is not int or bucket not in programs:
        raise ValueError(
            f"bucket {bucket!r} is not one of this server's length buckets "
            f"{', '.join(map(str, sorted(programs)))}; pad the tokens to one of them"
        )
    return bucket


def peak_memory_kib(pid: int | str = "self") -> int | None:
    """Return the peak resident set size (VmHWM) of process ``pid`` in KiB, or None if unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def _try_send_error(connection: socket.socket, message: str, counters: _Counters) -> None:
    try:
        counters.sent += send_message(connection, "error", {"message": message})
    except OSError as error:
        log.debug("sending the error %r to the client failed: %s", message, error)
