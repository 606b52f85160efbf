"""Files written atomically: a temporary file in the same folder, flushed to disk, then a rename.

Reports, records, state files and checkpoints are written here, so that no reader finds half a
file under the final name, even after a run crashed or was interrupted half-way.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, flush that file to disk, then rename it to ``path``.

    The folder is created when missing. On any error, or an interrupt, the temporary file is
    removed and ``path`` keeps its earlier content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, content: str) -> None:
    """Write ``content`` as UTF-8 text to ``path`` atomically."""
    write_atomically(path, lambda temporary: temporary.write_text(content, encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomically(path, json.dumps(data, indent=2))


def write_npz(path: Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed .npz archive atomically.

    The archive goes through an open file, because np.savez appends ".npz" to a path argument.
    NumPy is imported here, so that light processes such as the relay do not load it.
    """
    import numpy as np

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            np.savez(out, **arrays)

    write_atomically(path, write)


def _create_temporary(path: Path) -> Path:
    """Create an empty, new file next to ``path`` with the permissions of any new file.

    The name has a random part, so two processes writing the same path never share a temporary
    file. tempfile.mkstemp would make it readable by its owner only (0600). os.open with mode 0666
    applies the umask instead, as for any new file, so that others can read reports.
    """
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"could not create a temporary file next to {path}")
