"""Run folders and the finished stages kept in them.

A run folder holds one experiment: ``config.json`` first, ``results.json`` last, and ``stages/``
(or a link to a stage folder shared by a sweep). A stage is saved under a key that hashes
everything its output depends on (kmjax's version and the code of the stage, the config entries
that matter, the identity of the data), so a later run whose key matches loads it instead of
recomputing it, after checking the checksums written with it. Writes are atomic, and a folder in
use is locked against a second process.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from kmjax._io import atomic_write, known, remember, remove_stale_temporaries, rows_checksum, sync_folder
from kmjax.checkpoint import FileFormatError, load_tree, save_tree
from kmjax import templates
from kmjax.config import check_name
from kmjax.errors import ChecksumError, RunError

__all__ = ["RunError", "new_run_dir", "RunLock", "StageStore", "stage_keys", "data_id", "config_differences",
           "write_json"]

# Config entries that change how fast a run goes, never its numbers.
SPEED_ONLY = ("features.memory_mb", "features.keep")


def _unwritable(folder: Path, e: OSError) -> RunError:
    return RunError(f"cannot write in {folder}: {e.strerror or e}; pass --out (or out=) a folder you can write to")


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh folder out/name, or out/name-2, -3, ...: an earlier run is never overwritten."""
    check_name(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = out / (name if i == 1 else f"{name}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise _unwritable(out, e) from None
    raise RunError(f"no free run folder name under {out}")


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


class RunLock:
    """An exclusive lock on a folder (``.lock``, released when the process ends, even killed)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(self.path.parent, e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "another"
            os.close(self.fd)
            raise RunError(f"{self.path.parent} is in use by another kmjax process (pid {holder}); wait for it to "
                           "finish, or stop it, before resuming this folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def data_id(*arrays) -> str:
    """A short hash of arrays' contents: the identity of the data a stage was computed from. An
    array may also be given as ``(dtype, shape, pieces)``: its bytes in order, in ``pieces`` (an
    iterable of arrays), never held whole; the hash is that of the whole array."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        if isinstance(a, tuple):
            dtype, shape, pieces = a
        else:
            a = np.ascontiguousarray(a)
            dtype, shape, pieces = a.dtype, a.shape, [a]
        h.update(f"{np.dtype(dtype)}{tuple(shape)}".encode())
        size = 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype)
            h.update(memoryview(piece).cast("B"))
            size += piece.size
        if size != int(np.prod(shape)):
            raise ValueError(f"the pieces of a ({np.dtype(dtype)}, {tuple(shape)}) array hold {size} values")
    return h.hexdigest()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_keys(config: dict, train_id, test_id, version: str, code: dict, *, dictionary_id=None) -> dict[str, str]:
    """A key per stage of what determines its output: config entries, the data (set, split, options, image ids;
    not its folder), kmjax's version, ``code`` (``provenance.stage_code``). See docs/datasets.md for dictionary_id."""
    c, d = config, config["data"]; feats = {k: v for k, v in c["features"].items() if f"features.{k}" not in SPEED_ONLY}
    dataset = {k: d.get(k, v) for k, v in (("dataset", "cifar10"), ("labels", ""), ("image_size", []))}
    training = {**dataset, **{k: d.get(k) for k in ("fold", "train_batches", "n_train")}, "split": "train",
                "id": train_id}
    source = {**dataset, "split": d["dictionary_split"], "id": dictionary_id} if d.get("dictionary_split") else training
    parts = {"dictionary": [version, code["dictionary"], c["seed"], source,
                            *map(c.get, ("patches", "preprocess", "kmeans", "devices"))]}
    parts["features"] = [parts["dictionary"], code["features"], feats, training, d["n_test"], test_id]
    parts["classifier"] = [parts["features"], code["classifier"], c["classifier"]]
    return {name: _hash(v) for name, v in parts.items()}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(before: dict, after: dict) -> dict[str, tuple]:
    """{dotted key: (before, after)} for every entry that differs and can change results."""
    a, b = _flatten(before), _flatten(after)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in SPEED_ONLY}


class StageStore:
    """Finished stages in one folder: trees as ``STAGE-KEY.npz``, large arrays as ``.npy`` files
    (filled in place as ``.partial`` files, renamed when the stage is done, then a ``.done``
    marker). A ``.partial`` file keeps the rows its ``.rows`` file counts (``mark_rows``): an
    interrupted stage resumes from there; anything else unfinished is recomputed.

    Everything saved carries its stage key and a SHA-256 content checksum written with it (a tree's
    in its ``.npz``; an array's per segment of rows, in its ``.rows`` record and then its stage's
    ``.done`` marker), verified when it is read back, memory-mapped or not: a file changed on disk,
    or saved under another key, is refused with a message (``RunError``) instead of used.

    Use it as a context manager (``with StageStore(folder) as store``): the folder is locked against
    other kmjax processes (a stage folder may be shared by several runs: ``--cache``, a sweep, a
    classifier-only resume) and the temporaries a killed process left in it are removed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._checkpoints: dict = {}
        self._lock = None
        self._segments: dict = {}  # the row checksums of each array being filled (its .partial path)

    def __enter__(self):
        self._mkdir()
        self._lock = RunLock(self.folder).__enter__()
        remove_stale_temporaries(self.folder)
        return self

    def __exit__(self, *exc):
        self._lock.__exit__(*exc)
        self._lock = None

    def _path(self, stage, key, suffix):
        return self.folder / f"{stage}-{key}{suffix}"

    def _mkdir(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(self.folder, e) from None

    def load_tree(self, stage, key, like, mmap: bool = False):
        """(tree, meta) of a finished stage, or None; ``mmap``: arrays as read-only memmaps. A file
        that fails its checksum or was saved under another key is refused (``RunError``); one that does
        not fit ``like`` is a ``FileFormatError``."""
        path = self._path(stage, key, ".npz")
        if not path.is_file():
            return None
        try:
            tree, meta = load_tree(path, like, "stage file", mmap=mmap, checksum=True)
        except ChecksumError as e:
            raise RunError(f"{e}. (kmjax refuses to resume from a saved stage it cannot verify.)") from None
        if meta.get("stage_key") != key:
            raise RunError(f"stage file {path} was saved under the key {meta.get('stage_key')!r}, not {key!r} as its "
                           "name says (renamed or copied by hand?); delete it so that the stage is computed again")
        return tree, meta

    def save_tree(self, stage, key, tree, meta):
        self._mkdir()
        path = self._path(stage, key, ".npz")
        try:
            save_tree(path, tree, {**meta, "stage_key": key}, checksum=True)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise RunError(f"no space left in {self.folder} while writing {path.name} ({e.strerror}); free some space "
                           "or put the stages elsewhere (--cache DIR), then rerun with --resume RUN_DIR: what was "
                           "saved before is intact") from None

    def load_arrays(self, stage, key, names):
        """{name: read-only memmap} of a finished array stage, or None; each array's rows are
        checked against the checksums recorded as they were written (once per process: reading
        a 10 GB file again costs seconds), and a mismatch is refused (``RunError``)."""
        done = self._path(stage, key, ".done")
        if not done.is_file():
            return None
        try:
            record = json.loads(done.read_text())
            arrays = record["arrays"]
            if record["stage_key"] != key:
                raise ValueError(f"it names the key {record['stage_key']!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"{done} is not a kmjax stage record ({e}); delete it and the {stage} files of key {key} "
                           "so that the stage is computed again") from None
        loaded = {}
        for n in names:
            path = self._path(f"{stage}.{n}", key, ".npy")
            try:
                loaded[n] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise RunError(f"stage file {path} is unreadable ({e}); delete {done} so that the stage is computed "
                               "again") from None
            a, want = loaded[n], arrays.get(n, {})
            if [a.dtype.str, list(a.shape), a.flags.c_contiguous] != [want.get("dtype"), want.get("shape"), True]:
                raise RunError(f"stage file {path} holds a {a.dtype.str} {a.shape} array, its record says "
                               f"{want.get('dtype')} {want.get('shape')} (its header changed on disk); delete {done} "
                               "so that the stage is computed again")
            if not known(path):  # once per process and file: a sweep's runs share the features
                self._check_segments(a, want.get("segments"), path)
                remember(path)
        return loaded

    def _check_segments(self, a, segments, path) -> None:
        """Refuse ``a`` unless ``segments`` ([start, stop, checksum] of rows) cover its rows and match."""
        covered = 0
        for start, stop, want in segments or []:
            if start != covered or rows_checksum(a, start, stop) != want:
                raise RunError(f"stage file {path}: rows {start}-{stop} fail their checksum (changed on disk after "
                               "kmjax wrote them); delete it so that the stage is computed again")
            covered = stop
        if covered != a.shape[0]:
            raise RunError(f"stage file {path}: checksums cover {covered} of its {a.shape[0]} rows; delete it so "
                           "that the stage is computed again")

    def check_space(self, nbytes: int, stage: str, key: str) -> None:
        """Refuse to start writing ``nbytes`` of ``stage`` arrays unless the disk has room for
        them (the ``.partial`` files of an interrupted run of the stage already hold theirs)."""
        self._mkdir()
        held = sum(p.stat().st_size for p in self.folder.glob(f"{stage}.*-{key}.npy.partial"))
        free = shutil.disk_usage(self.folder).free
        if free < nbytes - held:
            raise RunError(f"{self.folder} has {free / 1e9:.2f} GB free, the features need {nbytes / 1e9:.2f} GB "
                           f"({nbytes} bytes); free some space or put the stages elsewhere (--cache DIR)")

    def new_array(self, stage, key, name, shape, dtype=np.float32):
        """An array on disk to fill in place (``.partial`` until committed), its space reserved now:
        a full disk is an error here, never a crash (SIGBUS) later when a page of the mapping is
        written."""
        return self.open_array(stage, key, name, shape, dtype, resume=False)[0]

    def _rows_file(self, a) -> Path:
        return Path(a.filename).with_suffix(".rows")

    def open_array(self, stage, key, name, shape, dtype=np.float32, *, resume=True):
        """(array on disk to fill in place, rows already filled): with ``resume``, the ``.partial``
        file an interrupted run left (same stage key, shape and dtype) is reopened, and its rows
        recorded by ``mark_rows`` are kept; otherwise a new file (0 rows)."""
        self._mkdir()
        # one name per array and key (no process id): the run folder's lock lets one process in
        path = self._path(f"{stage}.{name}", key, ".npy.partial")
        rows_file = path.with_suffix(".rows")
        if resume and path.is_file() and rows_file.is_file():
            try:
                a = np.load(path, mmap_mode="r+")
                record = json.loads(rows_file.read_text())
                rows, segments = int(record["rows"]), record["segments"]
                fits = record["stage_key"] == key and segments[-1][1] == rows
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                a, fits = None, False
            if fits and a.shape == tuple(shape) and a.dtype == np.dtype(dtype) and 0 < rows <= a.shape[0]:
                self._check_segments(a[:rows], segments, path)  # the rows kept must be the rows written
                self._segments[os.path.realpath(path)] = (key, segments)
                return a, rows
        rows_file.unlink(missing_ok=True)
        self._segments[os.path.realpath(path)] = (key, [])
        a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        try:
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            del a
            path.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
                raise RunError(f"no space left in {self.folder} for {path.name} ({nbytes / 1e9:.2f} GB, {nbytes} "
                               "bytes); free some space or put the stages elsewhere (--cache DIR)") from None
            raise
        return a, 0

    def mark_rows(self, a, rows: int) -> None:
        """Record that the first ``rows`` rows of ``a`` (from ``open_array``) are written: flushed
        to disk first, so that a crash after this call keeps them, and the new rows' checksum
        recorded with their count."""
        a.flush()
        key, segments = self._segments[os.path.realpath(a.filename)]
        start = segments[-1][1] if segments else 0
        if rows > start:
            segments.append([start, int(rows), rows_checksum(a, start, int(rows))])
        record = {"stage_key": key, "rows": int(rows), "segments": segments}
        atomic_write(self._rows_file(a), lambda f: f.write(json.dumps(record).encode()))

    def commit_arrays(self, stage, key, arrays: dict) -> None:
        """Give arrays from ``new_array`` their final names, then mark the stage done (its record
        holds each array's row checksums: those ``mark_rows`` recorded, or computed now)."""
        record = {"stage_key": key, "arrays": {}}
        for n, a in arrays.items():
            a.flush()
            segments = self._segments.pop(os.path.realpath(a.filename), (key, []))[1]
            if not segments or segments[-1][1] != a.shape[0]:
                segments = [[0, a.shape[0], rows_checksum(a, 0, a.shape[0])]]
            record["arrays"][n] = {"shape": list(a.shape), "dtype": a.dtype.str, "segments": segments}
            final = self._path(f"{stage}.{n}", key, ".npy")
            os.replace(a.filename, final)
            self._rows_file(a).unlink(missing_ok=True)
            remember(final)
        sync_folder(self.folder)
        # written last: a stage without its marker was interrupted and is recomputed
        atomic_write(self._path(stage, key, ".done"), lambda f: f.write(json.dumps(record).encode()))

    def delete_arrays(self, stage, key, names) -> None:
        self._path(stage, key, ".done").unlink(missing_ok=True)
        for n in names:
            self._path(f"{stage}.{n}", key, ".npy").unlink(missing_ok=True)

    def any_finished(self) -> bool:
        return self.folder.is_dir() and (any(self.folder.glob("*.npz")) or any(self.folder.glob("*.done")))

    def checkpoints(self, stage: str, key: str, log=None) -> "StageCheckpoints":
        """The checkpoints of a stage (one object per stage and key: it knows what this process wrote)."""
        found = self._checkpoints.setdefault((stage, key), StageCheckpoints(self, stage, key, log))
        found.log = log if log is not None else found.log
        return found


class StageCheckpoints:
    """The state of an unfinished stage, as the library hands it to ``checkpoint(state)`` and takes
    it back (``state=``): each named part (k-means' "kmeans", a ``ClassifierState``'s parts) saved as
    ``STAGE.NAME-KEY.npz`` (template: ``kmjax.templates.fit_state``), deleted by ``clear`` once the
    stage is done. A file that fails its checksum or sits under another key stops the run
    (``RunError``: something changed it on disk); one whose arrays do not fit the template (another
    problem size) is ignored and recomputed."""

    def __init__(self, store: StageStore, stage: str, key: str, log=None):
        self.store, self.stage, self.key, self.log = store, stage, key, log
        self._written: set = set()  # names saved by this process: reading them back is no resumption
        self._known: dict = {}  # name: the part last saved or read back, not to be written again

    def _read(self, name):
        try:
            saved = self.store.load_tree(f"{self.stage}.{name}", self.key, templates.fit_state(name),
                                         mmap=templates.mapped(name))
        except FileFormatError:  # not this problem's state: recomputed (a damaged file is a RunError)
            return None
        return None if saved is None else saved[0]

    def has(self, name) -> bool:
        """Whether a state is saved under ``name`` (without reading it)."""
        return self.store._path(f"{self.stage}.{name}", self.key, ".npz").is_file()

    def get(self, name):
        """The part saved under ``name`` (the large ones memory-mapped), or None."""
        self._known.pop(name, None)  # no reference held while it is read again (an F x F Gram matrix twice)
        saved = self._read(name)
        if saved is not None:
            self._known[name] = saved
            if self.log is not None and name not in self._written:
                self.log(f"[{self.stage}] resuming from its saved {name}")
        return saved

    def save(self, name, tree):
        """Save a part; return it memory-mapped from its file if ``kmjax.templates.mapped``, else None."""
        self.store.save_tree(f"{self.stage}.{name}", self.key, tree, {"kind": "checkpoint"})
        self._written.add(name)
        kept = self._read(name) if templates.mapped(name, tree) else None
        self._known[name] = tree if kept is None else kept
        return kept

    def state(self, kind):
        """``kind.from_parts`` of the parts saved (e.g. ``ClassifierState``), or None if there are none."""
        prefix, suffix = f"{self.stage}.", f"-{self.key}.npz"
        names = sorted(p.name[len(prefix) : -len(suffix)] for p in self.store.folder.glob(f"{prefix}*{suffix}"))
        parts = {name: part for name in names if (part := self.get(name)) is not None}
        return kind.from_parts(parts) if parts else None

    def checkpoint(self, state):
        """Save the parts of ``state`` not saved or read back before (the same objects); the state with
        the parts mapped from their files (so that the library never holds them twice), or None."""
        parts = state.parts()
        kept = {name: self.save(name, part) for name, part in parts.items() if part is not self._known.get(name)}
        kept = {name: part for name, part in kept.items() if part is not None}
        return type(state).from_parts({**parts, **kept}) if kept else None

    def clear(self) -> None:
        for path in self.store.folder.glob(f"{self.stage}.*-{self.key}.npz"):
            path.unlink(missing_ok=True)
        self._written, self._known = set(), {}  # no reference to a large state outlives its stage
