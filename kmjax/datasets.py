"""Every data set through one entry point: ``load_dataset(name, split, data_dir, download=, **options)``.

Each reader returns the same ``Dataset`` and checks what it reads: a missing, truncated or damaged file,
a label out of range, a class folder with no images or an unreadable image is a ``DataError`` naming
the file and what to do. Nothing in a data folder can run code: CIFAR's pickles go through
``kmjax.safe_pickle``, ``.npz`` files are read with ``allow_pickle=False``, SVHN's ``.mat`` files with
``scipy.io.loadmat`` (data only), STL-10's ``.bin`` files are raw bytes, images are decoded by Pillow.
Downloads go only into the cache, when asked, with the MD5 that torchvision's cifar.py, stl10.py and
svhn.py publish checked before anything is extracted or kept; ``download_dataset`` names the folder.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np

from kmjax._checks import choice, integer
from kmjax.data import (
    ENV_VAR, Dataset, DataError, InputError, ints_in_range, get_key, read_batch, unpickle, WHERE,
    download_archive, download_cifar10, fetch_checked, locate_data_dir, make_dest, read_cifar10,
    require_folder, rows_to_images,
)

__all__ = ["NAMES", "SOURCES", "Dataset", "download_dataset", "load_dataset"]

NAMES = ("cifar10", "cifar100", "stl10", "svhn", "folder", "npz")
_OPTIONS = {"cifar10": ("batches",), "cifar100": ("labels",), "stl10": ("fold",), "svhn": (),
            "folder": ("image_size",), "npz": ()}

# Where each archive or file comes from, and its MD5 (as in torchvision's cifar.py, stl10.py, svhn.py).
SOURCES = {
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb"),
    "svhn-train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "svhn-test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    "svhn-extra": ("http://ufldl.stanford.edu/housenumbers/extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
}
CIFAR100_FOLDER = "cifar-100-python"
STL10_FOLDER = "stl10_binary"
SVHN_FOLDER = "svhn"
STL10_CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE  # 27,648 bytes per image
_CHUNK = 512  # images transposed at a time (STL-10: 14 MB), so no second copy of a split is held


def load_dataset(name: str, split: str = "train", data_dir=None, *, download: bool = True, **options) -> Dataset:
    """Load one split of a data set as ``Dataset(images uint8 (N, H, W, 3), labels int32 (N,), class_names)``.

    name, its splits, where it is read from and its options (docs/datasets.md shows each):

    - ``"cifar10"``: "train", "test"; ``<data dir>/cifar-10-batches-py/``; ``batches=[1, ..]`` (train
      batches 1..5). The same as ``load_cifar10``.
    - ``"cifar100"``: "train", "test"; ``<data dir>/cifar-100-python/`` (``train``, ``test``, ``meta``);
      ``labels="fine"`` (100 classes, the default) or ``"coarse"`` (20 superclasses).
    - ``"stl10"``: "train" (5,000), "test" (8,000), "unlabeled" (100,000); ``<data dir>/stl10_binary/``;
      ``fold=0..9`` (train only) keeps the 1,000 images of that predefined fold (``fold_indices.txt``).
      Images are 96 x 96. The unlabeled split's labels are all -1 (its class_names are the usual 10);
      it needs 2.8 GB, read in chunks straight into the result (one copy, never two).
    - ``"svhn"``: "train", "test", "extra"; ``<data dir>/svhn/{split}_32x32.mat`` (or those files in
      ``data_dir`` itself); needs SciPy (``pip install 'kmjax[svhn]'``). Digit 0 (label 10 in the
      files) is label 0; class_names "0".."9".
    - ``"folder"``: ``data_dir/<split>/<class>/**/*.png|jpg|jpeg|bmp|gif|webp`` (any split name). Classes:
      the class folders sorted by name, as torchvision's ``ImageFolder`` (names starting with "." are
      skipped). Grayscale, palette, CMYK and RGBA become RGB (alpha dropped). All images must have one
      size unless ``image_size=(H, W)`` is given: then any other size is resized to it with Pillow's
      bicubic filter (``Image.BICUBIC``). Labels index each split's own sorted list of classes.
    - ``"npz"``: "train", "test"; ``data_dir`` is a ``.npz`` file of ``x_train``, ``y_train``, ``x_test``,
      ``y_test`` (Keras' convention), optionally ``class_names``. ``x``: uint8 (N, H, W, 3), or grayscale
      (N, H, W) / (N, H, W, 1) made 3 equal channels; ``y``: 0..C-1, C = len(class_names), else the
      largest label of both splits + 1 (names "0".."C-1"). Read with ``allow_pickle=False``.

    data_dir: for the four named sets, the folder that contains their folder (default: as
        ``kmjax.data.resolve_data_dir``: the ``KMJAX_DATA_DIR`` variable, else the cache).
    download: download a named set into the *cache* folder when it is missing there (checksum
        verified before extraction). A folder given explicitly is never downloaded into.

    Raises InputError for bad arguments (unknown name, split or option) and DataError for missing
    or damaged data, naming the file and how to fix it.
    """
    choice(name, NAMES, "data set")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        takes = ", ".join(_OPTIONS[name]) or "none"
        raise InputError(f"data set {name!r} takes no option {', '.join(unknown)} (its options: {takes})")
    if not isinstance(split, str):
        raise InputError(f"split must be a string such as 'train', got {split!r}")
    readers = {"cifar10": read_cifar10, "cifar100": _read_cifar100, "stl10": _read_stl10, "svhn": _read_svhn,
               "folder": _read_folder, "npz": _read_npz}
    return readers[name](data_dir, split, download, **options)


def download_dataset(name: str, dest_dir, *, split: str = "train", url: str | None = None,
                     md5: str | None = None) -> pathlib.Path:
    """Download ``name`` into the data dir ``dest_dir`` (nothing if already there); return ``dest_dir``.

    cifar10, cifar100 and stl10 are archives, extracted into their folder once their MD5 matches;
    svhn is one ``.mat`` file per split (``split``), kept in ``dest_dir/svhn/`` once its MD5 matches.
    ``url`` and ``md5`` replace the published ones (``url`` may be a file:// URL).
    """
    choice(name, NAMES[:4], "data set to download", " (folder and npz data sets are your own files)")
    if name == "cifar10":
        return download_cifar10(dest_dir, **{k: v for k, v in (("url", url), ("md5", md5)) if v is not None})
    if name in ("cifar100", "stl10"):
        folder, what = (CIFAR100_FOLDER, "CIFAR-100") if name == "cifar100" else (STL10_FOLDER, "STL-10")
        return download_archive(dest_dir, url=url or SOURCES[name][0], md5=md5 or SOURCES[name][1], folder=folder,
                                what=what)
    choice(split, ("train", "test", "extra"), "split")
    dest = pathlib.Path(dest_dir).expanduser()
    target = dest / SVHN_FOLDER / f"{split}_32x32.mat"
    if target.is_file():
        return dest
    folder = make_dest(dest / SVHN_FOLDER, "SVHN")
    fd, part = tempfile.mkstemp(dir=folder, prefix=f".{split}_32x32-", suffix=".mat.part")
    os.close(fd)
    try:
        fetch_checked(url or SOURCES[f"svhn-{split}"][0], md5 or SOURCES[f"svhn-{split}"][1], pathlib.Path(part))
        os.replace(part, target)  # only a file whose checksum matched gets the real name
    finally:
        pathlib.Path(part).unlink(missing_ok=True)
    return dest


# CIFAR-100 ----------------------------------------------------------------------------------------

def _read_cifar100(data_dir, split: str, download: bool, labels: str = "fine") -> Dataset:
    choice(split, ("train", "test"), "split")
    choice(labels, ("fine", "coarse"), "labels", " (CIFAR-100's 100 classes or its 20 superclasses)")
    folder = require_folder(data_dir, CIFAR100_FOLDER, download, lambda root: download_dataset("cifar100", root),
                            "kmjax.datasets.download_dataset('cifar100', ")
    fix = f"delete {folder} and download again, or re-extract it from cifar-100-python.tar.gz"
    n_classes = 100 if labels == "fine" else 20
    meta_path = folder / "meta"
    meta = unpickle(meta_path, fix, "CIFAR-100")
    if not isinstance(meta, dict):
        raise DataError(f"CIFAR-100 file {meta_path} holds a {type(meta).__name__}, not a dict; {fix}")
    raw = get_key(meta, f"{labels}_label_names", meta_path, fix, "CIFAR-100")
    try:
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
    except (TypeError, UnicodeDecodeError) as e:
        raise DataError(f"CIFAR-100 file {meta_path} has unreadable class names ({e}); {fix}") from None
    if len(names) != n_classes:
        raise DataError(f"CIFAR-100 file {meta_path} lists {len(names)} {labels} class names, expected {n_classes}; "
                        f"{fix}")
    data, y = read_batch(folder / split, fix, "CIFAR-100", f"{labels}_labels", n_classes)
    return Dataset(images=rows_to_images(data), labels=y, class_names=names)


# STL-10 -------------------------------------------------------------------------------------------

def _read_stl10(data_dir, split: str, download: bool, fold=None) -> Dataset:
    choice(split, ("train", "test", "unlabeled"), "split")
    if fold is not None:
        if split != "train":
            raise InputError(f"fold selects one of the 10 predefined training folds; it cannot be used with "
                             f"split={split!r}")
        fold = integer(fold, "fold", 0, 9)
    folder = require_folder(data_dir, STL10_FOLDER, download, lambda root: download_dataset("stl10", root),
                            "kmjax.datasets.download_dataset('stl10', ")
    fix = f"delete {folder} and download again, or re-extract it from stl10_binary.tar.gz"
    names = _stl_class_names(folder / "class_names.txt", fix)
    if split == "unlabeled":
        images = _read_stl_images(folder / "unlabeled_X.bin", None, fix)
        return Dataset(images=images, labels=np.full(len(images), -1, np.int32), class_names=names)
    labels = _read_stl_labels(folder / f"{split}_y.bin", fix)
    images = _read_stl_images(folder / f"{split}_X.bin", len(labels), fix)
    if fold is not None:
        keep = _read_fold(folder / "fold_indices.txt", fold, len(labels), fix)
        images, labels = images[keep], labels[keep]
    return Dataset(images=images, labels=labels, class_names=names)


def _need_file(path: pathlib.Path, fix: str) -> None:
    if not path.is_file():
        raise DataError(f"STL-10 file {path} is missing; {fix}")


def _stl_class_names(path: pathlib.Path, fix: str) -> tuple[str, ...]:
    """The 10 names of class_names.txt (one a line), or the published ones when the file is absent."""
    if not path.exists():
        return STL10_CLASS_NAMES
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"could not read STL-10 file {path} ({e}); {fix}") from None
    if len(names) != 10:
        raise DataError(f"STL-10 file {path} lists {len(names)} class names, expected 10 (one a line); {fix}")
    return names


def _read_stl_labels(path: pathlib.Path, fix: str) -> np.ndarray:
    """The uint8 labels 1..10 of an STL-10 ``*_y.bin`` file, as int32 0..9."""
    _need_file(path, fix)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        raise DataError(f"STL-10 file {path} is empty; {fix}")
    bad = np.flatnonzero((raw < 1) | (raw > 10))
    if bad.size:
        raise DataError(f"STL-10 file {path} has {bad.size} labels outside 1..10 (the first: {int(raw[bad[0]])} at "
                        f"position {int(bad[0])}); {fix}")
    return raw.astype(np.int32) - 1


def _read_stl_images(path: pathlib.Path, n: int | None, fix: str) -> np.ndarray:
    """An STL-10 ``*_X.bin`` file as (N, 96, 96, 3) uint8.

    Each image is 3 planes (R, G, B) of 96 x 96 bytes stored column by column, i.e. an array
    (3, 96 cols, 96 rows) in C order: transposed with axes (0, 3, 2, 1) per image. The file is read
    ``_CHUNK`` images at a time straight into the preallocated result, so the peak memory is the
    result plus one chunk (the 2.8 GB unlabeled split never exists twice).
    """
    _need_file(path, fix)
    size = path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise DataError(f"STL-10 file {path} is truncated or corrupt: {size} bytes is not a whole number of "
                        f"96 x 96 x 3 images ({_STL_BYTES} bytes each); {fix}")
    count = size // _STL_BYTES
    if n is not None and count != n:
        raise DataError(f"STL-10 file {path} holds {count} images but its labels file {n} labels; {fix}")
    out = np.empty((count, _STL_SIDE, _STL_SIDE, 3), np.uint8)
    buf = np.empty((min(_CHUNK, count), 3, _STL_SIDE, _STL_SIDE), np.uint8)  # reused for every chunk
    with open(path, "rb") as f:
        for start in range(0, count, _CHUNK):
            k = min(_CHUNK, count - start)
            got = f.readinto(memoryview(buf[:k]).cast("B"))
            if got != k * _STL_BYTES:  # the file shrank while being read
                raise DataError(f"STL-10 file {path} ended early at image {start + got // _STL_BYTES}; {fix}")
            out[start:start + k] = buf[:k].transpose(0, 3, 2, 1)
    return out


def _read_fold(path: pathlib.Path, fold: int, n: int, fix: str) -> np.ndarray:
    """Line ``fold`` of fold_indices.txt (10 lines of space-separated 0-based indices into train)."""
    _need_file(path, fix)
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if len(lines) != 10:
        raise DataError(f"STL-10 file {path} has {len(lines)} folds, expected 10 lines of indices; {fix}")
    try:
        keep = np.array([int(t) for t in lines[fold].split()], dtype=np.int64)
    except ValueError:
        raise DataError(f"STL-10 file {path}: line {fold + 1} (fold {fold}) is not whole numbers; {fix}") from None
    if keep.min() < 0 or keep.max() >= n:
        raise DataError(f"STL-10 file {path}: fold {fold} has indices outside 0..{n - 1} (the {n} training "
                        f"images); {fix}")
    if len(np.unique(keep)) != len(keep):
        raise DataError(f"STL-10 file {path}: fold {fold} repeats an index; {fix}")
    return keep


# SVHN ---------------------------------------------------------------------------------------------

def _read_svhn(data_dir, split: str, download: bool) -> Dataset:
    choice(split, ("train", "test", "extra"), "split")
    try:
        import scipy.io
    except ImportError:
        raise DataError("reading SVHN's .mat files needs SciPy, an optional dependency: "
                        "pip install 'kmjax[svhn]' (or pip install scipy)") from None
    name = f"{split}_32x32.mat"
    root, source = locate_data_dir(data_dir, SVHN_FOLDER)
    path = next((p for p in (root / SVHN_FOLDER / name, root / name) if p.is_file()), None)
    if path is None:
        call = f"kmjax.datasets.download_dataset('svhn', {str(root)!r}, split={split!r})"
        if source == "cache" and download:
            download_dataset("svhn", root, split=split)
            path = root / SVHN_FOLDER / name
        elif source == "cache":
            raise DataError(f"cache folder {root} has no {SVHN_FOLDER}/{name} and download=False; pass download=True, "
                            f"call {call}, or pass the folder that holds it ({WHERE})")
        else:
            raise DataError(f"folder {root} has no {SVHN_FOLDER}/{name} (nor {name}); put the official file there, "
                            f"or set neither --data-dir nor {ENV_VAR} to download into the cache, or call {call}")
    fix = f"delete {path} and download it again ({SOURCES['svhn-' + split][0]})"
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # a damaged .mat can raise almost anything
        raise DataError(f"SVHN file {path} is truncated or corrupt ({type(e).__name__}: {e}); {fix}") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"SVHN file {path} has no {'X' if 'X' not in mat else 'y'} variable; {fix}")
    x, y = mat.pop("X"), mat.pop("y")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"SVHN file {path}: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N); {fix}")
    labels = ints_in_range(y, 1, 10, np.int32)
    if labels is None or labels.size != x.shape[3]:
        raise DataError(f"SVHN file {path}: y must hold one digit label in 1..10 per image ({x.shape[3]} images), "
                        f"got {y.dtype} {y.shape}; {fix}")
    labels = labels.reshape(-1) % 10  # 10 is the digit 0
    return Dataset(images=_hwcn_to_nhwc(x), labels=labels, class_names=tuple(str(d) for d in range(10)))


def _hwcn_to_nhwc(x: np.ndarray) -> np.ndarray:
    """(H, W, C, N) -> C-contiguous (N, H, W, C), in place when ``x`` is Fortran-ordered (as loadmat
    returns it: each image is one block of memory already), a chunk of images at a time."""
    h, w, c, n = x.shape
    if not (x.flags.f_contiguous and x.flags.writeable):
        return np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    flat, per = x.ravel(order="F"), h * w * c  # a view: image i is flat[i * per:(i + 1) * per]
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        block = flat[start * per:stop * per]
        block[:] = block.reshape(stop - start, c, w, h).transpose(0, 3, 2, 1).ravel()  # ravel copies first
    return flat.reshape(n, h, w, c)


# A folder of images -------------------------------------------------------------------------------

def _image_size(value) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(f"image_size must be (height, width), got {value!r}")
    return integer(value[0], "image_size height", 1), integer(value[1], "image_size width", 1)


def _read_folder(data_dir, split: str, download: bool, image_size=None) -> Dataset:
    from PIL import Image  # Pillow comes with matplotlib
    size = None if image_size is None else _image_size(image_size)
    if split in ("", ".", "..") or "/" in split or os.sep in split:
        raise InputError(f"split must be the name of a folder inside data_dir, got {split!r}")
    if data_dir is None:
        raise InputError("the folder data set needs data_dir=, the folder that holds its split folders "
                         "(data_dir/<split>/<class>/<image>)")
    root = pathlib.Path(data_dir).expanduser() / split
    if not root.is_dir():
        found = sorted(p.name for p in root.parent.iterdir() if p.is_dir()) if root.parent.is_dir() else []
        raise DataError(f"no split folder {root} (split folders in {root.parent}: {', '.join(found) or 'none'}); "
                        f"lay the images out as data_dir/<split>/<class>/<image>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"split folder {root} has no class folders; put each class's images in "
                        f"{root}/<class name>/")
    files, labels = [], []
    for i, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"class folder {root / name} has no images ({', '.join(IMAGE_SUFFIXES)}); add some, "
                            f"or remove the folder")
        files += found
        labels += [i] * len(found)
    out = None
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    raise DataError(f"image {path} has {im.mode!r} pixels (16-bit or float); save it as 8-bit")
                rgb = im.convert("RGB") if im.mode != "RGB" else im
                if size is not None and rgb.size != (size[1], size[0]):
                    rgb = rgb.resize((size[1], size[0]), Image.BICUBIC)
                pixels = np.asarray(rgb, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"could not read image {path} ({type(e).__name__}: {e}); replace or delete it") from None
        if out is None:
            out = np.empty((len(files), *pixels.shape), np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DataError(f"images differ in size: {files[0]} is {out.shape[1]} x {out.shape[2]} (H x W), {path} is "
                            f"{pixels.shape[0]} x {pixels.shape[1]}; pass image_size=(H, W) to resize every image "
                            f"(bicubic), or resize them yourself")
        out[i] = pixels
    return Dataset(images=out, labels=np.asarray(labels, np.int32), class_names=tuple(classes))


# One .npz file (Keras' convention) ----------------------------------------------------------------

def _read_npz(data_dir, split: str, download: bool) -> Dataset:
    choice(split, ("train", "test"), "split")
    if data_dir is None:
        raise InputError("the npz data set needs data_dir=, the .npz file holding x_train, y_train, x_test, y_test")
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist (data_dir names the .npz file itself)")
    fix = "write it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            need = [k for k in (f"x_{split}", "y_train", "y_test") if k not in keys]
            if need:
                held = ", ".join(sorted(keys)) or "nothing"
                raise DataError(f"npz file {path} has no {', '.join(need)} (it holds: {held}); {fix}")
            x, y, ys = z[f"x_{split}"], z[f"y_{split}"], [z["y_train"], z["y_test"]]
            names = z["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(f"npz file {path} holds object arrays (pickles), which kmjax never loads: store numbers "
                            f"and strings only; {fix}") from None
        raise DataError(f"npz file {path} is truncated or corrupt ({e}); {fix}") from None
    except Exception as e:  # not a zip, a damaged member, ...
        raise DataError(f"npz file {path} is truncated or corrupt ({type(e).__name__}: {e}); {fix}") from None
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 3:  # grayscale: three equal channels
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        hint = " (channels first? transpose to (N, H, W, 3))" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise DataError(f"npz file {path}: x_{split} has shape {x.shape}, expected (N, H, W, 3) or grayscale "
                        f"(N, H, W){hint}")
    images = x if x.dtype == np.uint8 else ints_in_range(x, 0, 255, np.uint8)
    if images is None:
        raise DataError(f"npz file {path}: x_{split} ({x.dtype}) is not whole numbers in 0..255; store uint8 pixels")
    if names is not None:
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise DataError(f"npz file {path}: class_names must be a 1-D array of strings, "
                            f"got {names.dtype} {names.shape}")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    else:
        top = max((int(v.max()) for v in ys if v.size and v.dtype.kind in "iuf" and np.all(np.isfinite(v))), default=0)
        names = tuple(str(c) for c in range(top + 1))
    labels = ints_in_range(y.reshape(-1) if y.ndim == 2 and y.shape[1:] == (1,) else y, 0, len(names) - 1, np.int32)
    if labels is None or labels.ndim != 1:
        raise DataError(f"npz file {path}: y_{split} ({y.dtype} {y.shape}) is not one class index in "
                        f"0..{len(names) - 1} per image; {fix}")
    if len(labels) != len(images):
        raise DataError(f"npz file {path} has {len(images)} images in x_{split} but {len(labels)} labels in y_{split}")
    return Dataset(images=images, labels=labels, class_names=names)
