"""The server role: holds the checkpoint's weights and serves private classification sessions.

Each client connection is one session: a handshake on the control connection, then an SPU
runtime kept alive for all of that client's queries. The server infeeds its weights as secrets
it owns and never reconstructs an output: it sends its output share to the client. An error in
one session is logged and ends that session only; the server keeps accepting clients.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cipherprompt.assets import asset_path, sha256_of
from cipherprompt.checkpoint import Checkpoint, load_checkpoint
from cipherprompt.secure.engine import (
    CLIENT_RANK,
    SERVER_RANK,
    EngineConfig,
    compile_classifier,
    named_weights,
)
from cipherprompt.secure.party import SecureParty, share_to_blobs
from cipherprompt.secure.wire import (
    PROTOCOL_VERSION,
    PeerError,
    ProtocolError,
    free_port,
    recv_message,
    send_message,
)

log = logging.getLogger(__name__)

# Seconds a new connection may take to send its first message and finish the handshake.
HANDSHAKE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7870
    # Sessions served at once; a client arriving when all are busy gets a "busy" error.
    max_sessions: int = 1
    # Seconds the server waits for the client's next control message before ending the session.
    idle_timeout_s: float = 600.0
    # Where SPU's per-process log (the source of cost figures) is written.
    work_dir: Path = Path("cipherprompt-server")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive, got {self.idle_timeout_s}")


def model_description(checkpoint: Checkpoint, max_len: int) -> dict:
    """What the client needs to compile the same program: public architecture, plan, lengths."""
    return {
        "name": checkpoint.metadata.get("name", "bert-classifier"),
        "weights_sha256": checkpoint.weights_digest(),
        "config": checkpoint.config.to_dict(),
        "plan": checkpoint.plan.to_dict(),
        "max_len": max_len,
        "label_names": checkpoint.metadata.get("label_names", []),
        "tokenizer_sha256": checkpoint.metadata.get(
            "tokenizer_sha256", sha256_of(asset_path("minilm_tokenizer"))
        ),
    }


class ModelServer:
    def __init__(self, checkpoint_path: Path, config: ServerConfig, engine: EngineConfig,
                 max_len: int | None = None):
        self.config = config
        self.engine = engine
        self.checkpoint = load_checkpoint(checkpoint_path)
        self.max_len = self.checkpoint.max_len if max_len is None else max_len
        limit = self.checkpoint.config.max_positions
        if not 3 <= self.max_len <= limit:
            raise ValueError(
                f"max_len {self.max_len} is outside 3..{limit} (the model's position table)"
            )
        self.description = model_description(self.checkpoint, self.max_len)
        log.info("compiling %s (plan %s, %d tokens) for %s", self.description["name"],
                 self.checkpoint.plan.name, self.max_len, engine.protocol)
        self.model = compile_classifier(
            self.checkpoint.config, self.checkpoint.plan, self.max_len, engine
        )
        self.weights = named_weights(self.checkpoint.params)
        self.client_shapes = {
            "onehot": (1, self.max_len, self.checkpoint.config.vocab_size),
            "mask": (1, self.max_len),
            "pool": (1, self.max_len),
        }
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self._slots = threading.BoundedSemaphore(config.max_sessions)
        self._session_ids = itertools.count(1)
        self._active = 0
        self._active_lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None

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
        return listener.getsockname()[:2]

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        host, port = self._listener.getsockname()[:2]
        log.info("serving %s on %s:%d (program %s)", self.description["name"], host, port,
                 self.model.digest[:16])
        self._listener.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                connection, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            thread = threading.Thread(target=self._handle_connection, args=(connection, peer),
                                      daemon=True)
            thread.start()
        log.info("server stopped")

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()

    @staticmethod
    def _reject(connection: socket.socket, message: str) -> None:
        try:
            send_message(connection, "error", {"message": message})
        except OSError:
            pass
        connection.close()

    def _handle_connection(self, connection: socket.socket, peer) -> None:
        """Answer a health probe, or run a session if a slot is free."""
        try:
            connection.settimeout(HANDSHAKE_TIMEOUT_S)
            first = recv_message(connection, ("hello", "health"))
        except (ProtocolError, PeerError, OSError) as error:
            log.warning("connection from %s:%d dropped before a session: %s", peer[0], peer[1],
                        error)
            connection.close()
            return
        if first.kind == "health":
            self._answer_health(connection)
            return
        session_id = next(self._session_ids)
        if not self._slots.acquire(blocking=False):
            log.warning("session %d from %s:%d rejected: all %d slots busy", session_id,
                        peer[0], peer[1], self.config.max_sessions)
            self._reject(connection, "server busy: all sessions in use, retry later")
            return
        with self._active_lock:
            self._active += 1
        try:
            self._run_session(connection, peer, session_id, first.payload)
        finally:
            with self._active_lock:
                self._active -= 1
            self._slots.release()

    def _answer_health(self, connection: socket.socket) -> None:
        with self._active_lock:
            active = self._active
        try:
            send_message(connection, "health", {
                "status": "serving",
                "model": self.description["name"],
                "plan": self.checkpoint.plan.name,
                "max_len": self.max_len,
                "program_sha256": self.model.digest,
                "active_sessions": active,
                "max_sessions": self.config.max_sessions,
            })
        except OSError:
            pass
        connection.close()

    def _run_session(self, connection: socket.socket, peer, session_id: int, hello: dict) -> None:
        started = time.perf_counter()
        queries, outcome, party = 0, "closed", None
        log.info("session %d start: peer %s:%d", session_id, peer[0], peer[1])
        try:
            party = self._handshake(connection, hello)
            connection.settimeout(self.config.idle_timeout_s)
            for name, value in self.weights.items():
                party.set_secret(name, value, owner=SERVER_RANK)
            while True:
                message = recv_message(connection, ("query", "close"))
                if message.kind == "close":
                    break
                for name, shape in self.client_shapes.items():
                    party.set_secret(name, np.zeros(shape, np.float32), owner=CLIENT_RANK)
                cost = party.run()
                send_message(connection, "output_share",
                             {"server_seconds": cost.seconds}, share_to_blobs(party.output_share()))
                queries += 1
        except (ProtocolError, PeerError, ValueError) as error:
            outcome = f"error: {error}"
            self._try_send_error(connection, str(error))
        except socket.timeout:
            outcome = f"error: client idle for more than {self.config.idle_timeout_s:.0f} s"
        except (OSError, RuntimeError) as error:
            outcome = f"error: {type(error).__name__}: {error}"
        finally:
            if party is not None:
                party.close()
            connection.close()
            log.info("session %d end: peer %s:%d, %d queries, %.1f s, %s", session_id, peer[0],
                     peer[1], queries, time.perf_counter() - started, outcome)

    @staticmethod
    def _try_send_error(connection: socket.socket, message: str) -> None:
        try:
            send_message(connection, "error", {"message": message})
        except OSError:
            pass

    def _handshake(self, connection: socket.socket, hello: dict) -> SecureParty:
        if hello.get("protocol_version") != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol_version differs: client {hello.get('protocol_version')!r}, "
                f"server {PROTOCOL_VERSION}"
            )
        link_host = connection.getsockname()[0]
        server_link = f"{link_host}:{free_port(link_host)}"
        send_message(connection, "welcome", {
            "protocol_version": PROTOCOL_VERSION,
            "model": self.description,
            "engine": self.engine.to_dict(),
            "program_sha256": self.model.digest,
            "server_link": server_link,
        })
        ready = recv_message(connection, "ready").payload
        if ready.get("program_sha256") != self.model.digest:
            raise ValueError(
                f"program_sha256 differs: client {ready.get('program_sha256')!r}, "
                f"server {self.model.digest!r}; both sides must run the same cipherprompt, "
                "spu and jax versions"
            )
        client_link = str(ready.get("client_link", ""))
        send_message(connection, "start")
        return SecureParty(SERVER_RANK, server_link, client_link, self.engine, self.model,
                           self.config.work_dir / "spu-server.log")
