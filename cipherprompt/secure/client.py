"""The client role: tokenizes locally and obtains the label of its text by a two-party run.

The client's token ids enter the computation as a one-hot matrix that only the client owns; the
server learns nothing from it but its shape. The client alone reconstructs the logits from its
own output share and the share the server sends.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cipherprompt.assets import asset_path, sha256_of
from cipherprompt.models.bert import BertConfig, init_params, one_hot, pooling_weights
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure.cost import QueryCost
from cipherprompt.secure.engine import (
    CLIENT_RANK,
    SERVER_RANK,
    EngineConfig,
    compile_classifier,
    named_weights,
)
from cipherprompt.secure.party import SecureParty, share_from_blobs
from cipherprompt.secure.wire import (
    PROTOCOL_VERSION,
    free_port,
    parse_address,
    recv_message,
    send_message,
)
from cipherprompt.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)


class ServerUnreachableError(ConnectionError):
    """No cipherprompt server answers at the given address."""


class HandshakeError(RuntimeError):
    """Client and server disagree on the program they would run."""


@dataclass
class Prediction:
    label: int
    label_name: str
    probabilities: np.ndarray
    logits: np.ndarray
    cost: QueryCost
    num_tokens: int


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


class PrivateClassifier:
    """A session with a cipherprompt server; use as a context manager for several queries."""

    def __init__(self, server: str, work_dir: Path = Path("cipherprompt-client"),
                 connect_timeout_s: float = 10.0, query_timeout_s: float = 1800.0,
                 expected_plan: str | None = None):
        self.host, self.port = parse_address(server)
        self.work_dir = Path(work_dir)
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.expected_plan = expected_plan
        self.tokenizer = WordPieceTokenizer()
        self._socket: socket.socket | None = None
        self._party: SecureParty | None = None

    def __enter__(self) -> PrivateClassifier:
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(self) -> None:
        """Handshake with the server, compile the same program and start the SPU runtime."""
        try:
            self._socket = socket.create_connection((self.host, self.port),
                                                    timeout=self.connect_timeout_s)
        except OSError as error:
            raise ServerUnreachableError(
                f"cannot reach a cipherprompt server at {self.host}:{self.port} ({error}); "
                "start one with 'cipherprompt serve' or check --server"
            ) from error
        self._socket.settimeout(self.query_timeout_s)
        send_message(self._socket, "hello", {"protocol_version": PROTOCOL_VERSION})
        welcome = recv_message(self._socket, "welcome").payload
        model = welcome["model"]
        self.description = model
        self._check_welcome(welcome)

        self.config = BertConfig.from_dict(model["config"])
        self.plan = OperatorPlan.from_dict(model["plan"])
        self.max_len = int(model["max_len"])
        self.label_names = list(model["label_names"])
        engine = EngineConfig(**welcome["engine"])
        log.info("compiling the program for %s (plan %s, %d tokens)", model["name"],
                 self.plan.name, self.max_len)
        self.model = compile_classifier(self.config, self.plan, self.max_len, engine)
        if self.model.digest != welcome["program_sha256"]:
            send_message(self._socket, "error", {"message": "program_sha256 differs"})
            raise HandshakeError(
                f"program_sha256 differs: server {welcome['program_sha256']!r}, client "
                f"{self.model.digest!r}; install the same cipherprompt, spu and jax versions "
                "as the server"
            )
        link_host = self._socket.getsockname()[0]
        client_link = f"{link_host}:{free_port(link_host)}"
        send_message(self._socket, "ready",
                     {"program_sha256": self.model.digest, "client_link": client_link})
        recv_message(self._socket, "start")
        log.info("starting the secure runtime (OT and HE key set-up)")
        started = time.perf_counter()
        self._party = SecureParty(CLIENT_RANK, welcome["server_link"], client_link, engine,
                                  self.model, self.work_dir / "spu-client.log")
        # The weights' shares on this side are zero placeholders of the public shapes.
        for name, value in named_weights(init_params(self.config, seed=0)).items():
            self._party.set_secret(name, np.zeros_like(value), owner=SERVER_RANK)
        log.info("secure runtime ready in %.1f s", time.perf_counter() - started)

    def _check_welcome(self, welcome: dict) -> None:
        if welcome.get("protocol_version") != PROTOCOL_VERSION:
            raise HandshakeError(
                f"protocol_version differs: server {welcome.get('protocol_version')!r}, "
                f"client {PROTOCOL_VERSION}"
            )
        tokenizer_sha = sha256_of(asset_path("minilm_tokenizer"))
        if welcome["model"]["tokenizer_sha256"] != tokenizer_sha:
            raise HandshakeError(
                f"tokenizer_sha256 differs: server {welcome['model']['tokenizer_sha256']}, "
                f"client {tokenizer_sha}"
            )
        plan_name = welcome["model"]["plan"]["name"]
        if self.expected_plan is not None and plan_name != self.expected_plan:
            raise HandshakeError(
                f"plan differs: server runs {plan_name!r}, client expects {self.expected_plan!r}"
            )

    def classify(self, text: str, truncate: bool = False, progress=None) -> Prediction:
        """Classify ``text`` privately; raises EmptyTextError or TextTooLongError before sending."""
        if self._party is None or self._socket is None:
            raise RuntimeError("not connected; call connect() or use the client as a context")
        encoded = self.tokenizer.encode(text, self.max_len, truncate=truncate)
        mask = encoded.mask[None, :]
        party = self._party
        party.set_secret("onehot", one_hot(encoded.ids[None, :], self.config.vocab_size),
                         owner=CLIENT_RANK)
        party.set_secret("mask", mask, owner=CLIENT_RANK)
        party.set_secret("pool", pooling_weights(mask), owner=CLIENT_RANK)
        send_message(self._socket, "query")
        cost = party.run(on_stage=progress)
        own = party.output_share()
        reply = recv_message(self._socket, "output_share")
        logits = party.reconstruct(own, share_from_blobs(reply.blobs))[0]
        probabilities = softmax(logits.astype(np.float64))
        label = int(np.argmax(logits))
        name = self.label_names[label] if label < len(self.label_names) else str(label)
        return Prediction(label, name, probabilities, logits, cost, encoded.length)

    def close(self) -> None:
        if self._socket is not None:
            try:
                send_message(self._socket, "close")
            except OSError:
                pass
        if self._party is not None:
            self._party.close()
            self._party = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
