"""The byte-level BPE tokenizer of a Llama-family GGUF file, rebuilt from the file's metadata.

A GGUF file of a GPT-2-style vocabulary (``tokenizer.ggml.model = "gpt2"``) stores the tokens,
the merges in rank order, each token's type and the special token ids. This module turns them
into a ``tokenizers`` BPE tokenizer with byte-level pre-tokenization and decoding, so the client
tokenizes locally from the same file the model comes from. Only metadata is read: no weights.

``ByteTokenizer`` maps UTF-8 bytes to ids, for small test decoders that have no vocabulary file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from cipherprompt.models.llama_import import GGUFImportError, open_gguf, read_field

# Token types of tokenizer.ggml.token_type, as llama.cpp numbers them.
_CONTROL = 3
_USER_DEFINED = 4


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """Build the pre-tokenizer that llama.cpp names ``tokenizer.ggml.pre``.

    "gpt2" is GPT-2's split into contractions, letters, digits, other symbols and whitespace.
    "smollm" first isolates every numeric character (llama.cpp's regular expression \\p{N}),
    then does the same. Other names raise GGUFImportError, because their splits differ.

    NOTE: transformers 5.25 builds the "smollm" tokenizer of a GGUF file without the first step,
    so there a space can merge with a following non-ASCII numeric character such as "½", and
    here it cannot. ASCII digits encode the same in both.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("gpt2", "default"):
        return byte_level
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFImportError(
        f"pre-tokenizer {name!r} is not supported; supported: gpt2, default, smollm"
    )


class LlamaTokenizer:
    """Byte-level BPE tokenizer read from the metadata of a GGUF file."""

    def __init__(self, path: Path, reader: GGUFReader | None = None) -> None:
        """Build the tokenizer of the GGUF file ``path``; pass ``reader`` to reuse an open one."""
        reader = reader if reader is not None else open_gguf(path)
        model_name = read_field(reader, "tokenizer.ggml.model")
        if model_name != "gpt2":
            raise GGUFImportError(
                f"{path}: tokenizer model {model_name!r} is not supported; only byte-level BPE "
                "('gpt2') is"
            )
        tokens = read_field(reader, "tokenizer.ggml.tokens")
        merges = read_field(reader, "tokenizer.ggml.merges")
        token_types = read_field(reader, "tokenizer.ggml.token_type", required=False)

        vocab = {token: index for index, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise GGUFImportError(f"{path}: the vocabulary contains duplicate tokens")
        merge_pairs = []
        for rank, merge in enumerate(merges):
            pair = merge.split(" ")
            if len(pair) != 2:
                raise GGUFImportError(f"{path}: merge {rank} {merge!r} is not two tokens")
            merge_pairs.append((pair[0], pair[1]))

        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False))
        pre_name = read_field(reader, "tokenizer.ggml.pre", "default", required=False)
        tokenizer.pre_tokenizer = _pre_tokenizer(pre_name)
        tokenizer.decoder = decoders.ByteLevel()

        # Control and user-defined tokens are matched whole in the text, before pre-tokenization,
        # as llama.cpp does. Control tokens are special: decode can skip them.
        if token_types is not None:
            special = [tokens[i] for i, kind in enumerate(token_types) if kind == _CONTROL]
            user = [tokens[i] for i, kind in enumerate(token_types) if kind == _USER_DEFINED]
            tokenizer.add_special_tokens(
                [AddedToken(token, special=True, normalized=False) for token in special]
            )
            tokenizer.add_tokens([AddedToken(token, normalized=False) for token in user])

        self.bos_id = read_field(reader, "tokenizer.ggml.bos_token_id", required=False)
        self.eos_id = read_field(reader, "tokenizer.ggml.eos_token_id", required=False)
        self.pad_id = read_field(reader, "tokenizer.ggml.padding_token_id", required=False)
        self._set_post_processor(
            tokenizer,
            tokens,
            add_bos=bool(read_field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
            add_eos=bool(read_field(reader, "tokenizer.ggml.add_eos_token", False, required=False)),
        )
        self._tokenizer = tokenizer
        self.chat_template = read_field(reader, "tokenizer.chat_template", required=False)

    def _set_post_processor(
        self, tokenizer: Tokenizer, tokens: list[str], add_bos: bool, add_eos: bool
    ) -> None:
        """Add the BOS and EOS tokens that the file requests around every encoded text."""
        template, special = ["$A"], []
        if add_bos:
            if self.bos_id is None:
                raise GGUFImportError("tokenizer.ggml.add_bos_token is set without a BOS id")
            template.insert(0, tokens[self.bos_id])
            special.append((tokens[self.bos_id], self.bos_id))
        if add_eos:
            if self.eos_id is None:
                raise GGUFImportError("tokenizer.ggml.add_eos_token is set without an EOS id")
            template.append(tokens[self.eos_id])
            special.append((tokens[self.eos_id], self.eos_id))
        if special:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=" ".join(template), special_tokens=special
            )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``, with BOS or EOS where the file requests them."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Return the text of ``ids``; bytes that do not form UTF-8 become U+FFFD."""
        token_ids = [int(token_id) for token_id in ids]
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def apply_chat_template(self, user_message: str) -> str:
        """Wrap ``user_message`` in the file's chat template as one user turn, ready for a reply.

        The template is Jinja; it is rendered in Jinja's sandbox, as transformers does, because
        it comes from the model file. Raises ValueError when the file has no template.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer's GGUF file has no chat template; send the prompt "
                             "as it is (generate --no-chat)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = environment.from_string(self.chat_template)
        return template.render(messages=[{"role": "user", "content": user_message}],
                               add_generation_prompt=True)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and an end-of-sequence id 256, for small test models.

    It has no chat template. A model with a larger vocabulary may produce ids above 256; they
    decode to U+FFFD.
    """

    eos_id = 256
    bos_id = None
    pad_id = None
    chat_template = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        data, pieces = bytearray(), []
        for token_id in map(int, ids):
            if token_id < 256:
                data.append(token_id)
                continue
            pieces.append(data.decode("utf-8", errors="replace"))
            data = bytearray()
            if token_id != self.eos_id:
                pieces.append("\ufffd")
            elif not skip_special_tokens:
                pieces.append("<eos>")
        pieces.append(data.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(self, user_message: str) -> str:
        raise ValueError("the byte tokenizer has no chat template; send the prompt as it is "
                         "(generate --no-chat)")


# The identity of the byte tokenizer in the handshake, in place of a file's SHA-256.
BYTE_TOKENIZER_SHA256 = hashlib.sha256(b"cipherprompt byte tokenizer, eos 256").hexdigest()


def tokenizer_spec(kind: str, sha256: str) -> dict:
    """Describe a tokenizer for the handshake: ``gguf`` with its file's SHA-256, or ``bytes``."""
    if kind not in ("gguf", "bytes"):
        raise ValueError(f"invalid tokenizer kind {kind!r}; valid kinds: gguf, bytes")
    return {"kind": kind, "sha256": BYTE_TOKENIZER_SHA256 if kind == "bytes" else sha256}


def load_tokenizer(spec: dict, gguf_path: Path | None = None) -> LlamaTokenizer | ByteTokenizer:
    """Build the tokenizer that ``spec`` describes from a local file.

    A ``gguf`` tokenizer comes from ``gguf_path``, by default the packaged SmolLM2 file, and
    that file's SHA-256 must equal the spec's. Raises ValueError naming the fix otherwise.
    """
    from cipherprompt.assets import ASSETS, asset_path, sha256_of

    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "gguf":
        raise ValueError(f"unknown tokenizer kind {kind!r}; update cipherprompt")
    if gguf_path is None:
        packaged = ASSETS["smollm2_gguf"]
        if spec.get("sha256") != packaged.sha256:
            raise ValueError(
                f"the server's tokenizer comes from a GGUF file with SHA-256 {spec.get('sha256')}, "
                f"not the packaged {packaged.relative_path}; pass that file with --tokenizer PATH"
            )
        return LlamaTokenizer(asset_path("smollm2_gguf"))
    found = sha256_of(gguf_path)
    if found != spec.get("sha256"):
        raise ValueError(
            f"--tokenizer {gguf_path} has SHA-256 {found}, the server's tokenizer file has "
            f"{spec.get('sha256')}; pass the GGUF file the server's model comes from"
        )
    return LlamaTokenizer(gguf_path)
