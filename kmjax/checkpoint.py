"""One way to write and read every kmjax artifact: a pytree of arrays <-> one ``.npz`` file.

Array names come from the tree's paths (``zca/mean``, ``classifier/weights``), metadata is one
JSON string stored beside them, and nothing is pickled: files are read with
``allow_pickle=False``, so opening one runs no code. Writes are atomic (a crash never leaves a
half-written file under the final name) and deterministic (fixed zip timestamps: the same tree
and metadata give the same bytes).

Reading checks a file against a template of the expected tree whose leaves are ``Slot`` s: every
named array must be there, with the expected dtype kind and shape (named dimensions must agree
across arrays), and finite; anything else is a ``FileFormatError`` naming the file and the array.

A file written with ``checksum=True`` (every stage and checkpoint of a run) also holds the SHA-256
of each member's stored bytes (``__checksums__``, written last); reading it verifies them all
first, memory-mapped or not, so a byte changed on disk is refused instead of used. (The zip
format's own CRC-32 is checked only by reads that decompress a member, not by memory maps.)
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kmjax._io import atomic_write, checksum as _new_checksum, file_checksum, known, remember
from kmjax.errors import ChecksumError, FileFormatError

__all__ = ["FileFormatError", "Slot", "save_tree", "read_meta", "load_tree", "tree_names", "verify"]

META = "__meta__"
CHECKSUMS = "__checksums__"  # {member: SHA-256 hex of its stored bytes}, the last member
_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest timestamp: identical bytes for identical trees


class Slot:
    """A template leaf: an array of ``shape`` (ints: exact; str: a named dimension that must agree
    wherever the name appears; None: any) whose dtype is of ``kind`` ("f" float, "i" integer,
    "b" bool), finite unless ``finite=False``."""

    def __init__(self, *shape, kind: str = "f", finite: bool = True):
        self.shape, self.kind, self.finite = shape, kind, finite

    def __repr__(self):
        return f"Slot{self.shape}"


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_names(tree) -> tuple[list[str], list[Any], Any]:
    """(names, leaves, treedef) of a pytree, names joined from its path keys with "/"."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = ["/".join(_key_name(k) for k in path) for path, _ in paths]
    return names, [leaf for _, leaf in paths], treedef


class _Hashing:
    """A writable file that passes bytes on and checksums them as they go."""

    def __init__(self, out):
        self.out, self.hash = out, _new_checksum()

    def write(self, data):
        self.hash.update(data)
        return self.out.write(data)


def save_tree(path, tree, meta: dict | None = None, *, checksum: bool = False) -> Path:
    """Write the arrays of ``tree`` (and ``meta``, JSON-serializable) to ``path`` atomically (flushed to
    disk before the rename). ``checksum``: also store each member's SHA-256, verified by ``load_tree``."""
    path = Path(path)
    names, leaves, _ = tree_names(tree)
    if {META, CHECKSUMS} & set(names) or len(set(names)) != len(names):
        raise ValueError(f"array names must be unique and not {META!r} or {CHECKSUMS!r}: {names}")

    def write(f):
        sums = {}
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            def member(name, array):
                with z.open(zipfile.ZipInfo(name + ".npy", date_time=_DATE), "w", force_zip64=True) as out:
                    hashing = _Hashing(out)
                    np.lib.format.write_array(hashing, np.asarray(array), allow_pickle=False)
                    sums[name] = hashing.hash.hexdigest()

            for name, leaf in [(META, np.array(json.dumps(meta or {}, sort_keys=True)))] + list(zip(names, leaves)):
                member(name, leaf)
            if checksum:
                member(CHECKSUMS, np.array(json.dumps(sums, sort_keys=True)))

    return atomic_write(path, write)


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a member's stored bytes begin in the file (after its local header)."""
    f.seek(info.header_offset)
    if f.read(4) != b"PK\x03\x04":
        raise ValueError(f"no local header for {info.filename} at byte {info.header_offset}")
    f.seek(info.header_offset + 26)  # the local file header's name and extra-field lengths
    n_name, n_extra = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + n_name + n_extra


def verify(path, what: str = "kmjax file", *, required: bool = False) -> bool:
    """Check every member of a file written by ``save_tree(checksum=True)`` against its stored
    SHA-256, reading the file once in chunks (nothing held in memory), unless this process wrote or
    verified it as it is now (``kmjax._io.known``). Returns whether the file had checksums; a file without them is accepted unless ``required``. Raises ``ChecksumError`` (a
    ``FileFormatError``) naming the first member whose bytes changed."""
    path = Path(path)
    try:
        z = _open(path, what)
    except FileFormatError as e:  # not even a readable zip: damaged
        raise ChecksumError(str(e)) from None
    with z:
        if CHECKSUMS not in z.files:
            if required:
                raise ChecksumError(f"{what} {path} has no checksums (written by another kmjax version, or not "
                                      "by kmjax): delete it so that it is computed again")
            return False
        if known(path):
            return True
        try:
            sums = json.loads(str(z[CHECKSUMS]))
        except Exception as e:  # noqa: BLE001 - a damaged checksum member is a damaged file
            raise ChecksumError(f"{what} {path} has unreadable checksums ({e}); delete it so that it is computed "
                                  "again") from None
        infos = {i.filename[: -len(".npy")]: i for i in z.zip.infolist()}
    if set(sums) != set(infos) - {CHECKSUMS}:
        raise ChecksumError(f"{what} {path} holds members {sorted(set(infos) - {CHECKSUMS})} but checksums for "
                              f"{sorted(sums)}: it was changed after kmjax wrote it; delete it so that it is computed again")
    try:
        with open(path, "rb") as f:
            offsets = {name: _data_offset(f, infos[name]) for name in sums}
    except (OSError, struct.error, ValueError) as e:
        raise ChecksumError(f"{what} {path} is damaged (its zip directory does not match its members: {e}); delete "
                              "it so that it is computed again") from None
    for name, want in sums.items():
        if file_checksum(path, offsets[name], infos[name].compress_size) != want:
            raise ChecksumError(f"{what} {path}: array {name!r} fails its checksum (its bytes changed on disk "
                                  "after kmjax wrote them); delete the file so that it is computed again, or restore it")
    remember(path)
    return True


def _open(path: Path, what: str):
    if not path.is_file():
        raise FileFormatError(f"{what} {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FileFormatError(f"{path} is not a readable {what} (truncated or corrupt: {e})") from None


def _mapped(path: Path, z, name: str):
    """A read-only ``np.memmap`` of array ``name`` of the (uncompressed) file: its bytes are read
    when used, and the page cache, not the process, holds them."""
    info = z.zip.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return z[name]
    with open(path, "rb") as f:
        f.seek(_data_offset(f, info))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject or 0 in shape:
        return z[name]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _all_finite(a, chunk: int = 2**24) -> bool:
    """np.all(np.isfinite(a)) by pieces of ``chunk`` elements: no array-sized temporary."""
    flat = a.reshape(-1)
    return all(np.isfinite(flat[i : i + chunk]).all() for i in range(0, flat.size, chunk))


def _read(z, path: Path, name: str, what: str, mmap: bool = False):
    if name not in z.files:
        raise FileFormatError(f"{what} {path} has no array {name!r} (it holds {sorted(z.files)})")
    try:
        return _mapped(path, z, name) if mmap else z[name]
    except Exception as e:  # a damaged member: CRC errors, truncated data, a bad header
        raise FileFormatError(f"{what} {path}: array {name!r} is unreadable ({type(e).__name__}: {e})") from None


def read_meta(path, what: str = "kmjax file", kind: str | None = None) -> dict:
    """The metadata of a file written by ``save_tree``; with ``kind``, its ``meta["kind"]`` must match."""
    path = Path(path)
    with _open(path, what) as z:
        raw = _read(z, path, META, what)
    try:
        meta = json.loads(str(raw))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise FileFormatError(f"{what} {path} has unreadable metadata ({e})") from None
    if kind is not None and meta.get("kind") != kind:
        found = meta.get("kind", "no kind")
        raise FileFormatError(f"{path} is a kmjax {found} file, not a {kind} file")
    return meta


def load_tree(path, like, what: str = "kmjax file", *, mmap: bool = False, checksum: bool = False):
    """Read a file written by ``save_tree`` into the structure of ``like`` (leaves: ``Slot``).

    mmap: return the arrays as read-only ``np.memmap`` s of the file instead of copies in memory
    (for arrays larger than the memory one wants to hold, e.g. a dual ridge's kernel).
    checksum: refuse a file without stored checksums (those it has are always verified first).

    Returns (tree of NumPy arrays, metadata dict). Raises ``FileFormatError`` for a missing,
    truncated or corrupt file, bytes that fail their checksum, a missing array, or an array of the
    wrong dtype, shape or with non-finite values.
    """
    path = Path(path)
    verify(path, what, required=checksum)
    meta = read_meta(path, what)
    names, slots, treedef = tree_names(like)
    dims: dict[str, tuple[int, str]] = {}
    arrays = []
    with _open(path, what) as z:
        for name, slot in zip(names, slots):
            a = _read(z, path, name, what, mmap)
            kinds = {"f": "f", "i": "iu", "b": "b"}[slot.kind]
            if a.dtype.kind not in kinds or a.ndim != len(slot.shape):
                raise FileFormatError(f"{what} {path}: array {name!r} is {a.dtype} {a.shape}, expected "
                                      f"{len(slot.shape)} dimensions of {dict(f='float', i='int', b='bool')[slot.kind]}")
            for axis, (want, got) in enumerate(zip(slot.shape, a.shape)):
                if isinstance(want, int) and want != got:
                    raise FileFormatError(f"{what} {path}: array {name!r} has shape {a.shape}, expected "
                                          f"{want} along axis {axis}")
                if isinstance(want, str):
                    seen = dims.setdefault(want, (got, name))
                    if seen[0] != got:
                        raise FileFormatError(f"{what} {path}: array {name!r} has {got} along axis {axis} but "
                                              f"{seen[1]!r} has {seen[0]} (they must agree)")
            if slot.finite and a.dtype.kind == "f" and not _all_finite(a):
                raise FileFormatError(f"{what} {path}: array {name!r} holds NaN or Inf values")
            arrays.append(a)
    return jax.tree_util.tree_unflatten(treedef, arrays), meta
