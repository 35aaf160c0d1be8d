"""Tests for kmjax.data. They build small synthetic CIFAR-10 folders; only the last test
(skipped unless KMJAX_DATA_DIR points at the real data) reads the real data set."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import struct
import tarfile

import numpy as np
import pytest

from kmjax import data, safe_pickle
from kmjax.data import (
    CLASS_NAMES,
    Cifar10,
    DataError,
    download_cifar10,
    load_cifar10,
    resolve_data_dir,
)

from synthetic_cifar import BATCHES, N, _batch_dict, _dump, _images, _rows, make_cifar


# --------------------------------------------------------------------------------------
# Helpers: synthetic batches in the official layout
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the caller's KMJAX_DATA_DIR or real cache (except the real-data test,
    which reads the variable at collection time)."""
    monkeypatch.delenv("KMJAX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


FIX = "and download again"  # part of every corrupt-file message


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_load_train_matches_known_arrays(tmp_path, bytes_keys):
    names = [f"class{i}" for i in range(10)]
    content = make_cifar(tmp_path, bytes_keys=bytes_keys, names=names)
    ds = load_cifar10(tmp_path, "train")
    assert isinstance(ds, Cifar10)
    want_images = np.concatenate([content[f"data_batch_{b}"][0] for b in range(1, 6)])
    want_labels = np.concatenate([content[f"data_batch_{b}"][1] for b in range(1, 6)])
    assert ds.images.dtype == np.uint8 and ds.images.shape == (5 * N, 32, 32, 3)
    assert ds.images.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ds.images, want_images)
    assert ds.labels.dtype == np.int32 and ds.labels.shape == (5 * N,)
    np.testing.assert_array_equal(ds.labels, want_labels)
    assert ds.class_names == tuple(names)


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_load_test_split(tmp_path, bytes_keys):
    content = make_cifar(tmp_path, bytes_keys=bytes_keys)
    ds = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(ds.images, content["test_batch"][0])
    np.testing.assert_array_equal(ds.labels, content["test_batch"][1])
    assert ds.class_names == CLASS_NAMES


def test_channel_layout_is_rgb_planes(tmp_path):
    # One image whose R plane is 1, G plane 2, B plane 3, with pixel (h=0, w=1) of R set to 9:
    # after loading, channel c must be c+1 everywhere and [0, 1, 0] must be 9.
    folder = tmp_path / BATCHES
    folder.mkdir()
    row = np.repeat(np.array([1, 2, 3], dtype=np.uint8), 1024)
    row[1] = 9  # R plane, row 0, column 1
    row[1024 + 32] = 8  # G plane, row 1, column 0
    _dump(folder / "test_batch", {"data": row[None, :], "labels": [4]}, bytes_keys=False)
    img = load_cifar10(tmp_path, "test").images[0]
    assert img[0, 1, 0] == 9 and img[1, 0, 1] == 8
    img[0, 1, 0], img[1, 0, 1] = 1, 2
    np.testing.assert_array_equal(img, np.broadcast_to([1, 2, 3], (32, 32, 3)))


@pytest.mark.parametrize("batches", [[1], [3, 1], [2, 4, 5]])
def test_batches_subset_in_given_order(tmp_path, batches):
    content = make_cifar(tmp_path)
    ds = load_cifar10(tmp_path, batches=batches)
    want = np.concatenate([content[f"data_batch_{b}"][0] for b in batches])
    np.testing.assert_array_equal(ds.images, want)
    assert len(ds.labels) == N * len(batches)


def test_class_names_default_without_meta(tmp_path):
    make_cifar(tmp_path, meta=False)
    assert load_cifar10(tmp_path, "test").class_names == CLASS_NAMES


def test_class_names_default_when_meta_lacks_them(tmp_path):
    make_cifar(tmp_path, meta=False)
    _dump(tmp_path / BATCHES / "batches.meta", {b"num_vis": 3072}, bytes_keys=True)
    assert load_cifar10(tmp_path, "test").class_names == CLASS_NAMES


def test_other_numeric_encodings_accepted(tmp_path):
    # data as a float array of whole numbers and labels as a numpy array still load exactly.
    images = _images(seed=5)
    folder = tmp_path / BATCHES
    folder.mkdir()
    d = {"data": _rows(images).astype(np.float64), "labels": np.arange(N) % 10}
    _dump(folder / "test_batch", d, bytes_keys=False)
    ds = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels.dtype == np.int32


# --------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------


def test_bad_split(tmp_path):
    make_cifar(tmp_path)
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_cifar10(tmp_path, "validation")


@pytest.mark.parametrize("batches", [[0], [6], [], [1, 1], ["1"], [True], [1.0]])
def test_bad_batches(tmp_path, batches):
    make_cifar(tmp_path)
    with pytest.raises(ValueError, match="batches"):
        load_cifar10(tmp_path, batches=batches)


def test_batches_with_test_split(tmp_path):
    make_cifar(tmp_path)
    with pytest.raises(ValueError, match="split='test'"):
        load_cifar10(tmp_path, "test", batches=[1])


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------


def test_resolution_order(tmp_path, monkeypatch):
    arg, env, xdg = tmp_path / "arg", tmp_path / "env", tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert resolve_data_dir() == xdg / "kmjax"
    monkeypatch.setenv("KMJAX_DATA_DIR", str(env))
    assert resolve_data_dir() == env
    assert resolve_data_dir(arg) == arg
    assert resolve_data_dir(str(arg)) == arg
    monkeypatch.setenv("KMJAX_DATA_DIR", "")  # empty counts as unset
    assert resolve_data_dir() == xdg / "kmjax"


def test_cache_falls_back_to_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == tmp_path / ".cache" / "kmjax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # XDG: relative values are ignored
    assert resolve_data_dir() == tmp_path / ".cache" / "kmjax"


def test_pointing_at_batches_folder_itself(tmp_path, monkeypatch):
    content = make_cifar(tmp_path)
    assert resolve_data_dir(tmp_path / BATCHES) == tmp_path
    ds = load_cifar10(tmp_path / BATCHES, "test")
    np.testing.assert_array_equal(ds.images, content["test_batch"][0])
    monkeypatch.setenv("KMJAX_DATA_DIR", str(tmp_path / BATCHES))
    np.testing.assert_array_equal(load_cifar10(split="test").labels, content["test_batch"][1])


def test_env_var_used_for_loading(tmp_path, monkeypatch):
    content = make_cifar(tmp_path / "somewhere")
    monkeypatch.setenv("KMJAX_DATA_DIR", str(tmp_path / "somewhere"))
    np.testing.assert_array_equal(load_cifar10(split="test").images, content["test_batch"][0])


def test_explicit_folder_without_data_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty} \\(from --data-dir / data_dir=\\) has no {BATCHES}/.*download_cifar10"):
        load_cifar10(empty)  # download=True, but never into a folder the user chose


def test_env_folder_without_data_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KMJAX_DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=r"from KMJAX_DATA_DIR.*set neither --data-dir nor KMJAX_DATA_DIR"):
        load_cifar10()


def test_cache_without_data_and_no_download(tmp_path):
    with pytest.raises(DataError, match="download=False"):
        load_cifar10(download=False)


def test_cache_without_data_downloads(tmp_path, monkeypatch):
    src = tmp_path / "src"
    content = make_cifar(src)
    url, md5 = _tarball(tmp_path / "a.tar.gz", src)
    real = data.download_cifar10
    calls = []

    def fake_download(dest):
        calls.append(pathlib.Path(dest))
        return real(dest, url=url, md5=md5)

    monkeypatch.setattr(data, "download_cifar10", fake_download)
    ds = load_cifar10(split="test")
    assert calls == [tmp_path / "xdg-cache" / "kmjax"]
    np.testing.assert_array_equal(ds.images, content["test_batch"][0])
    load_cifar10(split="test")  # second time: already there, no download
    assert len(calls) == 1


# --------------------------------------------------------------------------------------
# Validation errors: each names the file
# --------------------------------------------------------------------------------------


def _rewrite(tmp_path, name, obj, bytes_keys=False):
    _dump(tmp_path / BATCHES / name, obj, bytes_keys)


def test_missing_batch_file(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / BATCHES / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_cifar10(tmp_path)
    load_cifar10(tmp_path, batches=[1, 2])  # the other batches are fine


@pytest.mark.parametrize("cut", [0, 1, 100, -1])
def test_truncated_batch(tmp_path, cut):
    make_cifar(tmp_path)
    path = tmp_path / BATCHES / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes(raw[: cut % len(raw)])
    with pytest.raises(DataError, match=f"data_batch_2 is truncated or corrupt.*{FIX}"):
        load_cifar10(tmp_path)


def test_garbage_batch(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / BATCHES / "test_batch").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match="test_batch is truncated or corrupt"):
        load_cifar10(tmp_path, "test")


def test_corrupt_meta(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / BATCHES / "batches.meta").write_bytes(b"\x80\x02}q")
    with pytest.raises(DataError, match="batches.meta is truncated or corrupt"):
        load_cifar10(tmp_path, "test")


class _RunsCode:
    """Unpickling this calls ``os.system``: the classic crafted pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(marker, protocol, wrap):
    payload = _RunsCode(marker)
    if wrap == "meta":  # a plausible batches.meta whose class names carry the payload
        return pickle.dumps({"label_names": list(CLASS_NAMES), "num_vis": payload}, protocol=protocol)
    if wrap == "batch":  # real pixels and labels, the payload in an extra entry
        return pickle.dumps(_batch_dict(_images(0), np.zeros(N, int), False, extra=payload), protocol=protocol)
    return pickle.dumps(payload, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("name,wrap", [("batches.meta", "meta"), ("data_batch_1", "batch"), ("test_batch", "bare")])
def test_a_crafted_file_runs_nothing(tmp_path, name, wrap, protocol):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / BATCHES / name).write_bytes(_crafted(marker, protocol, wrap))
    split = "test" if name == "test_batch" else "train"
    with pytest.raises(DataError, match=f"{name} .*refusing to load it"):
        load_cifar10(tmp_path, split)
    assert not marker.exists()


def test_nothing_is_built_before_a_forbidden_global_is_refused(tmp_path, monkeypatch):
    # The opcodes are checked before unpickling starts: not even the allowed array constructor
    # that precedes the payload in the stream is called.
    make_cifar(tmp_path)
    (tmp_path / BATCHES / "data_batch_1").write_bytes(_crafted(tmp_path / "x", 2, "batch"))
    built = []
    monkeypatch.setattr(safe_pickle._BatchUnpickler, "find_class", lambda self, m, n: built.append((m, n)))
    with pytest.raises(DataError, match="names posix.system|names nt.system"):
        load_cifar10(tmp_path, "train", batches=[1])
    assert built == []


def test_the_unpickler_admits_only_numpy_array_constructors():
    assert {m for m, _ in safe_pickle._ALLOWED_GLOBALS} <= {"numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                                                    "_codecs"}
    with pytest.raises(safe_pickle.RefusedPickle):
        safe_pickle._BatchUnpickler(io.BytesIO(b"")).find_class("builtins", "eval")


def test_meta_with_wrong_number_of_names(tmp_path):
    make_cifar(tmp_path)
    _rewrite(tmp_path, "batches.meta", {"label_names": ["a", "b"]})
    with pytest.raises(DataError, match="batches.meta lists 2 class names"):
        load_cifar10(tmp_path, "test")


def test_not_a_dict(tmp_path):
    make_cifar(tmp_path)
    _rewrite(tmp_path, "test_batch", [1, 2, 3])
    with pytest.raises(DataError, match="test_batch holds a list"):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize("missing", ["data", "labels"])
@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_missing_key(tmp_path, missing, bytes_keys):
    make_cifar(tmp_path)
    d = _batch_dict(_images(0), np.zeros(N, int), bytes_keys)
    del d[missing.encode() if bytes_keys else missing]
    _rewrite(tmp_path, "test_batch", d, bytes_keys)
    with pytest.raises(DataError, match=f"test_batch has no '{missing}' entry"):
        load_cifar10(tmp_path, "test")


def test_fine_labels_are_not_accepted(tmp_path):
    # CIFAR-100 files have "fine_labels"; this loader is for CIFAR-10 only.
    make_cifar(tmp_path)
    _rewrite(tmp_path, "test_batch", {"data": _rows(_images(0)), "fine_labels": [0] * N})
    with pytest.raises(DataError, match="no 'labels' entry"):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize(
    "bad_data, match",
    [
        (np.zeros((N, 3071), np.uint8), r"has shape \(7, 3071\)"),
        (np.zeros((N, 3, 32, 32), np.uint8), r"has shape \(7, 3, 32, 32\)"),
        (np.zeros(3072, np.uint8), r"has shape \(3072,\)"),
        (np.full((N, 3072), 256), "is not whole numbers in 0..255"),
        (np.full((N, 3072), -1), "is not whole numbers in 0..255"),
        (np.full((N, 3072), 1.5), "is not whole numbers in 0..255"),
        (np.full((N, 3072), np.nan), "is not whole numbers in 0..255"),
        (np.full((N, 3072), "x"), "is not whole numbers in 0..255"),
        ([[1, 2], [3]], "is not whole numbers in 0..255"),
    ],
)
def test_bad_data(tmp_path, bad_data, match):
    make_cifar(tmp_path)
    _rewrite(tmp_path, "test_batch", {"data": bad_data, "labels": [0] * N})
    with pytest.raises(DataError, match=f"test_batch: 'data' {match}"):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize("labels", [[0] * (N - 1), [0] * (N + 1)])
def test_label_count_mismatch(tmp_path, labels):
    make_cifar(tmp_path)
    _rewrite(tmp_path, "test_batch", {"data": _rows(_images(0)), "labels": labels})
    with pytest.raises(DataError, match=f"test_batch has 7 images but {len(labels)} labels"):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize("bad", [10, -1, 0.5, "cat"])
def test_labels_out_of_range(tmp_path, bad):
    make_cifar(tmp_path)
    labels = [0] * (N - 1) + [bad]
    _rewrite(tmp_path, "data_batch_4", {"data": _rows(_images(0)), "labels": labels})
    with pytest.raises(DataError, match="data_batch_4: 'labels' is not a list of class indices in 0..9"):
        load_cifar10(tmp_path)


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


def _tarball(path: pathlib.Path, src_root: pathlib.Path, extra=()) -> tuple[str, str]:
    """Tar src_root/cifar-10-batches-py (plus extra TarInfo/bytes members) like the official
    archive; return (file:// URL, MD5)."""
    with tarfile.open(path, "w:gz") as tar:
        if (src_root / BATCHES).exists():
            tar.add(src_root / BATCHES, arcname=BATCHES)
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def _file_member(name: str, payload: bytes = b"evil"):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def test_download_good_md5(tmp_path, capsys):
    content = make_cifar(tmp_path / "src")
    url, md5 = _tarball(tmp_path / "c.tar.gz", tmp_path / "src")
    dest = tmp_path / "dest"
    assert download_cifar10(dest, url=url, md5=md5) == dest
    assert sorted(p.name for p in dest.iterdir()) == [BATCHES]  # no temp files left
    ds = load_cifar10(dest, "test")
    np.testing.assert_array_equal(ds.images, content["test_batch"][0])
    assert "downloading" in capsys.readouterr().err
    # Already present: nothing to do, not even a network access.
    assert download_cifar10(dest, url="http://127.0.0.1:9/x", md5="0" * 32) == dest


def test_download_wrong_md5(tmp_path):
    make_cifar(tmp_path / "src")
    url, md5 = _tarball(tmp_path / "c.tar.gz", tmp_path / "src")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=f"MD5 {md5}, expected {'0' * 32}"):
        download_cifar10(dest, url=url, md5="0" * 32)
    assert list(dest.iterdir()) == []  # temp archive deleted, nothing extracted


@pytest.mark.parametrize(
    "member_name",
    ["../evil", f"{BATCHES}/../../evil", "ABSOLUTE"],
)
def test_download_refuses_unsafe_paths(tmp_path, member_name):
    make_cifar(tmp_path / "src")
    dest = tmp_path / "deep" / "dest"
    if member_name == "ABSOLUTE":
        member_name = str(tmp_path / "evil")
    url, md5 = _tarball(tmp_path / "c.tar.gz", tmp_path / "src", [_file_member(member_name)])
    with pytest.raises(DataError, match="unsafe path"):
        download_cifar10(dest, url=url, md5=md5)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_download_refuses_links_and_devices(tmp_path, kind):
    make_cifar(tmp_path / "src")
    info = tarfile.TarInfo(f"{BATCHES}/link")
    info.type = kind
    info.linkname = "/etc/passwd"
    url, md5 = _tarball(tmp_path / "c.tar.gz", tmp_path / "src", [(info, None)])
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="link or special file"):
        download_cifar10(dest, url=url, md5=md5)
    assert list(dest.iterdir()) == []


def test_download_archive_without_batches_folder(tmp_path):
    url, md5 = _tarball(tmp_path / "c.tar.gz", tmp_path / "nothing", [_file_member("README")])
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=f"has no {BATCHES}/"):
        download_cifar10(dest, url=url, md5=md5)
    assert list(dest.iterdir()) == []


def test_download_not_a_tarball(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"this is not a tarball")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="could not extract"):
        download_cifar10(dest, url=bad.as_uri(), md5=hashlib.md5(bad.read_bytes()).hexdigest())
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("url", ["file:///nonexistent/cifar.tar.gz", "http://127.0.0.1:9/x", "nota://url"])
def test_download_unreachable(tmp_path, url):
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=f"could not download {url}: .*KMJAX_DATA_DIR"):
        download_cifar10(dest, url=url)
    assert list(dest.iterdir()) == []


# --------------------------------------------------------------------------------------
# The real data set (only when KMJAX_DATA_DIR points at it)
# --------------------------------------------------------------------------------------

_REAL = os.environ.get("KMJAX_DATA_DIR", "")
_HAS_REAL = bool(_REAL) and (
    (pathlib.Path(_REAL) / BATCHES).is_dir() or pathlib.Path(_REAL).name == BATCHES
)


@pytest.mark.skipif(not _HAS_REAL, reason="set KMJAX_DATA_DIR to a folder with cifar-10-batches-py/")
def test_real_cifar10():
    train = load_cifar10(_REAL, "train", download=False)
    test = load_cifar10(_REAL, "test", download=False)
    assert train.images.shape == (50000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 32, 32, 3) and test.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and test.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)
    assert train.class_names == CLASS_NAMES
    mean = train.images.reshape(-1, 3).mean(axis=0, dtype=np.float64) / 255.0
    np.testing.assert_allclose(mean, [0.49139968, 0.48215841, 0.44653091], atol=1e-6, rtol=0)
    one = load_cifar10(_REAL, batches=[1], download=False)
    assert one.images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(one.images, train.images[:10000])
