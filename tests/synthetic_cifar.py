"""Synthetic CIFAR-10 folders in the official layout (Python-2 style pickles), for the tests of
the loader and of the runner: no test that uses them needs the real data set."""

from __future__ import annotations

import pathlib
import pickle
import struct

import numpy as np

from kmjax.data import CLASS_NAMES

N = 7  # images per synthetic batch

# a run of the shipped "quick" config small enough for the runner's tests, on make_cifar(n=40)
# (the ``small_cifar`` fixture of conftest.py)
SMALL = ["data.train_batches=[1,2]", "data.n_train=0", "data.n_test=0", "patches.num=2000", "kmeans.k=8",
         "kmeans.max_iter=3", "classifier.max_iter=10", "features.grid=2"]
BATCHES = "cifar-10-batches-py"


class _Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as the official files do.

    Loading such a pickle with encoding="bytes" gives bytes keys (b"data"), exactly like the
    real cifar-10-python.tar.gz batches.
    """

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def _images(seed: int, n: int = N) -> np.ndarray:
    """Random uint8 images (n, 32, 32, 3): every pixel/channel distinctive."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> CIFAR rows (n, 3072), written out plane by plane and row by row
    (1024 R, 1024 G, 1024 B; each plane row-major), independently of the loader's reshape."""
    rows = np.zeros((len(images), 3072), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            start = c * 1024 + h * 32
            rows[:, start : start + 32] = images[:, h, :, c]
    return rows


def _dump(path: pathlib.Path, obj, bytes_keys: bool) -> None:
    with open(path, "wb") as f:
        if bytes_keys:
            _Py2StylePickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f)


def _batch_dict(images, labels, bytes_keys: bool, **overrides) -> dict:
    d = {"data": _rows(images), "labels": [int(x) for x in labels], "batch_label": "synthetic"}
    d.update(overrides)
    if bytes_keys:
        d = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in d.items()}
    return d


def make_cifar(root: pathlib.Path, bytes_keys: bool = True, names=None, meta: bool = True, n: int = N,
               seed: int = 0):
    """Write a synthetic cifar-10-batches-py into root (``n`` images per batch); return
    {file name: (images, labels)}."""
    folder = root / BATCHES
    folder.mkdir(parents=True)
    content = {}
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        images = _images(seed=seed + i, n=n)
        labels = np.random.default_rng(seed + 100 + i).integers(0, 10, size=n)
        _dump(folder / name, _batch_dict(images, labels, bytes_keys), bytes_keys)
        content[name] = (images, labels)
    if meta:
        names = list(names or CLASS_NAMES)
        m = {"label_names": names, "num_cases_per_batch": n, "num_vis": 3072}
        if bytes_keys:
            m = {b"label_names": [c.encode() for c in names], b"num_cases_per_batch": n, b"num_vis": 3072}
        _dump(folder / "batches.meta", m, bytes_keys)
    return content
