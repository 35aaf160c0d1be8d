"""File writing that survives interruptions, and the content checksum every saved file carries."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

TMP_SUFFIX = ".tmp"  # atomic_write's temporaries: ".NAME.PID.tmp" beside the file


def read_json(path, fix: str, *, keys=()):
    """The JSON in ``path`` (then its ``keys``, in turn); a file that does not parse, or lacks them,
    is a ``RunError`` naming it and saying ``fix``."""
    from kmjax.errors import RunError

    try:
        value = json.loads(Path(path).read_text())
        for key in keys:
            value = value[key]
        return value
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is unreadable ({type(e).__name__}: {e}); {fix}") from None


def sync_folder(folder) -> None:
    """Make a rename or a new file in ``folder`` durable (its directory entry on disk)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for reading (some platforms): the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    A rename within a folder is atomic and the data is on disk before it (fsync), so an interruption
    (Ctrl-C, a kill, a power cut, a full disk) never leaves a partial file under the final name for
    a later run to read as valid, and the previous file stays as it was. A failed write removes its
    temporary; one left by a killed process is removed by ``remove_stale_temporaries``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
        remember(path)
    except OSError as e:
        if e.filename is None:  # a failed write names no file (ENOSPC from a write call): name the one written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporaries ``atomic_write`` left in ``folder`` when a process was killed while
    writing (a killed kernel write can leave 10 GB). Call only while holding the folder's lock: the
    files of a writer that is still running would go too. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


_VERIFIED: set = set()  # files this process wrote, or verified, as they are now (see ``known``)


def _identity(path) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def known(path) -> bool:
    """Whether this process wrote ``path`` or verified its checksums, and it has not changed since
    (same inode, size and modification time): its checksums need not be read again (a 10 GB
    kernel written and mapped back, a sweep's shared features read by each of its runs)."""
    try:
        return _identity(path) in _VERIFIED
    except OSError:
        return False


def remember(path) -> None:
    """Record that ``path``, as it is now, was written or verified by this process."""
    _VERIFIED.add(_identity(path))


def checksum():
    """The content checksum of every kmjax file: SHA-256 (hardware-accelerated on current x86 and
    ARM CPUs; measured 1.7 GB/s on one core of an AMD EPYC, so ~6 s for a 10 GB kernel)."""
    return hashlib.sha256()


def rows_checksum(a, start: int, stop: int) -> str:
    """The checksum (hex) of rows ``start:stop`` of an array (e.g. a memory map), 64 MB at a time."""
    h = checksum()
    step = max(1, (1 << 26) // max(1, a[:1].nbytes))
    for i in range(start, stop, step):
        h.update(memoryview(np.ascontiguousarray(a[i : min(i + step, stop)])).cast("B"))
    return h.hexdigest()


def file_checksum(path, start: int = 0, size: int | None = None, chunk: int = 1 << 24) -> str:
    """The checksum (hex) of ``size`` bytes of a file from ``start`` (default: to its end), read in
    chunks of ``chunk`` bytes: no copy of the file is held."""
    h = checksum()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = (os.fstat(f.fileno()).st_size - start) if size is None else size
        while left > 0:
            n = f.readinto(view[: min(chunk, left)])
            if not n:
                break  # a file shorter than its record: the checksum will not match
            h.update(view[:n])
            left -= n
    return h.hexdigest()
