"""Report files written atomically: a temporary file in the same folder, then a rename.

A reader, or a run that crashed or was interrupted half-way, never leaves half a file under the
final name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> Path:
    """Create an empty, new file next to ``path`` with the permissions of any new file.

    tempfile.mkstemp would make it readable by its owner only (0600). os.open with mode 0666
    applies the umask instead, as for any file a program creates, so others can read reports.
    """
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"could not create a temporary file next to {path}")


def write_text_atomically(path: Path, content: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(content, encoding="utf-8"))
