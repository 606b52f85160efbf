"""Checkpoints: weights, model configuration, operator plan and metadata in one file.

A checkpoint is a NumPy ``.npz`` archive with one array per parameter (keyed by its path, such as
``layers/3/query/kernel``) and a ``__meta__`` entry holding JSON. It is written to a temporary
file in the same folder and renamed into place, so an interrupted write never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cipherprompt.files import write_npz
from cipherprompt.models.bert import BertConfig, Params
from cipherprompt.models.llama import LlamaConfig
from cipherprompt.plan import OperatorPlan

FORMAT_VERSION = 1
_META_KEY = "__meta__"
# Model families by the "family" entry of the metadata; checkpoints without one are BERT's.
_CONFIG_CLASSES = {"bert": BertConfig, "llama": LlamaConfig}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or inconsistent."""


@dataclass
class Checkpoint:
    params: Params
    config: BertConfig | LlamaConfig
    plan: OperatorPlan
    max_len: int
    metadata: dict = field(default_factory=dict)

    def weights_digest(self) -> str:
        """SHA-256 over every parameter's path, shape and bytes: the model's identity."""
        digest = hashlib.sha256()
        for key, value in sorted(flatten(self.params).items()):
            array = np.ascontiguousarray(value, dtype=np.float32)
            digest.update(key.encode())
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> Params:
    root: dict = {}
    for path, value in flat.items():
        node = root
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return _lists_from_digit_keys(root)


def _lists_from_digit_keys(node):
    if not isinstance(node, dict):
        return node
    converted = {key: _lists_from_digit_keys(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[str(index)] for index in range(len(converted))]
    return converted


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "family": "llama" if isinstance(checkpoint.config, LlamaConfig) else "bert",
        "config": checkpoint.config.to_dict(),
        "plan": checkpoint.plan.to_dict(),
        "max_len": checkpoint.max_len,
        "metadata": checkpoint.metadata,
    }
    arrays = {key: np.asarray(value, np.float32) for key, value in flatten(checkpoint.params).items()}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_npz(path, arrays)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; raise CheckpointError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; train one with 'cipherprompt train' or run "
            f"'cipherprompt demo', which prepares it"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error}); retrain it") from error
    if _META_KEY not in arrays:
        raise CheckpointError(f"{path} is not a cipherprompt checkpoint (no metadata entry)")
    try:
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
        version = meta.get("format_version")
        family = meta.get("family", "bert")
        if family not in _CONFIG_CLASSES:
            raise ValueError(f"unknown model family {family!r}; valid families: "
                             f"{', '.join(_CONFIG_CLASSES)}")
        config = _CONFIG_CLASSES[family].from_dict(meta["config"])
        plan = OperatorPlan.from_dict(meta["plan"])
        max_len = int(meta["max_len"])
    except (KeyError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: {error}") from error
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, this version reads format "
            f"{FORMAT_VERSION}; retrain it with this version"
        )
    return Checkpoint(unflatten(arrays), config, plan, max_len, meta.get("metadata", {}))
