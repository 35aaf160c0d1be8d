"""File writing that survives interruptions."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    A rename within a folder is atomic, so an interruption (Ctrl-C, a kill, a full disk) never
    leaves a partial file under the final name for a later run to read as valid.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
