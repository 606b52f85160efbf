"""The server role for private text generation: a decoder's weights behind ``ModelServer``.

The decoder comes from a GGUF file (by default the packaged SmolLM2-135M-Instruct) or from a
cipherprompt checkpoint of the Llama family. ``ModelServer`` runs the sessions, the handshake,
TLS, health probes, shutdown and the child process per session. This module adds what a
generation session runs (``decoder.DecoderRequests``) and what its handshake announces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from cipherprompt.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from cipherprompt.llama_tokenizer import tokenizer_spec
from cipherprompt.models.llama import LlamaConfig, Params
from cipherprompt.plan import OperatorPlan
from cipherprompt.secure.decoder import DecoderRequests, compile_decoder
from cipherprompt.secure.engine import EngineConfig, named_weights
from cipherprompt.secure.handshake import plan_sha256, validate_buckets
from cipherprompt.secure.server import ModelServer, ServedModel, ServerConfig

log = logging.getLogger(__name__)

# Prompt bucket when the operator names none: SmolLM2's chat template alone takes 30 tokens.
DEFAULT_DECODER_BUCKETS = (48,)
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class DecoderSource:
    """The decoder's weight file and the part of the model to serve."""

    # A GGUF file, or a cipherprompt checkpoint of the Llama family (.npz); exactly one is set.
    gguf: Path | None = None
    checkpoint: Path | None = None
    # Operator plan preset for a GGUF file; a checkpoint brings its own plan.
    plan: str = "decoder-exact"
    # Serve only the first N layers, for cost measurements and precision checks; None: all.
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if (self.gguf is None) == (self.checkpoint is None):
            raise ValueError("pass exactly one of --gguf and --checkpoint")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")

    @property
    def path(self) -> Path:
        return self.gguf if self.gguf is not None else self.checkpoint


@dataclass
class LoadedDecoder:
    name: str
    config: LlamaConfig
    plan: OperatorPlan
    params: Params
    # The tokenizer description that clients rebuild their tokenizer from.
    tokenizer: dict


def load_decoder(source: DecoderSource) -> LoadedDecoder:
    """Read the decoder's configuration, weights, plan and tokenizer identity from ``source``."""
    if source.gguf is not None:
        from cipherprompt.assets import sha256_of
        from cipherprompt.models.llama_import import load_llama_gguf, open_gguf, read_field

        reader = open_gguf(source.gguf)
        config, params = load_llama_gguf(source.gguf, reader=reader)
        name = str(read_field(reader, "general.name", source.gguf.stem, required=False))
        plan = OperatorPlan.preset(source.plan, config.num_layers)
        tokenizer = tokenizer_spec("gguf", sha256_of(source.gguf))
    else:
        checkpoint = load_checkpoint(source.checkpoint)
        if not isinstance(checkpoint.config, LlamaConfig):
            raise CheckpointError(
                f"checkpoint {source.checkpoint} contains a classifier, not a decoder; serve it "
                "with 'cipherprompt serve --checkpoint PATH'"
            )
        config, params, plan = checkpoint.config, checkpoint.params, checkpoint.plan
        name = checkpoint.metadata.get("name", "llama-decoder")
        tokenizer = checkpoint.metadata.get("tokenizer")
        if not isinstance(tokenizer, dict):
            raise CheckpointError(
                f"checkpoint {source.checkpoint} names no tokenizer; its metadata needs "
                "'tokenizer': {'kind': 'gguf', 'sha256': ...} or {'kind': 'bytes'}"
            )
    if source.num_layers is not None and source.num_layers != config.num_layers:
        if source.num_layers > config.num_layers:
            raise ValueError(f"--num-layers {source.num_layers} exceeds the model's "
                             f"{config.num_layers} layers")
        config = replace(config, num_layers=source.num_layers)
        params = {**params, "layers": params["layers"][:source.num_layers]}
        plan = replace(plan, layers=plan.layers[:source.num_layers])
        name = f"{name} (first {source.num_layers} layers)"
    return LoadedDecoder(name, config, plan, params, tokenizer)


def serve_decoder_model(decoder: LoadedDecoder, buckets: tuple[int, ...] | None,
                        max_new_tokens: int, engine: EngineConfig) -> ServedModel:
    """Compile the decoder's programs and describe them for the handshake."""
    buckets = validate_buckets(buckets or DEFAULT_DECODER_BUCKETS, decoder.config.max_positions)
    log.info("compiling %s (plan %s, prompt buckets %s tokens, up to %d new tokens) for %s",
             decoder.name, decoder.plan.name, ", ".join(map(str, buckets)), max_new_tokens,
             engine.protocol)
    programs = compile_decoder(decoder.config, decoder.plan, buckets, max_new_tokens, engine)
    weights_digest = Checkpoint(decoder.params, decoder.config, decoder.plan,
                                buckets[-1]).weights_digest()
    terms = {
        "model": decoder.name,
        "weights_sha256": weights_digest,
        "tokenizer_sha256": decoder.tokenizer["sha256"],
        "plan": decoder.plan.name,
        "plan_sha256": plan_sha256(decoder.plan),
        "buckets": list(buckets),
        # One prompt per generation: the programs take one text.
        "batch": 1,
        "program_sha256": programs.digest,
    }
    welcome = {
        "programs": programs.program_digests(),
        "architecture": decoder.config.to_dict(),
        "operator_plan": decoder.plan.to_dict(),
        "tokenizer": decoder.tokenizer,
        "max_new_tokens": max_new_tokens,
        "cache_capacity": programs.capacity,
    }
    vocab_size = decoder.config.vocab_size
    return ServedModel("generate", terms, welcome, buckets, named_weights(decoder.params),
                       lambda: DecoderRequests(programs, vocab_size))


class DecoderServer(ModelServer):
    """Serves private text generation sessions for one decoder."""

    def __init__(self, source: DecoderSource, config: ServerConfig, engine: EngineConfig,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.source = source
        self.max_new_tokens = max_new_tokens
        super().__init__(source.path, config, engine)

    def _load_model(self, checkpoint_path: Path, max_len: int | None) -> ServedModel:
        return serve_decoder_model(load_decoder(self.source), self.config.buckets,
                                   self.max_new_tokens, self.engine)
