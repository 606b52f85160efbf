"""The server role: loads the checkpoint's weights and serves private classification sessions.

``DecoderServer`` in ``decoder_server.py`` serves text generation through the same sessions.

Each client connection is one session: a handshake on the control connection in the server
process, then a child process (``worker.py``) that runs SPU's runtime for all of that client's
queries. The server infeeds its weights as secrets it owns and never reconstructs an output: it
sends its output share to the client. A failure in one session ends that session only: the
server kills a child whose client is gone or silent, logs one line per session end, and keeps
accepting clients.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path

import numpy as np

from cipherprompt.assets import asset_path, sha256_of
from cipherprompt.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from cipherprompt.models.bert import BertConfig, init_params
from cipherprompt.secure.engine import (
    EngineConfig,
    check_two_party_protocol,
    compile_classifier,
    named_weights,
)
from cipherprompt.secure.handshake import (
    READY_FIELDS,
    check_pins,
    find_differences,
    plan_sha256,
    program_set_sha256,
    validate_buckets,
)
from cipherprompt.secure.logs import format_fields
from cipherprompt.secure.party import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_LINK_TIMEOUT_S, LinkOptions
from cipherprompt.secure.tls import TLSFiles, peer_subject, server_context
from cipherprompt.secure.wire import (
    PROTOCOL_VERSION,
    PeerError,
    ProtocolError,
    free_port,
    parse_address,
    recv_message,
    send_message,
)
from cipherprompt.secure.worker import (
    ClassifierRequests,
    SessionRequests,
    SessionTask,
    run_session_process,
)

log = logging.getLogger(__name__)

# The first byte of a TLS record that opens a handshake.
_TLS_HANDSHAKE_RECORD = 0x16
# Seconds the server waits for a child process to finish after the client sent ``close``.
_CLOSE_TIMEOUT_S = 15.0
# Seconds a child may take to notice that an idle client closed the connection.
_IDLE_EOF_GRACE_S = 5.0
# Per-session SPU logs of failed sessions kept for diagnosis; older ones are deleted.
_KEPT_FAILED_LOGS = 20
# Seconds past the link's connect timeout before the server gives up on a client's link.
_CONNECT_MARGIN_S = 5.0
# Seconds a new client waits for a session slot before it gets "busy", so that a client
# arriving while another session is ending is served.
_SLOT_WAIT_S = 5.0

# The child processes never use JAX: they run SPU's runtime on programs compiled before the fork.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7870
    # Sessions served at once; a client arriving when all are busy gets a "busy" error.
    max_sessions: int = 1
    # Seconds the server waits for the client's next control message before ending the session.
    idle_timeout_s: float = 600.0
    # Where per-session SPU logs (the source of cost figures) are written.
    work_dir: Path = Path("cipherprompt-server")
    # Sequence lengths in tokens with one compiled program each; None uses the checkpoint's.
    buckets: tuple[int, ...] | None = None
    # Texts per query. Every program is compiled for this many texts; a client with fewer
    # fills the rest with copies. Batching amortises the products with the weight matrices
    # (the embedding table above all) over several texts.
    batch: int = 1
    # Seconds one step on SPU's link may wait for the client before the session fails.
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S
    # Seconds the SPU link keeps trying to reach the client when a session starts.
    link_connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    # Seconds a new connection may take for TLS, its first message and the handshake. The
    # handshake includes the client's compilation of every bucket's program, which took over
    # 120 s for MiniLM with batch 2 on a loaded 2-core machine.
    handshake_timeout_s: float = 600.0
    # Seconds running queries may take to finish after SIGTERM before their sessions are killed.
    shutdown_grace_s: float = 60.0
    # Certificates for mutual TLS on the control connection and SPU's link; None: no TLS.
    tls: TLSFiles | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        for name in ("idle_timeout_s", "link_timeout_s", "link_connect_timeout_s",
                     "handshake_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be 0 or more, got {self.shutdown_grace_s}")


def check_weights(checkpoint: Checkpoint, path: Path) -> None:
    """Raise CheckpointError when a weight is missing, extra or shaped unlike the configuration."""
    expected = {name: value.shape for name, value in
                named_weights(init_params(checkpoint.config, seed=0)).items()}
    found = {name: value.shape for name, value in named_weights(checkpoint.params).items()}
    problems = [f"{name} is missing" for name in sorted(set(expected) - set(found))]
    problems += [f"{name} is not part of the model" for name in sorted(set(found) - set(expected))]
    problems += [
        f"{name} has shape {found[name]}, the configuration needs {shape}"
        for name, shape in sorted(expected.items())
        if name in found and found[name] != shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise CheckpointError(
            f"checkpoint {path} does not match its own model configuration "
            f"({len(problems)} problems: {shown}); re-export or retrain it"
        )


@dataclass
class ServedModel:
    """The served model: its handshake terms and the requests each session's child runs."""

    # "classify" or "generate"; a client that asks for the other task is rejected.
    task: str
    # Values of the handshake's READY_FIELDS.
    terms: dict
    # Further welcome fields that the client needs to compile the same programs.
    welcome: dict
    buckets: tuple[int, ...]
    weights: dict[str, np.ndarray]
    # Builds the request handler of one session.
    new_requests: Callable[[], SessionRequests]


def load_classifier(checkpoint_path: Path, buckets: tuple[int, ...] | None, max_len: int | None,
                    engine: EngineConfig, batch: int = 1) -> ServedModel:
    """Load and check a classifier checkpoint, and compile one program per length bucket.

    Every program takes ``batch`` texts per query.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    if not isinstance(checkpoint.config, BertConfig):
        raise CheckpointError(
            f"checkpoint {checkpoint_path} contains a decoder, not a classifier; serve it with "
            "'cipherprompt serve-decoder --checkpoint PATH'"
        )
    check_weights(checkpoint, Path(checkpoint_path))
    model_config = checkpoint.config
    if buckets is not None and max_len is not None:
        raise ValueError("pass either max_len or buckets, not both")
    buckets = validate_buckets(buckets or (max_len or checkpoint.max_len,),
                               model_config.max_positions)

    name = checkpoint.metadata.get("name", "bert-classifier")
    log.info("compiling %s (plan %s, buckets %s tokens) for %s", name, checkpoint.plan.name,
             ", ".join(map(str, buckets)), engine.protocol)
    programs = {
        bucket: compile_classifier(model_config, checkpoint.plan, bucket, engine, batch=batch)
        for bucket in buckets
    }
    client_shapes = {
        bucket: {"onehot": (batch, bucket, model_config.vocab_size), "mask": (batch, bucket),
                 "pool": (batch, bucket)}
        for bucket in buckets
    }
    terms = {
        "model": name,
        "weights_sha256": checkpoint.weights_digest(),
        "tokenizer_sha256": checkpoint.metadata.get(
            "tokenizer_sha256", sha256_of(asset_path("minilm_tokenizer"))),
        "plan": checkpoint.plan.name,
        "plan_sha256": plan_sha256(checkpoint.plan),
        "buckets": list(buckets),
        "batch": batch,
        "program_sha256": program_set_sha256(
            {bucket: program.digest for bucket, program in programs.items()}),
    }
    welcome = {
        "programs": {str(bucket): program.digest for bucket, program in programs.items()},
        "architecture": model_config.to_dict(),
        "operator_plan": checkpoint.plan.to_dict(),
        "label_names": list(checkpoint.metadata.get("label_names", [])),
    }
    return ServedModel("classify", terms, welcome, buckets, named_weights(checkpoint.params),
                       lambda: ClassifierRequests(programs, client_shapes))


@dataclass
class SessionRecord:
    """State and counters of one session, the source of its log line and health entry."""

    session_id: int
    peer: str
    started: float = field(default_factory=time.monotonic)
    state: str = "handshake"
    state_since: float = field(default_factory=time.monotonic)
    queries: int = 0
    buckets: collections.Counter = field(default_factory=collections.Counter)
    # Generation steps; each also counts as a query.
    steps: int = 0
    link_bytes_sent: int = 0
    link_bytes_received: int = 0
    control_bytes_sent: int = 0
    control_bytes_received: int = 0
    client_certificate: str | None = None
    outcome: str | None = None

    def enter(self, state: str) -> None:
        self.state = state
        self.state_since = time.monotonic()


class _Rejected(Exception):
    """The handshake failed; the message goes to the client and into the session's outcome."""


class ModelServer:
    """Serves the sessions of one model; ``_load_model`` chooses what a session runs."""

    def __init__(self, checkpoint_path: Path, config: ServerConfig, engine: EngineConfig,
                 max_len: int | None = None):
        # Check the protocol first, so that its error does not wait for the model's compilation.
        check_two_party_protocol(engine.protocol)
        if engine.protocol == "SEMI2K":
            log.warning("protocol SEMI2K: this server is SPU's trusted first party, which "
                        "can compute every Beaver triple, so it could recover the clients' "
                        "inputs. Serve with --protocol CHEETAH to keep them private")
        self.config = config
        self.engine = engine
        # TLS files first: their errors should not wait for the checkpoint and the compilation.
        self._tls_context = server_context(config.tls) if config.tls is not None else None
        self.served = self._load_model(Path(checkpoint_path), max_len)
        self.buckets = self.served.buckets
        self.max_len = self.buckets[-1]
        self.terms = self.served.terms

        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self._spu_log_dir = self.config.work_dir / "spu-sessions"
        self._spu_log_dir.mkdir(exist_ok=True)
        self._slots = threading.BoundedSemaphore(config.max_sessions)
        self._session_ids = itertools.count(1)
        self._sessions: dict[int, SessionRecord] = {}
        self._sessions_ended = 0
        # Re-entrant, because stop() may run in a signal handler while the main thread has it.
        self._lock = threading.RLock()
        # Held while forking, so a child inherits a consistent list of descriptors to close.
        self._fork_lock = threading.Lock()
        self._open_fds: set[int] = set()
        self._handshaking: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")
        self._listener: socket.socket | None = None
        self._started = time.monotonic()

    def _load_model(self, checkpoint_path: Path, max_len: int | None) -> ServedModel:
        return load_classifier(checkpoint_path, self.config.buckets, max_len, self.engine,
                               self.config.batch)

    # -- listening and shutdown ---------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Open the listening socket; raise OSError naming the address when it is in use."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.config.host, self.config.port))
        except OSError as error:
            listener.close()
            raise OSError(
                error.errno,
                f"cannot listen on {self.config.host}:{self.config.port} ({error.strerror}); "
                "choose another port with --port",
            ) from error
        listener.listen(16)
        self._listener = listener
        self._open_fds.add(listener.fileno())
        return listener.getsockname()[:2]

    def serve_forever(self) -> None:
        """Accept clients until ``stop``; then end the running sessions and return."""
        if self._listener is None:
            self.bind()
        host, port = self._listener.getsockname()[:2]
        log.info("serving %s on %s:%d (program %s, buckets %s, %s)", self.terms["model"], host,
                 port, self.terms["program_sha256"][:16], ", ".join(map(str, self.buckets)),
                 "mutual TLS" if self._tls_context else "no TLS")
        self._listener.settimeout(0.5)
        try:
            while not self._stopping.is_set():
                try:
                    connection, peer = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as error:
                    if self._stopping.is_set():
                        break
                    # For example too many open files: keep serving the sessions that run.
                    log.warning("accepting a connection failed: %s; retrying in 1 s", error)
                    time.sleep(1.0)
                    continue
                thread = threading.Thread(target=self._handle_connection,
                                          args=(connection, peer), daemon=True)
                with self._lock:
                    self._threads.add(thread)
                thread.start()
        except KeyboardInterrupt:
            log.info("interrupted; stopping")
        finally:
            if not self._stopping.is_set():
                self.stop()
            self._finish_sessions()
        fields = {"event": "server_stop", "sessions_ended": self._sessions_ended}
        log.info("server stopped: %s", format_fields(fields), extra={"fields": fields})

    def stop(self) -> None:
        """Stop accepting clients and give running queries ``shutdown_grace_s`` to finish.

        A second call ends the grace period at once. Safe to call from a signal handler: it
        only sets flags and closes sockets.
        """
        if self._stopping.is_set():
            self._stop_deadline = time.monotonic()
            return
        self._stop_deadline = time.monotonic() + self.config.shutdown_grace_s
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            handshaking = list(self._handshaking)
        for connection in handshaking:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _finish_sessions(self) -> None:
        with self._lock:
            threads = list(self._threads)
            active = len(self._sessions)
        if active:
            log.info("stopping: waiting up to %.0f s for %d sessions to end",
                     self.config.shutdown_grace_s, active)
        for thread in threads:
            # Each session thread kills its child at the stop deadline, so these joins end.
            thread.join(timeout=max(self._stop_deadline - time.monotonic(), 0) + 10)

    # -- connections ---------------------------------------------------------------------------

    def _handle_connection(self, raw: socket.socket, peer) -> None:
        """Reply to a health probe, or run a session if a slot is free."""
        peer_text = f"{peer[0]}:{peer[1]}"
        fd = raw.fileno()
        connection = raw
        with self._lock:
            self._open_fds.add(fd)
            self._handshaking.add(raw)
        try:
            raw.settimeout(self.config.handshake_timeout_s)
            if self._tls_context is not None:
                connection = self._start_tls(raw, peer_text)
                if connection is None:
                    return
                with self._lock:
                    self._handshaking.discard(raw)
                    self._handshaking.add(connection)
            first = recv_message(connection, ("hello", "health"))
            if first.kind == "health":
                self._answer_health(connection)
                return
            self._start_session(connection, peer_text, first)
        except (ProtocolError, PeerError, OSError) as error:
            log.warning("connection from %s dropped before a session: %s", peer_text, error)
        except Exception:  # a bug must end this connection only
            log.exception("connection from %s failed", peer_text)
        finally:
            with self._lock:
                self._open_fds.discard(fd)
                self._handshaking.discard(raw)
                self._handshaking.discard(connection)
                self._threads.discard(threading.current_thread())
            if connection is not None:
                connection.close()
            raw.close()  # a no-op once TLS took the descriptor over

    def _start_tls(self, connection: socket.socket, peer: str) -> ssl.SSLSocket | None:
        """Wrap ``connection`` in TLS; send an error frame to a client that does not start TLS."""
        first = connection.recv(1, socket.MSG_PEEK)
        if not first:
            log.warning("connection from %s closed before sending anything", peer)
            return None
        if first[0] != _TLS_HANDSHAKE_RECORD:
            log.warning("connection from %s rejected: it did not start TLS", peer)
            self._try_send_error(connection, "this server requires TLS; pass --tls-ca, "
                                             "--tls-cert and --tls-key (see cipherprompt "
                                             "make-certs)")
            return None
        try:
            return self._tls_context.wrap_socket(connection, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.warning("TLS handshake with %s failed: %s", peer,
                        getattr(error, "reason", None) or error)
            return None

    def _answer_health(self, connection: socket.socket) -> None:
        now = time.monotonic()
        with self._lock:
            sessions = [
                {"id": record.session_id, "state": record.state,
                 "seconds": round(now - record.started, 1), "queries": record.queries}
                for record in self._sessions.values()
            ]
            ended = self._sessions_ended
        try:
            send_message(connection, "health", {
                "status": "stopping" if self._stopping.is_set() else "serving",
                "protocol_version": PROTOCOL_VERSION,
                **self.terms,
                "task": self.served.task,
                "max_len": self.max_len,
                "engine": self.engine.protocol,
                "tls": self._tls_context is not None,
                "active_sessions": len(sessions),
                "max_sessions": self.config.max_sessions,
                "sessions": sessions,
                "sessions_ended": ended,
                "uptime_s": round(now - self._started, 1),
            })
        except OSError as error:
            log.debug("replying to a health probe failed: %s", error)

    @staticmethod
    def _try_send_error(connection: socket.socket, message: str) -> int:
        try:
            return send_message(connection, "error", {"message": message})
        except OSError as error:
            log.debug("sending the error %r failed: %s", message, error)
            return 0

    # -- sessions ------------------------------------------------------------------------------

    def _start_session(self, connection: socket.socket, peer: str, hello) -> None:
        session_id = next(self._session_ids)
        if self._stopping.is_set():
            self._try_send_error(connection, "the server is shutting down; retry later")
            return
        if not self._slots.acquire(timeout=_SLOT_WAIT_S):
            log.warning("session %d from %s rejected: all %d sessions busy", session_id, peer,
                        self.config.max_sessions)
            self._try_send_error(
                connection,
                f"server busy: all {self.config.max_sessions} sessions are in use; retry later",
            )
            return
        record = SessionRecord(session_id, peer, control_bytes_received=hello.size)
        with self._lock:
            self._sessions[session_id] = record
        log.info("session %d start: peer %s", session_id, peer)
        try:
            task = self._handshake(connection, record, hello.payload)
            with self._lock:
                # From here on, stop() lets the session end itself instead of cutting it off.
                self._handshaking.discard(connection)
            self._supervise(connection, record, task)
        except _Rejected as error:
            record.outcome = f"rejected: {error}"
            record.control_bytes_sent += self._try_send_error(connection, str(error))
        except PeerError as error:
            record.outcome = f"rejected by client: {error}"
        except (ProtocolError, OSError) as error:
            record.outcome = f"handshake failed: {error}"
        except Exception as error:  # a bug must end this session only
            log.exception("session %d failed", session_id)
            record.outcome = f"internal error: {type(error).__name__}: {error}"
        finally:
            with self._lock:
                del self._sessions[session_id]
                self._sessions_ended += 1
            self._slots.release()
            self._log_session_end(record)

    def _handshake(self, connection: socket.socket, record: SessionRecord,
                   hello: dict) -> SessionTask:
        """Check the client's terms; return the session's task once both sides agree."""
        if hello.get("protocol_version") != PROTOCOL_VERSION:
            raise _Rejected(
                f"protocol_version differs: client {hello.get('protocol_version')!r}, server "
                f"{PROTOCOL_VERSION}; install the same cipherprompt version on both sides"
            )
        # Clients from before text generation send no task: they classify.
        requested_task = hello.get("task", "classify")
        if requested_task != self.served.task:
            command = "generate" if self.served.task == "generate" else "classify"
            raise _Rejected(
                f"task differs: client requests {requested_task!r}, this server serves "
                f"{self.served.task!r}; use 'cipherprompt {command}' with this server"
            )
        if isinstance(connection, ssl.SSLSocket):
            record.client_certificate = peer_subject(connection)
            if record.client_certificate is None:
                raise _Rejected(
                    "this server requires a client certificate signed by its CA; pass "
                    "--tls-cert and --tls-key"
                )
        pins = hello.get("expect") or {}
        if not isinstance(pins, dict):
            raise _Rejected(f"the hello message's 'expect' must be an object, got {pins!r}")
        mismatches = check_pins(self.terms, pins, "client", "server")
        if mismatches:
            raise _Rejected("; ".join(mismatches))

        link_host = connection.getsockname()[0]
        server_link = f"{link_host}:{free_port(link_host)}"
        record.control_bytes_sent += send_message(connection, "welcome", {
            "protocol_version": PROTOCOL_VERSION,
            **self.terms,
            **self.served.welcome,
            "task": self.served.task,
            "engine": self.engine.to_dict(),
            "server_link": server_link,
            "link_timeout_s": self.config.link_timeout_s,
        })
        ready = recv_message(connection, "ready")
        record.control_bytes_received += ready.size
        mismatches = find_differences(self.terms, ready.payload, READY_FIELDS, "server", "client")
        if mismatches:
            raise _Rejected(
                "; ".join(mismatches) + "; both sides must run the same cipherprompt, spu and "
                "jax versions on the same model"
            )
        client_link = self._check_client_link(ready.payload.get("client_link"), connection)
        if self._stopping.is_set():
            raise _Rejected("the server is shutting down; retry later")
        record.control_bytes_sent += send_message(connection, "start")
        return SessionTask(
            session_id=record.session_id,
            server_link=server_link,
            client_link=client_link,
            engine=self.engine,
            link=LinkOptions(self.config.link_timeout_s, self.config.link_connect_timeout_s,
                             self.config.tls),
            requests=self.served.new_requests(),
            weights=self.served.weights,
            idle_timeout_s=self.config.idle_timeout_s,
            spu_log=self._spu_log_dir / f"session-{record.session_id}.log",
        )

    @staticmethod
    def _check_client_link(address, connection: socket.socket) -> str:
        """The client's SPU address, which must be on the host of its control connection."""
        try:
            host, port = parse_address(str(address))
        except ValueError as error:
            raise _Rejected(f"invalid client_link in the ready message: {error}") from error
        peer_host = connection.getpeername()[0]
        if host != peer_host:
            # The server connects to this address: accept only the client's own host.
            raise _Rejected(
                f"client_link host {host} differs from the control connection's peer "
                f"{peer_host}; the client must announce its own address"
            )
        return f"{host}:{port}"

    def _supervise(self, connection: socket.socket, record: SessionRecord,
                   task: SessionTask) -> None:
        """Run ``task`` in a child process and watch it and the client until the session ends."""
        context = multiprocessing.get_context("fork")
        reports, child_reports = context.Pipe(duplex=False)
        # A duplicate of the connection's descriptor lets this process see the client leave
        # while the child owns the connection.
        watch = socket.socket(fileno=os.dup(connection.fileno()))
        with self._lock:
            self._open_fds.add(watch.fileno())
        with self._fork_lock:
            with self._lock:
                task.inherited_fds = sorted(self._open_fds - {connection.fileno()})
            process = context.Process(target=run_session_process,
                                      args=(task, connection, child_reports),
                                      name=f"cipherprompt-session-{record.session_id}",
                                      daemon=True)
            process.start()
            child_reports.close()
        try:
            record.enter("connecting")
            self._watch(process, reports, watch, record, task)
        finally:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            reports.close()
            with self._lock:
                self._open_fds.discard(watch.fileno())
            watch.close()
        self._tidy_spu_log(task.spu_log, record.outcome)

    def _watch(self, process, reports, watch: socket.socket, record: SessionRecord,
               task: SessionTask) -> None:
        # SPU's link counts connection attempts, not seconds, so the server enforces the time.
        connect_limit = task.link.connect_timeout_s + _CONNECT_MARGIN_S
        forwarded_stop = False
        client_gone_since = None
        while True:
            ready = wait_for_any([reports, process.sentinel], timeout=0.5)
            if reports in ready:
                self._read_reports(reports, record)
            if process.sentinel in ready and not process.is_alive():
                self._read_reports(reports, record)
                if record.outcome is None:
                    record.outcome = _describe_exit(process.exitcode)
                return
            now = time.monotonic()
            kill_reason = None
            if _peer_closed(watch):
                client_gone_since = client_gone_since or now
                if record.state in ("connecting", "setup", "query"):
                    kill_reason = f"client closed the control connection during {record.state}"
                elif record.state == "idle" and now - client_gone_since > _IDLE_EOF_GRACE_S:
                    kill_reason = "client closed the control connection"
            if record.state == "connecting" and now - record.state_since > connect_limit:
                kill_reason = (f"SPU's link did not reach the client within {connect_limit:g} s")
            if record.state == "setup" and now - record.state_since > task.link.timeout_s:
                kill_reason = f"SPU runtime set-up took more than {task.link.timeout_s:g} s"
            if record.state == "closing" and now - record.state_since > _CLOSE_TIMEOUT_S:
                kill_reason = f"closing SPU's link took more than {_CLOSE_TIMEOUT_S:g} s"
            if self._stopping.is_set():
                if not forwarded_stop:
                    os.kill(process.pid, signal.SIGTERM)
                    forwarded_stop = True
                if now > self._stop_deadline:
                    kill_reason = "aborted: the server shut down before the session ended"
            if kill_reason is not None:
                process.kill()
                process.join()
                self._read_reports(reports, record)
                if record.outcome is None:
                    record.outcome = kill_reason
                return

    @staticmethod
    def _read_reports(reports, record: SessionRecord) -> None:
        try:
            while reports.poll():
                event = reports.recv()
                kind = event.get("event")
                if kind == "state":
                    record.enter(event["state"])
                elif kind == "query":
                    record.queries += 1
                    if "bucket" in event:
                        record.buckets[event["bucket"]] += 1
                    else:
                        record.steps += 1
                    record.link_bytes_sent += event["link_bytes_sent"]
                    record.link_bytes_received += event["link_bytes_received"]
                elif kind == "end":
                    record.outcome = event["outcome"]
                    record.control_bytes_sent += event["control_bytes_sent"]
                    record.control_bytes_received += event["control_bytes_received"]
                    record.enter("ended")
        except (EOFError, OSError):
            pass  # the child is gone, and what it reported so far is kept

    def _log_session_end(self, record: SessionRecord) -> None:
        outcome = record.outcome or "closed"
        fields = {
            "event": "session_end",
            "session": record.session_id,
            "peer": record.peer,
            "client_certificate": record.client_certificate,
            "model": self.terms["model"],
            "plan": self.terms["plan"],
            "buckets": {str(bucket): count for bucket, count in sorted(record.buckets.items())},
            "duration_s": round(time.monotonic() - record.started, 3),
            "queries": record.queries,
            "steps": record.steps,
            "link_bytes_sent": record.link_bytes_sent,
            "link_bytes_received": record.link_bytes_received,
            "control_bytes_sent": record.control_bytes_sent,
            "control_bytes_received": record.control_bytes_received,
            "outcome": outcome,
        }
        if record.client_certificate is None:
            del fields["client_certificate"]
        if self.served.task != "generate":
            del fields["steps"]
        level = logging.INFO if outcome in ("closed", "idle timeout", "shutdown") else (
            logging.WARNING)
        log.log(level, "session end: %s", format_fields(fields), extra={"fields": fields})

    def _tidy_spu_log(self, path: Path, outcome: str | None) -> None:
        """Delete a session's SPU log after a clean end; keep the last failed ones."""
        if outcome == "closed":
            path.unlink(missing_ok=True)
            return
        failed = sorted(self._spu_log_dir.glob("session-*.log"), key=lambda p: p.stat().st_mtime)
        for old in failed[:-_KEPT_FAILED_LOGS]:
            old.unlink(missing_ok=True)


def _peer_closed(watch: socket.socket) -> bool:
    """True when the client closed or reset the control connection; never consumes data."""
    try:
        return watch.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _describe_exit(code: int | None) -> str:
    if code == 255:
        # yacl's link ends the process when an asynchronous send fails.
        return "SPU link failed: the session process exited with status 255 (client gone?)"
    if code is not None and code < 0:
        # Kills by the server set their own outcome; this is a crash or an outside kill. SPU
        # 0.9.5 was seen to end with SIGSEGV after its sends to a stalled client failed.
        return f"the session process ended by signal {signal.Signals(-code).name}"
    return f"the session process exited with status {code} without reporting an outcome"
