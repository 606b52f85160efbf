"""The client role for private text generation: prompt, steps, sampling and their costs.

The client tokenizes the prompt locally and infeeds it as one-hot rows that only it owns,
left-padded to the smallest of the server's prompt buckets that fits. Each run's logits are
reconstructed by the client alone, from its own output share and the share the server sends.
The client samples the next token and feeds it to the next step as a new private one-hot row.
The keys and values of earlier positions stay as secret shares in the session's SPU runtime
(see ``decoder.py``). The server learns the bucket and the number of steps.

With ``recompute=True`` every token after the first runs the prompt program again on the whole
prefix, padded to the bucket that fits it, as a deployment without the cache would. It gives
the same tokens within fixed-point error and exists to measure what the cache saves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cipherprompt.llama_tokenizer import BYTE_TOKENIZER_SHA256, ByteTokenizer, load_tokenizer
from cipherprompt.models.llama import LlamaConfig
from cipherprompt.sampling import Sampler, SamplingConfig
from cipherprompt.secure.client import PrivateSession
from cipherprompt.secure.cost import QueryCost
from cipherprompt.secure.decoder import (
    CompiledDecoder,
    _shape_params,
    compile_decoder,
    prompt_inputs,
    step_inputs,
)
from cipherprompt.secure.engine import CLIENT_RANK, CompiledModel, named_weights
from cipherprompt.secure.handshake import pick_bucket
from cipherprompt.secure.party import share_from_blobs
from cipherprompt.secure.wire import ProtocolError, recv_message, send_message
from cipherprompt.tokenizer import EmptyTextError, TextTooLongError

log = logging.getLogger(__name__)


@dataclass
class RunCost:
    """Cost of one private run (the prompt, or one step) as the client measured it."""

    # "prompt", "step" or, in recompute mode, "recompute".
    kind: str
    # The prompt bucket, or the cache slot a step wrote.
    bucket: int | None
    position: int | None
    # Seconds from the request to the reconstructed logits, on the client's clock.
    wall_seconds: float
    # The client's side of SPU's profile: seconds, bytes and messages per stage.
    cost: QueryCost
    # The server's seconds in SPU's profile and its session process's peak memory.
    server_seconds: float | None = None
    server_peak_memory_kib: int | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "bucket": self.bucket,
            "position": self.position,
            "wall_seconds": self.wall_seconds,
            "spu_seconds": self.cost.seconds,
            "bytes_sent": self.cost.bytes_sent,
            "bytes_received": self.cost.bytes_received,
            "messages": self.cost.messages,
            "server_seconds": self.server_seconds,
            "server_peak_memory_kib": self.server_peak_memory_kib,
            "stages": [asdict(stage) for stage in self.cost.stages],
        }


@dataclass
class Generation:
    """A finished private generation: the new tokens, their text and what each run cost."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    bucket: int
    # "eos" when the model chose its end-of-sequence token, "max_new_tokens" at the limit.
    stop_reason: str
    runs: list[RunCost] = field(default_factory=list)
    # The logits each run produced, in order: the prompt's first.
    logits: list[np.ndarray] = field(default_factory=list)


class PrivateGenerator(PrivateSession):
    """A text generation session with a ``serve-decoder`` server; a context manager.

    ``tokenizer_path`` is the GGUF file whose tokenizer the server's model uses; by default the
    packaged SmolLM2 file. Other options are those of ``PrivateSession``.
    """

    task = "generate"

    def __init__(self, server: str, tokenizer_path: Path | None = None, **options) -> None:
        super().__init__(server, **options)
        self.tokenizer_path = tokenizer_path
        self.tokenizer = None
        self._own_tokenizer_sha256 = None

    # -- handshake hooks -----------------------------------------------------------------------

    def _check_welcome(self, welcome: dict) -> list[str]:
        if welcome.get("task", "classify") == self.task:
            spec = welcome.get("tokenizer") or {}
            try:
                self.tokenizer = load_tokenizer(spec, self.tokenizer_path)
            except (ValueError, OSError) as error:
                return [f"tokenizer: {error}"]
            # load_tokenizer checked that the local GGUF file has the spec's SHA-256.
            self._own_tokenizer_sha256 = (BYTE_TOKENIZER_SHA256
                                          if isinstance(self.tokenizer, ByteTokenizer)
                                          else spec["sha256"])
        return super()._check_welcome(welcome)

    def _tokenizer_sha256(self) -> str:
        return self._own_tokenizer_sha256

    def _prepare(self, welcome: dict) -> None:
        self.config = LlamaConfig.from_dict(welcome["architecture"])
        self.max_new_tokens = int(welcome["max_new_tokens"])
        log.info("compiling the programs for %s (plan %s, prompt buckets %s tokens)",
                 welcome["model"], self.plan.name, ", ".join(map(str, self.buckets)))
        self.programs: CompiledDecoder = compile_decoder(self.config, self.plan, self.buckets,
                                                         self.max_new_tokens, self.engine)

    def _program_digests(self) -> dict[str, str]:
        return self.programs.program_digests()

    def _program_set_sha256(self) -> str:
        return self.programs.digest

    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: value.shape
                for name, value in named_weights(_shape_params(self.config)).items()}

    # -- generation ----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Return the prompt's token ids, in the model's chat template when ``chat``.

        Raises EmptyTextError for an empty or blank prompt.
        """
        if not prompt.strip():
            raise EmptyTextError("the prompt is empty; pass the text to continue")
        text = self.tokenizer.apply_chat_template(prompt) if chat else prompt
        return self.tokenizer.encode(text)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 sampling: SamplingConfig | None = None,
                 on_token: Callable[[int], None] | None = None, recompute: bool = False,
                 stop_at_eos: bool = True, hide_length: bool = False) -> Generation:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``, privately.

        ``sampling`` defaults to greedy choice. ``on_token`` gets each new id as soon as it
        is chosen. The generation ends after the tokenizer's end-of-sequence id unless
        ``stop_at_eos`` is False. With ``hide_length`` the steps go on to ``max_new_tokens``
        after that id and their tokens are dropped, so the server learns only
        ``max_new_tokens``, not the length of the output. Raises ValueError, or
        TextTooLongError, before anything is sent when the request cannot fit the server.
        """
        self._check_connected()
        prompt_ids = [int(token) for token in prompt_ids]
        bucket = self._check_request(prompt_ids, max_new_tokens, recompute)
        sampler = Sampler(sampling or SamplingConfig(), self.config.vocab_size)
        self._raise_pending_server_message()

        eos = self.tokenizer.eos_id if stop_at_eos else None
        generation = Generation([], "", len(prompt_ids), bucket, "max_new_tokens")
        # Every chosen token, also those that hide_length drops after the end-of-sequence token.
        chosen: list[int] = []
        logits = self._run_prompt(prompt_ids, bucket, generation, "prompt")
        while True:
            token = sampler(logits)
            chosen.append(token)
            if generation.stop_reason != "eos":
                generation.token_ids.append(token)
                if on_token is not None:
                    on_token(token)
                if token == eos:
                    generation.stop_reason = "eos"
            if generation.stop_reason == "eos" and not hide_length:
                break
            if len(chosen) == max_new_tokens:
                break
            if recompute:
                prefix = prompt_ids + chosen
                logits = self._run_prompt(prefix, pick_bucket(len(prefix), self.buckets),
                                          generation, "recompute")
            else:
                logits = self._run_step(token, bucket, len(prompt_ids), len(chosen) - 1,
                                        generation)
        generation.text = self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
        return generation

    def _check_connected(self) -> None:
        if self._party is None or self._socket is None:
            raise RuntimeError("not connected; call connect() or use the client as a context")
        if not self._session_ok:
            raise RuntimeError("the session failed earlier; open a new one")

    def _check_request(self, prompt_ids: list[int], max_new_tokens: int, recompute: bool) -> int:
        """Return the prompt's bucket; raise when the prompt or the new tokens cannot fit."""
        if not prompt_ids:
            raise EmptyTextError("the prompt has no tokens; pass the text to continue")
        if not all(0 <= token < self.config.vocab_size for token in prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
                max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, got "
                             f"{max_new_tokens!r}")
        bucket = pick_bucket(len(prompt_ids), self.buckets)
        if bucket is None:
            raise TextTooLongError(
                f"the prompt needs {len(prompt_ids)} tokens, more than the server's largest "
                f"prompt bucket of {self.max_len}; shorten the prompt (or leave out the chat "
                f"template with --no-chat), or serve a larger bucket (serve-decoder --buckets)"
            )
        # Steps write slots bucket .. bucket + max_new_tokens - 2 of the cache.
        limit = self.programs.capacity - bucket + 1
        if max_new_tokens > limit:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} exceeds what the server's cache allows after "
                f"a {bucket}-token prompt bucket: {limit}; ask for fewer, or serve more "
                "(serve-decoder --max-new-tokens)"
            )
        if recompute and len(prompt_ids) + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"recomputing needs a prompt bucket of {len(prompt_ids) + max_new_tokens - 1} "
                f"tokens for the last step, and the server's largest is {self.max_len}; ask for "
                "fewer new tokens or serve a larger bucket"
            )
        return bucket

    def _run_prompt(self, ids: list[int], bucket: int, generation: Generation,
                    kind: str) -> np.ndarray:
        inputs = prompt_inputs(ids, bucket, self.config.vocab_size)
        return self._run("prompt", {"bucket": bucket}, self.programs.prompts[bucket], inputs,
                         None, RunCost(kind, bucket, None, 0.0, QueryCost()), generation)

    def _run_step(self, token: int, bucket: int, prompt_length: int, steps_done: int,
                  generation: Generation) -> np.ndarray:
        position = bucket + steps_done
        inputs = step_inputs(token, bucket, prompt_length, steps_done, self.programs.capacity,
                             self.config.vocab_size)
        return self._run("step", {}, self.programs.step, inputs, position,
                         RunCost("step", None, position, 0.0, QueryCost()), generation)

    def _run(self, kind: str, payload: dict, program: CompiledModel,
             inputs: dict[str, np.ndarray], position: int | None, record: RunCost,
             generation: Generation) -> np.ndarray:
        """Send one request, run its program with the server and reconstruct the logits."""
        party = self._party
        started = time.perf_counter()
        try:
            for name, value in inputs.items():
                party.set_secret(name, value, owner=CLIENT_RANK)
            if position is not None:
                party.set_public("position", np.asarray(position, np.int32))
            send_message(self._socket, kind, payload)
            accepted = recv_message(self._socket, "query_accepted").payload
            if position is not None and accepted.get("position") != position:
                raise ProtocolError(f"the server accepted a step at slot "
                                    f"{accepted.get('position')!r}, this client is at {position}")
            # NOTE: if the server process dies during this run, SPU's link (spu 0.9.5) ends
            # this process with exit status 255 once a send fails, without a Python exception.
            record.cost = party.run(program)
            own = party.output_share(program)
            reply = recv_message(self._socket, "output_share")
        except BaseException:
            self._session_ok = False
            raise
        logits = party.reconstruct(own, share_from_blobs(reply.blobs))[0]
        record.wall_seconds = time.perf_counter() - started
        record.server_seconds = reply.payload.get("server_seconds")
        record.server_peak_memory_kib = reply.payload.get("server_peak_memory_kib")
        generation.runs.append(record)
        generation.logits.append(logits)
        return logits
