"""Import BERT weights from a Hugging Face ``model.safetensors`` through an explicit name map.

Every parameter of ``init_params`` must be found under its mapped name with the expected shape;
a missing, extra or mis-shaped tensor raises an error that names it. Dense kernels are stored
as [out, in] by PyTorch and transposed here to [in, out].
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from cipherprompt.models.bert import BertConfig, Params, init_params

log = logging.getLogger(__name__)

# Tensors in the checkpoint that the classifier does not use.
_UNUSED = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}


def name_map(config: BertConfig) -> dict[tuple, tuple[str, bool]]:
    """Map each parameter path to (checkpoint tensor name, transpose?)."""
    mapping: dict[tuple, tuple[str, bool]] = {
        ("embeddings", "word"): ("embeddings.word_embeddings.weight", False),
        ("embeddings", "position"): ("embeddings.position_embeddings.weight", False),
        ("embeddings", "token_type"): ("embeddings.token_type_embeddings.weight", False),
        ("embeddings", "norm", "gamma"): ("embeddings.LayerNorm.weight", False),
        ("embeddings", "norm", "beta"): ("embeddings.LayerNorm.bias", False),
    }
    dense = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_output": "attention.output.dense",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    }
    norms = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for index in range(config.num_layers):
        prefix = f"encoder.layer.{index}."
        for ours, theirs in dense.items():
            mapping[("layers", index, ours, "kernel")] = (prefix + theirs + ".weight", True)
            mapping[("layers", index, ours, "bias")] = (prefix + theirs + ".bias", False)
        for ours, theirs in norms.items():
            mapping[("layers", index, ours, "gamma")] = (prefix + theirs + ".weight", False)
            mapping[("layers", index, ours, "beta")] = (prefix + theirs + ".bias", False)
    return mapping


def _set(tree: Params, path: tuple, value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _get(tree: Params, path: tuple) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


def load_bert_safetensors(path: Path, config: BertConfig, head_seed: int = 0) -> Params:
    """Load encoder weights from ``path``; the classifier head starts from random weights."""
    tensors = load_file(str(path))
    params = init_params(config, seed=head_seed)
    mapping = name_map(config)
    used = set()
    for ours, (theirs, transpose) in mapping.items():
        if theirs not in tensors:
            raise ValueError(f"{path}: tensor {theirs!r} (for {'/'.join(map(str, ours))}) missing")
        value = tensors[theirs].astype(np.float32)
        if transpose:
            value = value.T
        expected = _get(params, ours).shape
        if value.shape != expected:
            raise ValueError(
                f"{path}: tensor {theirs!r} has shape {value.shape}, expected {expected} "
                f"for {'/'.join(map(str, ours))}; the checkpoint does not match {config}"
            )
        _set(params, ours, np.ascontiguousarray(value))
        used.add(theirs)
    extra = set(tensors) - used - _UNUSED
    if extra:
        raise ValueError(f"{path}: unexpected tensors {sorted(extra)[:5]}; wrong architecture?")
    log.info("loaded %d tensors from %s", len(used), path)
    return params
