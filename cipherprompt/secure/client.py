"""The client role: tokenizes locally and obtains the label of its text by a two-party run.

The client's token ids enter the computation as a one-hot matrix that only the client owns; the
server learns nothing from it but its shape. The client pads its tokens to the smallest of the
server's length buckets that fits, so the server learns the bucket but not the length. The
client alone reconstructs the logits from its own output share and the share the server sends.

``PrivateSession`` contains what every task shares (connection, handshake, SPU runtime, close);
``PrivateClassifier`` adds classification, and ``generator.PrivateGenerator`` text generation.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
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
    CompiledModel,
    EngineConfig,
    check_two_party_protocol,
    compile_classifier,
    named_weights,
)
from cipherprompt.secure.handshake import (
    READY_FIELDS,
    HandshakeError,
    check_pins,
    find_differences,
    pick_bucket,
    plan_sha256,
    program_set_sha256,
)
from cipherprompt.secure.party import (
    DEFAULT_LINK_TIMEOUT_S,
    LinkOptions,
    SecureParty,
    share_from_blobs,
)
from cipherprompt.secure.tls import TLSFiles, client_context
from cipherprompt.secure.wire import (
    PROTOCOL_VERSION,
    PeerError,
    ProtocolError,
    free_port,
    parse_address,
    recv_message,
    send_message,
    wait_readable,
)
from cipherprompt.tokenizer import TextTooLongError, WordPieceTokenizer

log = logging.getLogger(__name__)

__all__ = [
    "HandshakeError",
    "Prediction",
    "PrivateClassifier",
    "PrivateSession",
    "ServerBusyError",
    "ServerUnreachableError",
]

# Seconds the client waits for SPU's link to stop after a clean close.
_LINK_STOP_TIMEOUT_S = 15.0
# Seconds the client waits for the server to close the control connection after a clean close.
_SERVER_CLOSE_TIMEOUT_S = 5.0


class ServerUnreachableError(ConnectionError):
    """No cipherprompt server answers at the given address."""


class ServerBusyError(ConnectionError):
    """The server serves its maximum number of sessions; retry later."""


@dataclass
class Prediction:
    label: int
    label_name: str
    probabilities: np.ndarray
    logits: np.ndarray
    cost: QueryCost
    num_tokens: int
    # The sequence length the tokens were padded to: the only length the server learns.
    bucket: int = 0
    # Number of texts the query classified; they share its cost.
    query_texts: int = 1


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


class PrivateSession:
    """A session with a cipherprompt server; use as a context manager for several requests.

    ``expected_plan``, ``expected_model`` and ``expected_weights_sha256`` pin what the client
    accepts: the session is rejected, on both sides, when the server's value differs. ``tls``
    contains the CA that signs the server's certificate and this client's certificate and key.
    Subclasses name their ``task``, compile the programs in ``_prepare`` and add the requests.
    """

    # The task the client requests in its hello; the server rejects a session of another task.
    task = "classify"

    def __init__(self, server: str, work_dir: Path = Path("cipherprompt-client"),
                 connect_timeout_s: float = 10.0, query_timeout_s: float = 1800.0,
                 expected_plan: str | None = None, expected_model: str | None = None,
                 expected_weights_sha256: str | None = None, tls: TLSFiles | None = None,
                 link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S):
        self.host, self.port = parse_address(server)
        self.work_dir = Path(work_dir)
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.pins = {"model": expected_model, "weights_sha256": expected_weights_sha256,
                     "plan": expected_plan}
        self.tls = tls
        self.link_timeout_s = link_timeout_s
        self._socket: socket.socket | None = None
        self._party: SecureParty | None = None
        # False once the session failed: then closing must not wait for the server's link.
        self._session_ok = False

    def __enter__(self) -> PrivateSession:
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- handshake -----------------------------------------------------------------------------

    def connect(self) -> None:
        """Handshake with the server, compile the same programs and start the SPU runtime."""
        self._socket = self._open_connection()
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _open_connection(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        except OSError as error:
            raise ServerUnreachableError(
                f"cannot reach a cipherprompt server at {self.host}:{self.port} ({error}); "
                "start one with 'cipherprompt serve' or check --server"
            ) from error
        if self.tls is not None:
            try:
                sock = client_context(self.tls).wrap_socket(sock, server_hostname=self.host)
            except ssl.SSLCertVerificationError as error:
                sock.close()
                raise HandshakeError(
                    f"the server at {self.host}:{self.port} presented a certificate that "
                    f"--tls-ca does not verify ({error.verify_message}); check --tls-ca and "
                    "that the server's certificate names this host"
                ) from error
            except (ssl.SSLError, OSError) as error:
                sock.close()
                raise HandshakeError(
                    f"TLS handshake with {self.host}:{self.port} failed ({error}); the server "
                    "may not use TLS, or may not accept this client's certificate"
                ) from error
        sock.settimeout(self.query_timeout_s)
        return sock

    def _handshake(self) -> None:
        pins = {name: value for name, value in self.pins.items() if value is not None}
        try:
            send_message(self._socket, "hello", {"protocol_version": PROTOCOL_VERSION,
                                                 "task": self.task, "expect": pins})
            welcome = recv_message(self._socket, "welcome").payload
        except PeerError as error:
            if str(error).startswith("server busy"):
                raise ServerBusyError(str(error)) from None
            raise HandshakeError(f"the server rejected the session: {error}") from None
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as error:
            if self.tls is None:
                raise
            # With TLS 1.3 the server's rejection of this client's certificate arrives here.
            raise HandshakeError(
                f"TLS handshake with {self.host}:{self.port} failed "
                f"({getattr(error, 'reason', None) or error}); "
                "the server may not accept this client's certificate"
            ) from error
        except ProtocolError as error:
            hint = "" if self.tls else (
                "; if the server uses TLS, pass --tls-ca, --tls-cert and --tls-key")
            raise ProtocolError(f"{error}{hint}") from error
        self.description = welcome
        mismatches = self._check_welcome(welcome)
        if mismatches:
            self._reject("; ".join(mismatches))

        self.plan = OperatorPlan.from_dict(welcome["operator_plan"])
        self.buckets = tuple(int(bucket) for bucket in welcome["buckets"])
        # Servers before batching existed ran one text per query.
        self.batch = int(welcome.get("batch", 1))
        self.max_len = max(self.buckets)
        self.engine = EngineConfig(**welcome["engine"])
        self._prepare(welcome)

        terms = self._own_terms(welcome)
        mismatches = find_differences(terms, welcome, READY_FIELDS, "client", "server")
        if mismatches:
            wrong_programs = [key for key, digest in self._program_digests().items()
                              if digest != welcome.get("programs", {}).get(key)]
            if wrong_programs:
                mismatches.append(f"programs differ in buckets {', '.join(wrong_programs)}")
            self._reject("; ".join(mismatches) + "; install the same cipherprompt, spu and jax "
                         "versions as the server")

        link_host = self._socket.getsockname()[0]
        client_link = f"{link_host}:{free_port(link_host)}"
        send_message(self._socket, "ready", {**terms, "client_link": client_link})
        try:
            recv_message(self._socket, "start")
        except PeerError as error:
            raise HandshakeError(f"the server rejected the session: {error}") from None
        log.info("starting the secure runtime (OT and HE key set-up)")
        started = time.perf_counter()
        self._party = SecureParty(
            CLIENT_RANK, welcome["server_link"], client_link, self.engine,
            self.work_dir / "spu-client.log",
            LinkOptions(timeout_s=self.link_timeout_s, tls=self.tls),
        )
        self._session_ok = True
        # The weights' shares on this side are zero placeholders of the public shapes.
        for name, shape in self._weight_shapes().items():
            self._party.set_secret(name, np.zeros(shape, np.float32), owner=SERVER_RANK)
        log.info("secure runtime ready in %.1f s", time.perf_counter() - started)

    def _prepare(self, welcome: dict) -> None:
        """Build the model's configuration and compile its programs from the welcome message."""
        raise NotImplementedError

    def _program_digests(self) -> dict[str, str]:
        """Return the digest of each compiled program, keyed as in the welcome's ``programs``."""
        raise NotImplementedError

    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shape of each weight variable, for this side's zero placeholders."""
        raise NotImplementedError

    def _tokenizer_sha256(self) -> str:
        raise NotImplementedError

    def _check_welcome(self, welcome: dict) -> list[str]:
        if welcome.get("protocol_version") != PROTOCOL_VERSION:
            return [(f"protocol_version differs: server {welcome.get('protocol_version')!r}, "
                     f"client {PROTOCOL_VERSION}")]
        # Servers from before text generation announce no task: they classify.
        served = welcome.get("task", "classify")
        if served != self.task:
            return [f"task differs: this client requests {self.task!r}, the server serves "
                    f"{served!r}; use 'cipherprompt {served}' with this server"]
        # A server from before this check may still run REF2K, whose outputs would be wrong.
        engine = welcome.get("engine")
        protocol = engine.get("protocol") if isinstance(engine, dict) else None
        try:
            check_two_party_protocol(protocol)
        except ValueError as error:
            return [f"the server's engine cannot serve this client: {error}"]
        mismatches = check_pins(welcome, self.pins, "client", "server")
        tokenizer_sha = self._tokenizer_sha256()
        if welcome.get("tokenizer_sha256") != tokenizer_sha:
            mismatches.append(f"tokenizer_sha256 differs: server "
                              f"{welcome.get('tokenizer_sha256')!r}, client {tokenizer_sha!r}")
        return mismatches

    def _own_terms(self, welcome: dict) -> dict:
        """Build the ready message's terms from what this client computed, pinned or received."""
        return {
            "model": self.pins["model"] or welcome.get("model"),
            "weights_sha256": self.pins["weights_sha256"] or welcome.get("weights_sha256"),
            "tokenizer_sha256": self._tokenizer_sha256(),
            "plan": self.plan.name,
            "plan_sha256": plan_sha256(self.plan),
            "buckets": list(self.buckets),
            "batch": self.batch,
            "program_sha256": self._program_set_sha256(),
        }

    def _program_set_sha256(self) -> str:
        return program_set_sha256({int(key): digest
                                   for key, digest in self._program_digests().items()})

    def _reject(self, message: str) -> None:
        """Tell the server why this client rejects the session, then raise HandshakeError."""
        try:
            send_message(self._socket, "error", {"message": f"the client rejected the "
                                                            f"session: {message}"})
        except OSError:
            pass
        raise HandshakeError(message)

    def _raise_pending_server_message(self) -> None:
        """Raise the server's error (shutdown, idle timeout) if it sent one while we were idle."""
        if not wait_readable(self._socket, 0.0):
            return
        self._session_ok = False
        message = recv_message(self._socket)  # raises PeerError for an error frame
        raise ProtocolError(f"unexpected {message.kind!r} message from the server between queries")

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """End the session; after a failure, skip the link's FIN exchange with the server."""
        if self._socket is not None and self._session_ok:
            try:
                send_message(self._socket, "close")
            except OSError:
                self._session_ok = False
        if self._party is not None:
            if self._session_ok:
                self._stop_link(self._party)
            else:
                log.debug("the session failed; leaving SPU's link without a FIN exchange")
            self._party = None
        if self._socket is not None:
            if self._session_ok:
                self._wait_for_server_close()
            self._socket.close()
            self._socket = None
        self._session_ok = False

    def _wait_for_server_close(self) -> None:
        # The server closes the control connection once the session's slot is free again, so a
        # new session opened right after this one finds the slot free.
        try:
            self._socket.settimeout(_SERVER_CLOSE_TIMEOUT_S)
            while self._socket.recv(4096):
                pass
        except OSError:
            pass

    @staticmethod
    def _stop_link(party: SecureParty) -> None:
        # NOTE: spu 0.9.5 gives stop_link no time limit, so it runs in a thread that may
        # outlive this call when the server never replies.
        stopper = threading.Thread(target=party.close, daemon=True, name="spu-link-stop")
        stopper.start()
        stopper.join(_LINK_STOP_TIMEOUT_S)
        if stopper.is_alive():
            log.warning("SPU's link did not stop within %.0f s; the server may be gone",
                        _LINK_STOP_TIMEOUT_S)


class PrivateClassifier(PrivateSession):
    """A classification session: ``classify`` returns the label of a text, privately."""

    task = "classify"

    def __init__(self, server: str, **options) -> None:
        """Open nothing yet; ``options`` are those of ``PrivateSession``."""
        super().__init__(server, **options)
        self.tokenizer = WordPieceTokenizer()

    def _prepare(self, welcome: dict) -> None:
        self.config = BertConfig.from_dict(welcome["architecture"])
        self.label_names = list(welcome["label_names"])
        log.info("compiling the programs for %s (plan %s, buckets %s tokens)", welcome["model"],
                 self.plan.name, ", ".join(map(str, self.buckets)))
        self.programs: dict[int, CompiledModel] = {
            bucket: compile_classifier(self.config, self.plan, bucket, self.engine,
                                       batch=self.batch)
            for bucket in self.buckets
        }
        # The largest bucket's program, for callers that show its stages.
        self.model = self.programs[self.max_len]

    def _program_digests(self) -> dict[str, str]:
        return {str(bucket): program.digest for bucket, program in self.programs.items()}

    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: value.shape
                for name, value in named_weights(init_params(self.config, seed=0)).items()}

    def _tokenizer_sha256(self) -> str:
        return sha256_of(asset_path("minilm_tokenizer"))

    # -- queries -------------------------------------------------------------------------------

    def classify(self, text: str, truncate: bool = False, progress=None,
                 bucket: int | None = None) -> Prediction:
        """Classify ``text`` privately; raises EmptyTextError or TextTooLongError before sending.

        ``bucket`` pads to that length bucket instead of the smallest one that fits.
        """
        return self.classify_batch([text], truncate, progress, bucket)[0]

    def classify_batch(self, texts: list[str], truncate: bool = False, progress=None,
                       bucket: int | None = None) -> list[Prediction]:
        """Classify up to ``batch`` texts in one private query, padded to one length bucket.

        The server's programs take exactly ``batch`` texts, so fewer texts are completed with
        copies of the last one, whose results are dropped. All texts go to the smallest bucket
        that fits the longest of them, unless ``bucket`` names one.
        """
        if self._party is None or self._socket is None:
            raise RuntimeError("not connected; call connect() or use the client as a context")
        if not self._session_ok:
            raise RuntimeError("the session failed earlier; open a new one")
        if not 1 <= len(texts) <= self.batch:
            raise ValueError(f"a query takes 1 to {self.batch} texts (the server's batch), "
                             f"got {len(texts)}; split the texts into several queries")
        padded_to = max(self._choose_bucket(text, truncate, bucket) for text in texts)
        encoded = [self.tokenizer.encode(text, padded_to, truncate=truncate) for text in texts]
        rows = encoded + [encoded[-1]] * (self.batch - len(encoded))
        ids = np.stack([row.ids for row in rows])
        mask = np.stack([row.mask for row in rows]).astype(np.float32)
        self._raise_pending_server_message()

        program = self.programs[padded_to]
        party = self._party
        try:
            party.set_secret("onehot", one_hot(ids, self.config.vocab_size), owner=CLIENT_RANK)
            party.set_secret("mask", mask, owner=CLIENT_RANK)
            party.set_secret("pool", pooling_weights(mask), owner=CLIENT_RANK)
            send_message(self._socket, "query", {"bucket": padded_to})
            recv_message(self._socket, "query_accepted")
            # NOTE: if the server process dies during this run, SPU's link (spu 0.9.5) ends
            # this process with exit status 255 once a send fails, without a Python exception.
            cost = party.run(program, on_stage=progress)
            own = party.output_share(program)
            reply = recv_message(self._socket, "output_share")
        except BaseException:
            self._session_ok = False
            raise
        all_logits = party.reconstruct(own, share_from_blobs(reply.blobs))
        predictions = []
        for logits, row in zip(all_logits[:len(texts)], encoded):
            label = int(np.argmax(logits))
            name = self.label_names[label] if label < len(self.label_names) else str(label)
            predictions.append(Prediction(label, name, softmax(logits.astype(np.float64)),
                                          logits, cost, row.length, padded_to, len(texts)))
        return predictions

    def _choose_bucket(self, text: str, truncate: bool, bucket: int | None) -> int:
        """Return the bucket to pad ``text`` to; raise TextTooLongError naming the limit."""
        if bucket is not None and bucket not in self.buckets:
            raise ValueError(f"bucket {bucket} is not one of the server's buckets "
                             f"{', '.join(map(str, self.buckets))}")
        largest = self.max_len
        try:
            length = self.tokenizer.encode(text, largest, truncate=truncate).length
        except TextTooLongError:
            raise TextTooLongError(
                f"the text needs more than {largest} tokens, the server's largest length bucket; "
                "shorten it, or truncate it (classify --truncate, or truncate=True)"
            ) from None
        if bucket is not None:
            if length > bucket and not truncate:
                raise TextTooLongError(
                    f"the text needs {length} tokens, more than the requested bucket {bucket}; "
                    "choose a larger bucket or truncate it"
                )
            return bucket
        return pick_bucket(length, self.buckets)
