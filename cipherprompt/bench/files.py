"""Report files written atomically: a temporary file in the same folder, then a rename.

A reader, or a run that crashed or was interrupted half-way, never leaves half a file under the
final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, content: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(content, encoding="utf-8"))
