"""CIFAR-10: find it, check it, download it, load it; and the helpers every data set's reader shares
(locating the data dir, reading a pickle safely, downloading with a checksum). ``kmjax.datasets``
reads the other data sets through ``load_dataset``; ``load_cifar10`` is its CIFAR-10 spelling.

This is the impure shell of kmjax (files, environment, network); it uses numpy only.

The data comes in the official "python version" layout: a folder ``cifar-10-batches-py/``
holding ``data_batch_1`` .. ``data_batch_5`` (10,000 training images each), ``test_batch``
(10,000 test images) and ``batches.meta``. Each batch is a pickled dict with ``data``
(uint8, shape (n, 3072): per image 1024 red, then 1024 green, then 1024 blue values, each
a row-major 32x32 plane) and ``labels`` (n ints in 0..9).

Throughout, the *data dir* is the folder that CONTAINS ``cifar-10-batches-py/``.

Trust: the batches are pickles, and a plain ``pickle.load`` runs whatever code a crafted file
names. kmjax never does that: its unpickler admits only the NumPy array constructors the official
files use and refuses any other file with a ``DataError`` before building anything from it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import NamedTuple, Sequence

import numpy as np

from kmjax.errors import DataError, InputError
from kmjax._checks import choice
from kmjax.safe_pickle import RefusedPickle, safe_loads

__all__ = ["ARCHIVE_MD5", "ARCHIVE_URL", "BATCHES_FOLDER", "CLASS_NAMES", "Cifar10", "DataError", "Dataset",
           "download_archive", "download_cifar10", "load_cifar10", "locate_data_dir", "resolve_data_dir"]

CLASS_NAMES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck")
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_FOLDER = "cifar-10-batches-py"
ENV_VAR = "KMJAX_DATA_DIR"
WHERE = "--data-dir DIR on the command line, data_dir= in Python"

_IMAGE_SHAPE_CHW = (3, 32, 32)
_PIXELS_PER_IMAGE = 3 * 32 * 32  # 3072
_NUM_TRAIN_BATCHES = 5
_SPLITS = ("train", "test")


class Dataset(NamedTuple):
    """One split of a data set (``load_dataset``, ``load_cifar10``).

    images: uint8 array (N, H, W, 3), height-width-channel, RGB, values 0..255 (CIFAR-10: 32 x 32).
    labels: int32 array (N,), class indices 0..C-1 (-1 where a split has no labels: STL-10's unlabeled).
    class_names: the C class names, indexed by label.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


Cifar10 = Dataset  # its first name, when CIFAR-10 was the only data set


# --------------------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------------------


def _cache_dir() -> pathlib.Path:
    # XDG says to ignore XDG_CACHE_HOME unless it is an absolute path.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "kmjax"


def locate_data_dir(data_dir=None, folder: str = BATCHES_FOLDER) -> tuple[pathlib.Path, str]:
    """(``resolve_data_dir(data_dir)``, where it came from: "argument", "env" or "cache").
    ``folder``: the data set's own folder inside the data dir (a path to it is taken as its parent)."""
    if data_dir is not None:
        path, source = pathlib.Path(data_dir).expanduser(), "argument"
    elif os.environ.get(ENV_VAR):  # an empty variable counts as unset
        path, source = pathlib.Path(os.environ[ENV_VAR]).expanduser(), "env"
    else:
        path, source = _cache_dir(), "cache"
    # Accept being pointed at the data set's folder itself: use the folder that contains it.
    if path.name == folder and not (path / folder).is_dir():
        path = path.parent
    return path, source


def resolve_data_dir(data_dir=None) -> pathlib.Path:
    """The folder that contains (or will contain) ``cifar-10-batches-py/``.

    Order: the ``data_dir`` argument, else the ``KMJAX_DATA_DIR`` environment variable,
    else the cache folder ``$XDG_CACHE_HOME/kmjax`` (default ``~/.cache/kmjax``).
    A path to the ``cifar-10-batches-py`` folder itself is accepted; its parent is returned.
    Nothing is created or checked here.
    """
    return locate_data_dir(data_dir)[0]


# --------------------------------------------------------------------------------------
# Reading and validating batch files
# --------------------------------------------------------------------------------------


def unpickle(path: pathlib.Path, fix: str, what: str = "CIFAR-10"):
    """Read a CIFAR pickle (``what``: the data set, for messages) without running code from it.

    The files are pickles, and a plain ``pickle.load`` calls whatever a crafted file names.
    ``kmjax.safe_pickle`` checks every opcode first and admits only NumPy's array constructors;
    anything else is a ``DataError`` naming the file, raised before any object of the file is built.
    """
    if not path.is_file():
        raise DataError(f"{what} file {path} is missing; {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:  # permissions, I/O errors: not the file's content
        raise DataError(f"could not read {what} file {path}: {e}") from e
    try:
        return safe_loads(data)
    except RefusedPickle as e:
        raise DataError(
            f"{what} file {path} {e}, which no {what} file does: refusing to load it (it may be crafted "
            f"to run code); {fix}"
        ) from None
    except Exception as e:  # a damaged pickle can raise almost anything
        raise DataError(
            f"{what} file {path} is truncated or corrupt ({type(e).__name__}: {e}); {fix}"
        ) from e


def get_key(d: dict, key: str, path: pathlib.Path, fix: str, what: str = "CIFAR-10"):
    """d[key], accepting both b"key" (official files read with encoding="bytes") and "key"."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    found = ", ".join(repr(k) for k in d) or "none"
    raise DataError(f"{what} file {path} has no {key!r} entry (keys found: {found}); {fix}")


def ints_in_range(value, lo: int, hi: int, dtype) -> np.ndarray | None:
    """``value`` as an array of ``dtype`` if it holds only whole numbers in lo..hi, else None."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError):  # e.g. ragged nested lists
        return None
    if a.size == 0:
        return a.astype(dtype)
    if a.dtype.kind not in "iuf":
        return None
    if a.dtype.kind == "f" and not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        return None
    if a.min() < lo or a.max() > hi:
        return None
    return a.astype(dtype)


def read_batch(path: pathlib.Path, fix: str, what: str = "CIFAR-10", label_key: str = "labels",
                n_classes: int = len(CLASS_NAMES)) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file of CIFAR-10 (or CIFAR-100: ``label_key`` "fine_labels", 100 classes):
    (data uint8 (n, 3072), labels int32 (n,))."""
    d = unpickle(path, fix, what)
    if not isinstance(d, dict):
        raise DataError(f"{what} file {path} holds a {type(d).__name__}, not a dict of data and labels; {fix}")
    raw_data = get_key(d, "data", path, fix, what)
    raw_labels = get_key(d, label_key, path, fix, what)

    data = ints_in_range(raw_data, 0, 255, np.uint8)
    if data is None:
        raise DataError(f"{what} file {path}: 'data' is not whole numbers in 0..255; {fix}")
    if data.ndim != 2 or data.shape[1] != _PIXELS_PER_IMAGE:
        raise DataError(f"{what} file {path}: 'data' has shape {data.shape}, expected (n, {_PIXELS_PER_IMAGE}); {fix}")
    n = data.shape[0]

    labels = ints_in_range(raw_labels, 0, n_classes - 1, np.int32)
    if labels is None or labels.ndim != 1:
        raise DataError(f"{what} file {path}: {label_key!r} is not a list of class indices in 0..{n_classes - 1}; "
                        f"{fix}")
    if len(labels) != n:
        raise DataError(f"{what} file {path} has {n} images but {len(labels)} labels; {fix}")
    return data, labels


def rows_to_images(data: np.ndarray) -> np.ndarray:
    """CIFAR rows (n, 3072: three row-major 32x32 planes R, G, B) as contiguous HWC images (n, 32, 32, 3)."""
    return np.ascontiguousarray(data.reshape((-1, *_IMAGE_SHAPE_CHW)).transpose(0, 2, 3, 1))


def _read_class_names(batches_dir: pathlib.Path, fix: str) -> tuple[str, ...]:
    """Class names from batches.meta when present, else CLASS_NAMES."""
    path = batches_dir / "batches.meta"
    if not path.exists():
        return CLASS_NAMES
    meta = unpickle(path, fix)
    if not isinstance(meta, dict) or not any(k in meta for k in (b"label_names", "label_names")):
        return CLASS_NAMES
    try:
        names = tuple(
            n.decode() if isinstance(n, bytes) else str(n) for n in get_key(meta, "label_names", path, fix)
        )
    except (TypeError, UnicodeDecodeError) as e:  # not a list, or names that are not UTF-8
        raise DataError(f"CIFAR-10 file {path} has unreadable class names ({e}); {fix}") from None
    if len(names) != len(CLASS_NAMES):
        raise DataError(
            f"CIFAR-10 file {path} lists {len(names)} class names, expected {len(CLASS_NAMES)}; {fix}"
        )
    return names


def _batch_files(split: str, batches: Sequence[int] | None) -> list[str]:
    choice(split, _SPLITS, "split")
    if split == "test":
        if batches is not None:
            raise InputError("batches selects training batches; it cannot be used with split='test'")
        return ["test_batch"]
    if batches is None:
        batches = range(1, _NUM_TRAIN_BATCHES + 1)
    batches = list(batches)
    valid = range(1, _NUM_TRAIN_BATCHES + 1)
    if not batches or any(
        isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b not in valid
        for b in batches
    ):
        raise InputError(f"batches must be a non-empty list of numbers 1..5, got {batches!r}")
    if len(set(batches)) != len(batches):
        raise InputError(f"batches must not repeat a batch, got {batches!r}")
    return [f"data_batch_{int(b)}" for b in batches]


def load_cifar10(data_dir=None, split: str = "train", *, download: bool = True, batches=None) -> Dataset:
    """Load one split of CIFAR-10 as numpy arrays: ``load_dataset("cifar10", split, data_dir, ...)``.

    data_dir: the folder containing ``cifar-10-batches-py/`` (or that folder itself); see
        ``resolve_data_dir`` for the default.
    split: "train" (data_batch_1..5, 50,000 images) or "test" (test_batch, 10,000 images).
    download: if the data is missing from the *cache* folder, download it there. A folder given
        explicitly (argument or KMJAX_DATA_DIR) is never downloaded into; missing data is an error.
    batches: train only; which training batches to load, e.g. [1] for data_batch_1 alone
        (10,000 images). Default: all five, in order.

    Returns Dataset(images uint8 (N, 32, 32, 3) in 0..255, labels int32 (N,), class_names).
    Raises InputError (a ValueError) for bad arguments and DataError for missing or damaged files.
    """
    if not isinstance(split, str):
        raise InputError(f"split must be a string such as 'train', got {split!r}")
    return read_cifar10(data_dir, split, download, batches=batches)  # what load_dataset("cifar10") reads


def require_folder(data_dir, folder: str, download: bool, fetch, call: str) -> pathlib.Path:
    """``<data dir>/<folder>``, downloaded into the cache first (``fetch(root)``) when it is missing
    there and ``download`` is true. A folder given explicitly is never downloaded into: missing data
    there is a ``DataError``. ``call``: the Python call that downloads it, up to its folder argument."""
    root, source = locate_data_dir(data_dir, folder)
    if not (root / folder).is_dir():
        if source == "cache" and download:
            fetch(root)
        elif source == "cache":
            raise DataError(
                f"cache folder {root} has no {folder}/ and download=False; "
                f"pass download=True, call {call}{str(root)!r}), "
                f"or pass the folder that contains {folder}/ ({WHERE})"
            )
        else:
            how = "--data-dir / data_dir=" if source == "argument" else ENV_VAR
            raise DataError(
                f"folder {root} (from {how}) has no {folder}/; pass the folder that contains it, "
                f"or set neither --data-dir nor {ENV_VAR} to download into the cache {_cache_dir()}, "
                f"or call {call}{str(root)!r})"
            )
    return root / folder


def read_cifar10(data_dir, split: str, download: bool, batches=None) -> Dataset:
    """The CIFAR-10 reader behind ``load_dataset("cifar10", ...)`` (see ``load_cifar10``)."""
    names = _batch_files(split, batches)  # check arguments before touching the disk
    batches_dir = require_folder(data_dir, BATCHES_FOLDER, download, lambda root: download_cifar10(root),
                                 "kmjax.download_cifar10(")
    fix = (
        f"delete {batches_dir} and download again (download_cifar10), "
        f"or re-extract it from cifar-10-python.tar.gz"
    )
    class_names = _read_class_names(batches_dir, fix)
    parts = [read_batch(batches_dir / name, fix) for name in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Dataset(images=rows_to_images(data), labels=labels, class_names=class_names)


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------


def _fetch(url: str, out, timeout: float = 60.0) -> str:
    """Stream ``url`` into the open binary file ``out`` with a progress line; return its MD5."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while chunk := response.read(1 << 20):
            out.write(chunk)
            md5.update(chunk)
            done += len(chunk)
            of_total = f" of {total / 1e6:.1f}" if total else ""
            print(f"\rdownloading {url}: {done / 1e6:.1f}{of_total} MB", end="", file=sys.stderr)
        print(file=sys.stderr)
    return md5.hexdigest()


def _check_members(tar: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    """Refuse any member that could write outside the target folder or is not a plain file/dir."""
    members = tar.getmembers()
    for m in members:
        parts = pathlib.PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in parts:
            raise DataError(f"archive {archive} has an unsafe path {m.name!r}; refusing to extract it")
        if not (m.isfile() or m.isdir()):
            raise DataError(
                f"archive {archive} has a link or special file {m.name!r}; refusing to extract it"
            )
    return members


def download_cifar10(dest_dir, *, url: str = ARCHIVE_URL, md5: str = ARCHIVE_MD5) -> pathlib.Path:
    """Download and extract CIFAR-10 into ``dest_dir``; return ``dest_dir`` (the data dir).

    Afterwards ``dest_dir/cifar-10-batches-py/`` exists. If it already exists nothing is done.
    The archive (~163 MB) goes to a temporary file in ``dest_dir``, its MD5 is checked before
    anything is extracted, and extraction happens in a temporary folder that is moved into
    place only when complete, so a failed run never leaves a folder that looks valid.
    ``url`` may be a file:// URL.
    """
    return download_archive(dest_dir, url=url, md5=md5, folder=BATCHES_FOLDER, what="CIFAR-10")


def _by_hand() -> str:
    return f"Download it by hand, extract it, and pass its folder ({WHERE}) or set {ENV_VAR}"


def make_dest(dest_dir, what: str) -> pathlib.Path:
    """``dest_dir`` as a path, created if needed (a ``DataError`` if it cannot be)."""
    dest = pathlib.Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"could not create folder {dest} for {what}: {e}") from e
    return dest


def fetch_checked(url: str, md5: str | None, out_path: pathlib.Path) -> None:
    """Download ``url`` into ``out_path`` and check its MD5; a ``DataError`` (naming both sums) if it
    cannot be fetched or does not match. The caller deletes ``out_path`` afterwards on failure."""
    try:
        with open(out_path, "wb") as out:
            actual = _fetch(url, out)
    except (urllib.error.URLError, OSError, ValueError) as e:
        # URLError covers HTTP errors and unreachable hosts; OSError covers timeouts and
        # disk errors; ValueError covers malformed URLs.
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download {url}: {reason}. {_by_hand()}") from e
    if md5 is not None and actual != md5.lower():
        raise DataError(f"download of {url} is damaged: MD5 {actual}, expected {md5}; try again. {_by_hand()}")


def download_archive(dest_dir, *, url: str, md5: str | None, folder: str, what: str) -> pathlib.Path:
    """Download the tar archive at ``url`` and extract its ``folder/`` into ``dest_dir`` (as
    ``download_cifar10`` does: nothing if the folder exists, the MD5 checked before anything is
    extracted, unsafe members refused, the folder moved into place only when complete)."""
    dest = pathlib.Path(dest_dir).expanduser()
    target = dest / folder
    if target.is_dir():
        return dest
    dest = make_dest(dest, what)
    by_hand = _by_hand()
    fd, archive_name = tempfile.mkstemp(dir=dest, prefix=f".{folder}-", suffix=".tar.gz.part")
    os.close(fd)
    archive = pathlib.Path(archive_name)
    try:
        fetch_checked(url, md5, archive)
        extract_dir = pathlib.Path(tempfile.mkdtemp(dir=dest, prefix=f".{folder}-extract-"))
        try:
            try:
                with tarfile.open(archive, "r:*") as tar:
                    members = _check_members(tar, url)
                    # Python >= 3.11.4 has extraction filters: a second line of defence.
                    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    tar.extractall(extract_dir, members=members, **kwargs)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise DataError(f"could not extract {url} into {dest}: {e}. {by_hand}") from e
            extracted = extract_dir / folder
            if not extracted.is_dir():
                raise DataError(f"archive {url} has no {folder}/ folder. {by_hand}")
            os.replace(extracted, target)  # atomic on one file system
        finally:
            shutil.rmtree(extract_dir, ignore_errors=True)
    finally:
        archive.unlink(missing_ok=True)
    return dest
