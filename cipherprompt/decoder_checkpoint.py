"""Decoder checkpoints: the exact SmolLM2 model imported from its GGUF file, and loading checks.

The exact model (plan ``decoder-exact``) needs no training: its checkpoint is the dequantised
GGUF weights with that plan. Distilled students are written by ``train.decoder_distill`` in the
same format, so every decoder command reads one kind of file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cipherprompt.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cipherprompt.models.llama import LlamaConfig
from cipherprompt.plan import OperatorPlan

log = logging.getLogger(__name__)

# Path of the exact decoder's checkpoint, relative to the working directory.
EXACT_CHECKPOINT = Path("decoder") / "decoder-exact.npz"
# Sequence length recorded in decoder checkpoints: the window length of distillation and
# evaluation.
DEFAULT_SEQ_LEN = 128


def write_exact_checkpoint(path: Path, gguf: Path | None = None,
                           seq_len: int = DEFAULT_SEQ_LEN) -> Checkpoint:
    """Import the decoder in ``gguf`` (default: the packaged SmolLM2) and save it at ``path``.

    The checkpoint has plan ``decoder-exact`` and names the GGUF file's SHA-256 as its tokenizer,
    in the form that the decoder server expects.
    """
    from cipherprompt.assets import asset_path, sha256_of
    from cipherprompt.models.llama_import import load_llama_gguf, open_gguf, read_field

    gguf = Path(gguf) if gguf is not None else asset_path("smollm2_gguf")
    reader = open_gguf(gguf)
    config, params = load_llama_gguf(gguf, reader=reader)
    gguf_sha256 = sha256_of(gguf)
    metadata = {
        "name": str(read_field(reader, "general.name", gguf.stem, required=False)),
        "source": {"gguf": gguf.name, "sha256": gguf_sha256},
        "tokenizer": {"kind": "gguf", "sha256": gguf_sha256},
    }
    plan = OperatorPlan.preset("decoder-exact", config.num_layers)
    checkpoint = Checkpoint(params, config, plan, seq_len, metadata)
    save_checkpoint(path, checkpoint)
    log.info("wrote the exact decoder %s (%d layers) to %s", metadata["name"], config.num_layers,
             path)
    return checkpoint


def load_decoder_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint and check that it contains a decoder with a decoder plan."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.config, LlamaConfig):
        raise CheckpointError(
            f"checkpoint {path} contains a classifier, not a decoder; pass a decoder checkpoint "
            "such as the one 'cipherprompt import-decoder' writes"
        )
    if not checkpoint.plan.is_decoder or checkpoint.plan.num_layers != checkpoint.config.num_layers:
        raise CheckpointError(
            f"checkpoint {path} has plan {checkpoint.plan.name!r}, which is not a decoder plan "
            f"for its {checkpoint.config.num_layers} layers"
        )
    return checkpoint


def exact_checkpoint(work_dir: Path, path: Path | None = None) -> Path:
    """Return the exact decoder's checkpoint path, writing it from the GGUF file if missing.

    ``path`` replaces the default ``WORK_DIR/decoder/decoder-exact.npz``. An explicitly given
    path that does not exist raises CheckpointError instead of being written.
    """
    if path is not None:
        if not Path(path).is_file():
            raise CheckpointError(f"decoder checkpoint {path} not found; write the exact one "
                                  "with 'cipherprompt import-decoder'")
        return Path(path)
    path = Path(work_dir) / EXACT_CHECKPOINT
    if not path.is_file():
        log.info("no exact decoder checkpoint at %s yet: importing the packaged GGUF file", path)
        write_exact_checkpoint(path)
    return path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``import-decoder`` command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "import-decoder",
        help="write the exact decoder's checkpoint from the packaged SmolLM2 GGUF file",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("cipherprompt-work"),
                        help="folder for every output of the run (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"checkpoint to write (default: WORK_DIR/{EXACT_CHECKPOINT})")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF file of a Llama-family decoder (default: the packaged "
                             "SmolLM2-135M-Instruct)")
    parser.set_defaults(handler=cmd_import_decoder)
    return parser


def cmd_import_decoder(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.work_dir / EXACT_CHECKPOINT
    checkpoint = write_exact_checkpoint(out, args.gguf)
    print(f"wrote {out}: {checkpoint.metadata['name']}, plan {checkpoint.plan.name}, "
          f"weights sha256 {checkpoint.weights_digest()}")
    return 0
