"""Tests for kmjax.datasets (``load_dataset``): each reader against files the test writes in the data
set's official format (byte layouts, label offsets, folds), the damaged and truncated cases, and the
checked downloads. No real data set is needed (none but CIFAR-10 was available to check against)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest

import kmjax
from kmjax import datasets
from kmjax.data import Cifar10, Dataset, load_cifar10
from kmjax.datasets import load_dataset
from kmjax.errors import DataError, InputError

from synthetic_cifar import _dump, _rows, make_cifar


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the caller's KMJAX_DATA_DIR or real cache."""
    monkeypatch.delenv("KMJAX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


CACHE = "xdg-cache/kmjax"


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tarball(path: pathlib.Path, src: pathlib.Path, folder: str) -> tuple[str, str]:
    """A .tar.gz holding ``src`` as ``folder/``: (file:// URL, MD5)."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=folder)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


class _RunsCode:
    """Unpickling this calls ``os.system``: the classic crafted pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def test_exports_and_the_old_name():
    assert kmjax.load_dataset is load_dataset and kmjax.Dataset is Dataset
    assert Cifar10 is Dataset and kmjax.Cifar10 is Dataset


def test_cifar10_through_load_dataset_is_load_cifar10(tmp_path):
    content = make_cifar(tmp_path)
    a = load_dataset("cifar10", "train", tmp_path, batches=[2])
    b = load_cifar10(tmp_path, "train", batches=[2])
    assert isinstance(a, Dataset)
    np.testing.assert_array_equal(a.images, content["data_batch_2"][0])
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("call,match", [
    (lambda: load_dataset("mnist"), "unknown data set 'mnist'"),
    (lambda: load_dataset("cifar100", labels="fine", fold=1), "takes no option fold"),
    (lambda: load_dataset("svhn", "validation"), "unknown split 'validation'"),
    (lambda: load_dataset("stl10", "test", fold=1), "cannot be used with split='test'"),
    (lambda: load_dataset("stl10", fold=10), r"fold must be an integer in \[0, 9\]"),
    (lambda: load_dataset("cifar100", labels="medium"), "unknown labels 'medium'"),
    (lambda: load_dataset("folder", "train"), "needs data_dir="),
    (lambda: load_dataset("npz", "train"), "needs data_dir="),
    (lambda: load_dataset("folder", "../up", "/tmp"), "name of a folder"),
    (lambda: load_dataset("folder", "train", "/tmp", image_size=(0, 4)), "image_size height"),
    (lambda: datasets.download_dataset("folder", "/tmp"), "your own files"),
])
def test_bad_arguments_are_input_errors(call, match):
    with pytest.raises(InputError, match=match):
        call()


# --------------------------------------------------------------------------------------
# CIFAR-100: the official cifar-100-python/ pickles (Python-2 style, bytes keys)
# --------------------------------------------------------------------------------------

FINE = [f"fine{i}" for i in range(100)]
COARSE = [f"coarse{i}" for i in range(20)]


def make_cifar100(root: pathlib.Path, n=9):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    content = {}
    for seed, split in enumerate(["train", "test"]):
        images = _rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = _rng(seed + 10).integers(0, 100, n)
        coarse = _rng(seed + 20).integers(0, 20, n)
        _dump(folder / split, {b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1",
                               b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
                               b"data": _rows(images)}, bytes_keys=False)
        content[split] = images, fine, coarse
    _dump(folder / "meta", {b"fine_label_names": [s.encode() for s in FINE],
                            b"coarse_label_names": [s.encode() for s in COARSE]}, bytes_keys=False)
    return content


def test_cifar100_fine_and_coarse(tmp_path):
    content = make_cifar100(tmp_path)
    for split in ("train", "test"):
        images, fine, coarse = content[split]
        ds = load_dataset("cifar100", split, tmp_path)
        assert ds.images.dtype == np.uint8 and ds.images.shape == (9, 32, 32, 3)
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, fine)
        assert ds.labels.dtype == np.int32 and ds.class_names == tuple(FINE)
        ds = load_dataset("cifar100", split, tmp_path / "cifar-100-python", labels="coarse")  # the folder itself
        np.testing.assert_array_equal(ds.labels, coarse)
        assert ds.class_names == tuple(COARSE)


def test_cifar100_bad_files(tmp_path):
    make_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    raw = (folder / "test").read_bytes()
    (folder / "test").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"CIFAR-100 file .*test is truncated or corrupt.*download again"):
        load_dataset("cifar100", "test", tmp_path)
    d = {b"fine_labels": [100] * 3, b"coarse_labels": [0] * 3, b"data": np.zeros((3, 3072), np.uint8)}
    _dump(folder / "train", d, bytes_keys=False)
    with pytest.raises(DataError, match=r"'fine_labels' is not a list of class indices in 0..99"):
        load_dataset("cifar100", "train", tmp_path)
    load_dataset("cifar100", "train", tmp_path, labels="coarse")  # the coarse labels are fine
    _dump(folder / "meta", {b"fine_label_names": [b"a"], b"coarse_label_names": [s.encode() for s in COARSE]}, False)
    with pytest.raises(DataError, match="lists 1 fine class names, expected 100"):
        load_dataset("cifar100", "train", tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(DataError, match="meta is missing"):
        load_dataset("cifar100", "train", tmp_path)


def test_cifar100_crafted_pickle_runs_nothing(tmp_path):
    make_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": _RunsCode(marker)}))
    with pytest.raises(DataError, match="refusing to load it"):
        load_dataset("cifar100", "test", tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# STL-10: stl10_binary/, images column-major, labels 1..10, fold_indices.txt
# --------------------------------------------------------------------------------------


def _stl_bytes(images: np.ndarray) -> bytes:
    """HWC images as STL-10 writes them, spelled out byte by byte: per image, channel planes R, G, B,
    each column by column (byte c*9216 + col*96 + row holds pixel (row, col) of channel c)."""
    n = len(images)
    raw = np.zeros(n * 27648, np.uint8)
    for c in range(3):
        for col in range(96):
            for i in range(n):
                start = i * 27648 + c * 9216 + col * 96
                raw[start:start + 96] = images[i, :, col, c]
    return raw.tobytes()


def make_stl10(root: pathlib.Path, n_train=12, n_test=5, n_unlabeled=4):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    content = {}
    for seed, (split, n) in enumerate([("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)]):
        images = _rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(images))
        if split != "unlabeled":
            labels = _rng(seed + 5).integers(1, 11, n).astype(np.uint8)
            labels[0], labels[-1] = 1, 10  # both ends of the range
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        content[split] = images, (labels if split != "unlabeled" else None)
    (folder / "class_names.txt").write_text("\n".join(f"stl{i}" for i in range(10)) + "\n")
    folds = [" ".join(str((f + 3 * j) % n_train) for j in range(3)) + " " for f in range(10)]  # trailing space
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    return content


def test_stl10_a_known_pixel(tmp_path):
    # one image, all zero but pixel (row 5, col 17) of the blue channel: byte 2*9216 + 17*96 + 5
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    raw = bytearray(27648)
    raw[2 * 9216 + 17 * 96 + 5] = 200
    raw[0 * 9216 + 0 * 96 + 1] = 7  # red, row 1, col 0
    (folder / "test_X.bin").write_bytes(bytes(raw))
    (folder / "test_y.bin").write_bytes(bytes([10]))
    ds = load_dataset("stl10", "test", tmp_path)
    assert ds.images.shape == (1, 96, 96, 3) and ds.images.flags["C_CONTIGUOUS"]
    assert ds.images[0, 5, 17, 2] == 200 and ds.images[0, 1, 0, 0] == 7 and int(ds.images.sum()) == 207
    assert ds.labels.tolist() == [9]  # label 10 is class index 9
    assert ds.class_names == datasets.STL10_CLASS_NAMES  # no class_names.txt: the published names


def test_stl10_splits_labels_and_folds(tmp_path):
    content = make_stl10(tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("stl10", split, tmp_path)
        np.testing.assert_array_equal(ds.images, content[split][0])
        np.testing.assert_array_equal(ds.labels, content[split][1].astype(np.int32) - 1)
        assert ds.labels.dtype == np.int32 and ds.labels.min() == 0 and ds.labels.max() == 9
        assert ds.class_names == tuple(f"stl{i}" for i in range(10))
    un = load_dataset("stl10", "unlabeled", tmp_path)
    np.testing.assert_array_equal(un.images, content["unlabeled"][0])
    assert un.labels.dtype == np.int32 and un.labels.tolist() == [-1] * 4
    fold = load_dataset("stl10", "train", tmp_path, fold=2)
    keep = [2, 5, 8]  # line 3 of fold_indices.txt
    np.testing.assert_array_equal(fold.images, content["train"][0][keep])
    np.testing.assert_array_equal(fold.labels, content["train"][1][keep].astype(np.int32) - 1)


def test_stl10_read_in_chunks(tmp_path, monkeypatch):
    content = make_stl10(tmp_path, n_train=7)
    monkeypatch.setattr(datasets, "_CHUNK", 3)  # 3 + 3 + 1
    np.testing.assert_array_equal(load_dataset("stl10", "train", tmp_path).images, content["train"][0])


def test_stl10_unlabeled_holds_one_copy(tmp_path, monkeypatch):
    # The reader allocates the result and one chunk, never a second copy of the split.
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    n = 400  # 11 MB
    (folder / "unlabeled_X.bin").write_bytes(_rng().integers(0, 256, n * 27648, dtype=np.uint8).tobytes())
    monkeypatch.setattr(datasets, "_CHUNK", 32)
    tracemalloc.start()
    try:
        ds = load_dataset("stl10", "unlabeled", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ds.images.shape == (n, 96, 96, 3)
    assert peak < ds.images.nbytes + 32 * 27648 + (1 << 20), (peak, ds.images.nbytes)  # the result and one chunk


@pytest.mark.parametrize("damage,match", [
    (lambda f: (f / "train_X.bin").write_bytes((f / "train_X.bin").read_bytes()[:-1]),
     "train_X.bin is truncated or corrupt: .* not a whole number of 96 x 96 x 3 images"),
    (lambda f: (f / "train_X.bin").write_bytes(b""), "train_X.bin is truncated or corrupt"),
    (lambda f: (f / "train_y.bin").write_bytes(bytes([1] * 11)), "train_X.bin holds 12 images but its labels file 11"),
    (lambda f: (f / "train_y.bin").write_bytes(bytes([1] * 11 + [11])),
     r"labels outside 1..10 \(the first: 11 at position 11"),
    (lambda f: (f / "train_y.bin").write_bytes(bytes([0] + [1] * 11)), r"the first: 0 at position 0"),
    (lambda f: (f / "train_y.bin").unlink(), "train_y.bin is missing"),
    (lambda f: (f / "class_names.txt").write_text("a\nb\n"), "lists 2 class names, expected 10"),
])
def test_stl10_bad_files(tmp_path, damage, match):
    make_stl10(tmp_path)
    damage(tmp_path / "stl10_binary")
    with pytest.raises(DataError, match=match + ".*stl10_binary.tar.gz"):
        load_dataset("stl10", "train", tmp_path)


@pytest.mark.parametrize("text,match", [
    ("0 1 2\n" * 9, "has 9 folds, expected 10"),
    ("0 1 2\n" * 9 + "0 1 12\n", r"fold 9 has indices outside 0..11"),
    ("0 1 2\n" * 9 + "0 1 1\n", "fold 9 repeats an index"),
    ("0 1 2\n" * 9 + "0 x 2\n", r"line 10 \(fold 9\) is not whole numbers"),
])
def test_stl10_bad_folds(tmp_path, text, match):
    make_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "fold_indices.txt").write_text(text)
    load_dataset("stl10", "train", tmp_path)  # folds are read only when asked for
    with pytest.raises(DataError, match=match):
        load_dataset("stl10", "train", tmp_path, fold=9)


# --------------------------------------------------------------------------------------
# SVHN: {train,test,extra}_32x32.mat, X (32, 32, 3, N), y (N, 1) with 10 for the digit 0
# --------------------------------------------------------------------------------------

scipy_io = pytest.importorskip("scipy.io")


def make_svhn(folder: pathlib.Path, split="train", n=6, y=None):
    folder.mkdir(parents=True, exist_ok=True)
    x = _rng(3).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10], [5]], np.uint8)[:n] if y is None else y
    scipy_io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y


def test_svhn_layout_and_labels(tmp_path):
    x, _ = make_svhn(tmp_path / "svhn", "test")
    ds = load_dataset("svhn", "test", tmp_path)
    assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8 and ds.images.flags["C_CONTIGUOUS"]
    for i in range(6):
        np.testing.assert_array_equal(ds.images[i], x[:, :, :, i])
    assert ds.images[4, 7, 20, 1] == x[7, 20, 1, 4]  # (row, col, channel) of image 4
    assert ds.labels.tolist() == [0, 1, 2, 9, 0, 5] and ds.labels.dtype == np.int32
    assert ds.class_names == tuple("0123456789")
    # torchvision's layout: the .mat files in the folder itself
    make_svhn(tmp_path / "flat", "extra")
    assert load_dataset("svhn", "extra", tmp_path / "flat").labels.tolist() == [0, 1, 2, 9, 0, 5]


@pytest.mark.parametrize("order", ["F", "C"])
def test_svhn_transpose_in_place(order):
    x = _rng().integers(0, 256, (4, 5, 3, 7), dtype=np.uint8)
    want = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    src = np.asfortranarray(x) if order == "F" else np.ascontiguousarray(x)
    got = datasets._hwcn_to_nhwc(src)
    np.testing.assert_array_equal(got, want)
    assert got.flags["C_CONTIGUOUS"] and np.shares_memory(got, src) == (order == "F")


@pytest.mark.parametrize("y,match", [
    (np.array([[0], [1], [2], [3], [4], [5]], np.uint8), "one digit label in 1..10"),
    (np.array([[11], [1], [2], [3], [4], [5]], np.uint8), "one digit label in 1..10"),
    (np.array([[1], [2]], np.uint8), r"per image \(6 images\)"),
])
def test_svhn_bad_labels(tmp_path, y, match):
    make_svhn(tmp_path / "svhn", y=y)
    with pytest.raises(DataError, match=match):
        load_dataset("svhn", "train", tmp_path)


def test_svhn_bad_files(tmp_path):
    make_svhn(tmp_path / "svhn")
    path = tmp_path / "svhn" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=f"SVHN file {path} is truncated or corrupt.*train_32x32.mat"):
        load_dataset("svhn", "train", tmp_path)
    scipy_io.savemat(path, {"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1))})  # float pixels
    with pytest.raises(DataError, match=r"X is float64 \(32, 32, 3, 2\), expected uint8"):
        load_dataset("svhn", "train", tmp_path)
    scipy_io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataError, match="has no y variable"):
        load_dataset("svhn", "train", tmp_path)
    with pytest.raises(DataError, match=r"has no svhn/test_32x32.mat \(nor test_32x32.mat\)"):
        load_dataset("svhn", "test", tmp_path)


def test_svhn_without_scipy_names_the_extra(tmp_path, monkeypatch):
    make_svhn(tmp_path / "svhn")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now raises ImportError
    with pytest.raises(DataError, match=r"needs SciPy.*pip install 'kmjax\[svhn\]'"):
        load_dataset("svhn", "train", tmp_path)


# --------------------------------------------------------------------------------------
# A folder of images
# --------------------------------------------------------------------------------------

Image = pytest.importorskip("PIL.Image")


def _save(path: pathlib.Path, pixels: np.ndarray, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)


def make_folder(root: pathlib.Path, h=8, w=10):
    rng = _rng(7)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    _save(root / "train" / "zebra" / "b.png", rgb)
    _save(root / "train" / "zebra" / "a.jpg", rgb, quality=95)
    _save(root / "train" / "ant" / "gray.png", gray)
    _save(root / "train" / "ant" / "sub" / "rgba.PNG", rgba)  # subfolders and upper-case suffixes count
    (root / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored
    _save(root / "train" / ".ipynb_checkpoints" / "x.png", rgb)  # hidden folders are no class
    Image.fromarray(gray).convert("P").save(root / "train" / "ant" / "pal.gif")
    return rgb, gray, rgba


def test_folder_classes_modes_and_order(tmp_path):
    rgb, gray, rgba = make_folder(tmp_path)
    ds = load_dataset("folder", "train", tmp_path)
    assert ds.class_names == ("ant", "zebra")
    assert ds.images.shape == (5, 8, 10, 3) and ds.images.dtype == np.uint8
    # ant: gray.png, pal.gif, sub/rgba.PNG (sorted paths); zebra: a.jpg, b.png
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images[0], np.repeat(gray[..., None], 3, axis=-1))  # grayscale -> RGB
    np.testing.assert_array_equal(ds.images[1], np.repeat(gray[..., None], 3, axis=-1))  # palette -> RGB
    np.testing.assert_array_equal(ds.images[2], rgba[..., :3])  # alpha dropped
    np.testing.assert_array_equal(ds.images[3], np.asarray(Image.open(tmp_path / "train" / "zebra" / "a.jpg")))
    np.testing.assert_array_equal(ds.images[4], rgb)


def test_folder_mixed_sizes_refused_then_resized(tmp_path):
    make_folder(tmp_path)
    _save(tmp_path / "train" / "zebra" / "c.bmp", np.zeros((12, 6, 3), np.uint8))
    with pytest.raises(DataError, match=r"images differ in size: .* is 8 x 10 \(H x W\), .*c.bmp is 12 x 6; "
                                        r"pass image_size=\(H, W\)"):
        load_dataset("folder", "train", tmp_path)
    ds = load_dataset("folder", "train", tmp_path, image_size=(16, 20))
    assert ds.images.shape == (6, 16, 20, 3)
    # zebra: a.jpg, b.png, c.bmp
    want = np.asarray(Image.open(tmp_path / "train" / "zebra" / "b.png").resize((20, 16), Image.BICUBIC))
    np.testing.assert_array_equal(ds.images[4], want)  # bicubic, as the docstring says
    assert not ds.images[5].any()


def test_folder_errors(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError, match=r"no split folder .*test \(split folders in .*: train\)"):
        load_dataset("folder", "test", tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*empty has no images"):
        load_dataset("folder", "train", tmp_path)
    (tmp_path / "train" / "empty" / "readme.md").unlink()
    (tmp_path / "train" / "empty").rmdir()
    bad = tmp_path / "train" / "zebra" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=f"could not read image {bad} .*replace or delete it"):
        load_dataset("folder", "train", tmp_path)
    bad.unlink()
    Image.fromarray(np.zeros((8, 10), np.uint16) + 1000).save(bad)
    with pytest.raises(DataError, match=f"image {bad} has .*16-bit"):
        load_dataset("folder", "train", tmp_path)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="has no class folders"):
        load_dataset("folder", "only", tmp_path)


# --------------------------------------------------------------------------------------
# One .npz file
# --------------------------------------------------------------------------------------


def test_npz_grayscale_keras_labels_and_default_names(tmp_path):
    x_train = _rng().integers(0, 256, (5, 6, 7), dtype=np.uint8)
    x_test = _rng(1).integers(0, 256, (2, 6, 7, 1), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=np.array([[0], [3], [1], [1], [2]], np.uint8), x_test=x_test,
             y_test=np.array([4, 0]))
    train = load_dataset("npz", "train", path)
    assert train.images.shape == (5, 6, 7, 3) and train.images.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(train.images[..., c], x_train)
    assert train.labels.tolist() == [0, 3, 1, 1, 2] and train.labels.dtype == np.int32
    assert train.class_names == ("0", "1", "2", "3", "4")  # the largest label of both splits + 1
    test = load_dataset("npz", "test", path)
    np.testing.assert_array_equal(test.images[..., 1], x_test[..., 0])
    assert test.labels.tolist() == [4, 0] and test.class_names == train.class_names


def test_npz_rgb_with_class_names(tmp_path):
    x = _rng().integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=np.array([0, 1, 0]), x_test=x[:1], y_test=np.array([1]),
             class_names=np.array(["cat", "dog"]))
    ds = load_dataset("npz", "train", path)
    np.testing.assert_array_equal(ds.images, x)
    assert ds.class_names == ("cat", "dog")


def _npz(path, **over):
    arrays = dict(x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]),
                  x_test=np.zeros((1, 4, 4, 3), np.uint8), y_test=np.array([1]))
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize("over,match", [
    (dict(y_train=np.array([0, 2]), class_names=np.array(["a", "b"])), r"y_train .* not one class index in 0..1"),
    (dict(y_train=np.array([0, -1])), "not one class index"),
    (dict(y_train=np.array([0.5, 1.0])), "not one class index"),
    (dict(y_train=np.array([0, 1, 1])), "2 images in x_train but 3 labels"),
    (dict(y_test=None), r"has no y_test \(it holds: x_test, x_train, y_train\)"),
    (dict(x_train=np.zeros((2, 3, 4, 4), np.uint8)), r"channels first\? transpose"),
    (dict(x_train=np.full((2, 4, 4, 3), 0.5)), "not whole numbers in 0..255"),
    (dict(class_names=np.array([1, 2])), "class_names must be a 1-D array of strings"),
])
def test_npz_bad_contents(tmp_path, over, match):
    path = _npz(tmp_path / "d.npz", **over)
    with pytest.raises(DataError, match=match):
        load_dataset("npz", "train", path)


def test_npz_pickles_and_damage(tmp_path):
    marker = tmp_path / "pwned"
    path = _npz(tmp_path / "d.npz", y_train=np.array([_RunsCode(marker), 1], dtype=object))
    with pytest.raises(DataError, match="holds object arrays \\(pickles\\), which kmjax never loads"):
        load_dataset("npz", "train", path)
    assert not marker.exists()
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="is truncated or corrupt"):
        load_dataset("npz", "train", path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", "train", tmp_path / "none.npz")


# --------------------------------------------------------------------------------------
# Downloads: only into the cache, only when asked, the checksum before extraction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,folder,make", [("cifar100", "cifar-100-python", make_cifar100),
                                              ("stl10", "stl10_binary", make_stl10)])
def test_download_into_the_cache(tmp_path, monkeypatch, name, folder, make):
    make(tmp_path / "src")
    url, md5 = _tarball(tmp_path / "a.tar.gz", tmp_path / "src" / folder, folder)
    monkeypatch.setitem(datasets.SOURCES, name, (url, md5))
    with pytest.raises(DataError, match="download=False"):
        load_dataset(name, "test", download=False)
    with pytest.raises(DataError, match=f"has no {folder}/.*download_dataset\\('{name}'"):
        load_dataset(name, "test", tmp_path / "mine")  # a folder given: never downloaded into
    ds = load_dataset(name, "test")
    want = load_dataset(name, "test", tmp_path / "src")
    np.testing.assert_array_equal(ds.images, want.images)
    assert sorted(p.name for p in (tmp_path / CACHE).iterdir()) == [folder]  # nothing else left


@pytest.mark.parametrize("name,folder,make", [("cifar100", "cifar-100-python", make_cifar100),
                                              ("stl10", "stl10_binary", make_stl10)])
def test_download_checksum_mismatch_refused_before_extraction(tmp_path, monkeypatch, name, folder, make):
    make(tmp_path / "src")
    url, md5 = _tarball(tmp_path / "a.tar.gz", tmp_path / "src" / folder, folder)
    monkeypatch.setitem(datasets.SOURCES, name, (url, "0" * 32))
    opened = []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a))
    with pytest.raises(DataError, match=f"download of {url} is damaged: MD5 {md5}, expected {'0' * 32}"):
        load_dataset(name, "test")
    assert opened == []  # never opened, let alone extracted
    assert list((tmp_path / CACHE).iterdir()) == []


def test_svhn_download(tmp_path, monkeypatch):
    x, _ = make_svhn(tmp_path / "src", "test")
    src = tmp_path / "src" / "test_32x32.mat"
    good = hashlib.md5(src.read_bytes()).hexdigest()
    monkeypatch.setitem(datasets.SOURCES, "svhn-test", (src.as_uri(), "f" * 32))
    with pytest.raises(DataError, match=f"MD5 {good}, expected {'f' * 32}"):
        load_dataset("svhn", "test")
    assert list((tmp_path / CACHE / "svhn").iterdir()) == []  # the damaged file is not kept
    monkeypatch.setitem(datasets.SOURCES, "svhn-test", (src.as_uri(), good))
    with pytest.raises(DataError, match=r"download=False; pass download=True, call kmjax.datasets.download_dataset"):
        load_dataset("svhn", "test", download=False)
    ds = load_dataset("svhn", "test")
    np.testing.assert_array_equal(ds.images[2], x[:, :, :, 2])
    assert sorted(p.name for p in (tmp_path / CACHE / "svhn").iterdir()) == ["test_32x32.mat"]


def test_published_checksums():
    # as in torchvision's cifar.py, stl10.py and svhn.py (read when these readers were written)
    assert datasets.SOURCES["cifar100"][1] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert datasets.SOURCES["stl10"][1] == "91f7769df0f17e558f3565bffb0c7dfb"
    assert [datasets.SOURCES[f"svhn-{s}"][1] for s in ("train", "test", "extra")] == [
        "e26dedcc434d2e4c54c9b2d4a06d8373", "eb5a983be6a315427106f1b164d9cef3", "a93ce644f1a588dc4d68dda5feec44a7"]
