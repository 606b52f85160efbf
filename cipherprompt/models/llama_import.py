"""Import a Llama-family decoder from a GGUF file (llama.cpp's format) through an explicit name map.

The configuration comes from the file's metadata (``llama.*`` keys). Every tensor is dequantised
to float32 with ``gguf.quants.dequantize``, which covers F32, F16, BF16, Q8_0, Q4_1, the K-quants
and the other types that the installed gguf package implements. Every parameter of
``param_shapes`` must be found under its mapped name with the expected shape; a missing, extra
or mis-shaped tensor raises GGUFImportError naming it.

Shapes below are NumPy's row-major ones, the reverse of the dimension list that GGUF stores:
a dense weight is [out, in] as in PyTorch and is transposed here to [in, out].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from cipherprompt.models.llama import LlamaConfig, Params, param_shapes

log = logging.getLogger(__name__)

ARCHITECTURE = "llama"


class GGUFImportError(ValueError):
    """A GGUF file does not contain a supported Llama-family model, or its tensors do not fit."""


@dataclass(frozen=True)
class TensorRule:
    """Source of one parameter in a GGUF file, and its conversion to our layout."""

    gguf_name: str
    # Dense weights are stored [out, in] and transposed to our [in, out] kernels.
    transpose: bool = False
    # For query and key weights: the head count whose rows llama.cpp interleaved.
    rotary_heads: int | None = None


def open_gguf(path: Path) -> GGUFReader:
    """Open ``path`` with gguf's reader, raising GGUFImportError when it is not a GGUF file."""
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise GGUFImportError(f"{path}: cannot read as a GGUF file: {error}") from error


def read_field(reader: GGUFReader, key: str, default: object = None, required: bool = True):
    """Return the metadata value ``key`` as a Python value; raise when a required key is missing."""
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFImportError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def config_from_gguf(reader: GGUFReader) -> LlamaConfig:
    """Build the decoder configuration from the ``llama.*`` metadata of a GGUF file."""
    architecture = read_field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise GGUFImportError(
            f"GGUF architecture is {architecture!r}; only {ARCHITECTURE!r} is supported"
        )
    prefix = ARCHITECTURE + "."
    scaling = read_field(reader, prefix + "rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        raise GGUFImportError(f"rotary scaling {scaling!r} is not supported; only plain RoPE is")

    tensor_names = {tensor.name for tensor in reader.tensors}
    vocab_size = read_field(reader, prefix + "vocab_size", required=False)
    if vocab_size is None:
        vocab_size = len(read_field(reader, "tokenizer.ggml.tokens"))
    num_heads = read_field(reader, prefix + "attention.head_count")
    # Without a key/value head count every query head has its own key and value head.
    num_kv_heads = read_field(reader, prefix + "attention.head_count_kv", num_heads, required=False)
    config = LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(read_field(reader, prefix + "embedding_length")),
        num_layers=int(read_field(reader, prefix + "block_count")),
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv_heads),
        intermediate_size=int(read_field(reader, prefix + "feed_forward_length")),
        max_positions=int(read_field(reader, prefix + "context_length")),
        # 10000 is llama.cpp's default base when a file does not state one.
        rope_theta=float(read_field(reader, prefix + "rope.freq_base", 10000.0, required=False)),
        rms_norm_eps=float(read_field(reader, prefix + "attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
    )

    # Partial rotary embedding and head sizes other than hidden / heads are not implemented.
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = read_field(reader, prefix + key, required=False)
        if value is not None and int(value) != config.head_size:
            raise GGUFImportError(
                f"GGUF {prefix + key} is {value}, but this decoder supports only "
                f"hidden_size / num_heads = {config.head_size}"
            )
    return config


def name_map(config: LlamaConfig) -> dict[tuple, TensorRule]:
    """Map each parameter path of ``param_shapes`` to its GGUF tensor and conversion."""
    mapping: dict[tuple, TensorRule] = {
        ("embeddings", "word"): TensorRule("token_embd.weight"),
        ("final_norm", "gamma"): TensorRule("output_norm.weight"),
    }
    if not config.tie_word_embeddings:
        mapping[("lm_head", "kernel")] = TensorRule("output.weight", transpose=True)
    dense = {
        "value": "attn_v",
        "attention_output": "attn_output",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
    }
    for index in range(config.num_layers):
        prefix = f"blk.{index}."
        layer = ("layers", index)
        mapping[layer + ("attention_norm", "gamma")] = TensorRule(prefix + "attn_norm.weight")
        mapping[layer + ("mlp_norm", "gamma")] = TensorRule(prefix + "ffn_norm.weight")
        mapping[layer + ("query", "kernel")] = TensorRule(
            prefix + "attn_q.weight", transpose=True, rotary_heads=config.num_heads
        )
        mapping[layer + ("key", "kernel")] = TensorRule(
            prefix + "attn_k.weight", transpose=True, rotary_heads=config.num_kv_heads
        )
        for ours, theirs in dense.items():
            mapping[layer + (ours, "kernel")] = TensorRule(prefix + theirs + ".weight",
                                                           transpose=True)
    return mapping


def undo_rotary_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a GGUF query or key weight [heads * head_size, in] to rotate-half.

    llama.cpp's converter interleaves each head's rows, so that the rows of the first half
    (0, 1, ...) and of the second half (h, h+1, ..., h = head_size / 2) alternate:
    0, h, 1, h+1, .... This restores 0, 1, ..., h-1, h, ..., 2h-1.
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise GGUFImportError(f"cannot split {rows} rows into {heads} heads of even size")
    half = rows // heads // 2
    by_head = weight.reshape(heads, half, 2, *weight.shape[1:])
    return by_head.swapaxes(1, 2).reshape(weight.shape)


def _lookup(tree: Params, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _store(tree: Params, path: tuple, value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _dequantise(path: Path, tensor) -> np.ndarray:
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise GGUFImportError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the "
            f"installed gguf package cannot dequantise: {error}"
        ) from error
    # A copy, so that no parameter is a view into the memory-mapped file.
    return np.array(values, dtype=np.float32)


def load_llama_gguf(
    path: Path, config: LlamaConfig | None = None, reader: GGUFReader | None = None
) -> tuple[LlamaConfig, Params]:
    """Read the configuration and float32 weights of the decoder in the GGUF file ``path``.

    When ``config`` is given it must equal the file's configuration. Pass ``reader`` to reuse
    an open reader of the same file. Returns (config, params) with params shaped as
    ``param_shapes(config)``.
    """
    reader = reader if reader is not None else open_gguf(path)
    file_config = config_from_gguf(reader)
    if config is not None and config != file_config:
        raise GGUFImportError(f"{path} contains {file_config}, expected {config}")
    config = file_config

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    shapes = param_shapes(config)
    # A second tree of shapes, whose leaves are replaced by the arrays one by one.
    params = param_shapes(config)
    used = set()
    for ours, rule in name_map(config).items():
        where = "/".join(map(str, ours))
        tensor = tensors.get(rule.gguf_name)
        if tensor is None:
            raise GGUFImportError(f"{path}: tensor {rule.gguf_name!r} (for {where}) is missing")
        expected = _lookup(shapes, ours)
        stored_shape = tuple(reversed(expected)) if rule.transpose else tuple(expected)
        value = _dequantise(path, tensor)
        if value.shape != stored_shape:
            raise GGUFImportError(
                f"{path}: tensor {rule.gguf_name!r} has shape {value.shape}, expected "
                f"{stored_shape} for {where}; the file does not match {config}"
            )
        if rule.rotary_heads is not None:
            value = undo_rotary_permutation(value, rule.rotary_heads)
        if rule.transpose:
            value = value.T
        _store(params, ours, np.ascontiguousarray(value))
        used.add(rule.gguf_name)

    extra = sorted(set(tensors) - used)
    if extra:
        raise GGUFImportError(
            f"{path}: unexpected tensors {extra[:5]} ({len(extra)} in all); the file contains a "
            "variant of the architecture that this decoder does not implement"
        )
    log.info("loaded %d tensors from %s", len(used), path)
    return config, params
