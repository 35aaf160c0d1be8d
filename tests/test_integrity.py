"""What a run trusts of its own files, and what it records (issue 26, items 1-2): checksums and stage
keys verified on load (memory-mapped or not), flipped bytes refused, stale temporaries removed,
shared stage folders locked, provenance at each start, stage keys that follow the code, and test
sets that say what they are. On the small synthetic data set of tests/test_runner.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kmjax.checkpoint import Slot, load_tree, save_tree
from kmjax.cli import main
from kmjax.config import load_config
from kmjax.errors import FileFormatError, RunError
from kmjax.experiment import provenance, run
from kmjax.experiment import runner as runner_module
from kmjax.experiment.store import RunLock, StageStore
from synthetic_cifar import SMALL

@pytest.fixture(scope="module")
def data_dir(small_cifar):
    return small_cifar


def go(data_dir, out, *extra, **kw):
    return run(load_config("quick", SMALL + list(extra)), data_dir=data_dir, out=out, quiet=True, **kw)


def cli(data_dir, *extra, resume=None, out=None):
    args = ["run", "quick", "--data-dir", str(data_dir), "-q"]
    for s in SMALL + list(extra):
        args += ["--set", s]
    if resume is not None:
        args += ["--resume", str(resume)]
    if out is not None:
        args += ["--out", str(out)]
    return main(args)


def changed_later(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` as a change made after kmjax wrote it would be: with a later
    modification time (within one clock tick of the write, the file would look unchanged to the
    process that wrote it, which does not hash its own files again)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    changed_later(path, bytes(data))


def test_a_flipped_byte_is_refused_memory_mapped_or_not(tmp_path):
    path = tmp_path / "state.npz"
    like = {"a": Slot("n"), "b": Slot(3, 4)}
    save_tree(path, {"a": np.arange(1000, dtype=np.float32), "b": np.ones((3, 4))}, {"kind": "x"}, checksum=True)
    assert load_tree(path, like, mmap=True, checksum=True)[1] == {"kind": "x"}
    data = bytearray(path.read_bytes())
    data[data.find(np.float32(500).tobytes())] ^= 0x01  # one bit of one value of "a"
    changed_later(path, bytes(data))
    for mmap in (False, True):
        with pytest.raises(FileFormatError, match="'a' fails its checksum"):
            load_tree(path, like, mmap=mmap)
    # a file without checksums (another writer, or an older kmjax) is refused where they are required
    save_tree(path, {"a": np.arange(3.0), "b": np.ones((3, 4))})
    with pytest.raises(FileFormatError, match="has no checksums"):
        load_tree(path, like, checksum=True)
    assert load_tree(path, like)[0]["a"].shape == (3,)  # a model file: accepted, the zip's CRC checks it


def test_a_flipped_byte_in_a_saved_stage_stops_the_resume_with_a_message(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    (stage,) = (folder / "stages").glob("dictionary-*.npz")
    intact = stage.read_bytes()
    flip_byte(stage, len(intact) // 2)  # in the centroids
    # a classifier-only change reuses the folder's stages: the dictionary is read, and refused
    assert cli(data_dir, "classifier.C=10", resume=folder) == 2
    err = capsys.readouterr().err
    assert "fails its checksum" in err and stage.name in err and "Traceback" not in err
    changed_later(stage, intact)
    flip_byte(stage, 100)  # in the zip's central directory
    assert cli(data_dir, "classifier.C=10", resume=folder) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and stage.name in err and "Traceback" not in err


def test_changed_features_are_refused_finished_or_partial(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    (features,) = (folder / "stages").glob("features.train-*.npy")
    flip_byte(features, 8)  # the last row's last value
    assert cli(data_dir, "classifier.C=10", resume=folder) == 2
    assert "rows 0-80 fail their checksum" in capsys.readouterr().err

    store = StageStore(tmp_path / "partial")  # an interrupted stage: the rows it keeps are checked too
    a, done = store.open_array("features", "k1", "train", (6, 3))
    a[:4] = np.arange(12.0).reshape(4, 3)
    store.mark_rows(a, 2)
    store.mark_rows(a, 4)
    a.flush()
    del a
    again = StageStore(tmp_path / "partial")
    b, done = again.open_array("features", "k1", "train", (6, 3))
    assert done == 4 and np.array_equal(b[:4], np.arange(12.0).reshape(4, 3))
    b[3, 0] += 1  # changed on disk after it was recorded
    b.flush()
    del b
    with pytest.raises(RunError, match="rows 2-4 fail their checksum"):
        StageStore(tmp_path / "partial").open_array("features", "k1", "train", (6, 3))


def test_a_stage_file_under_another_key_is_refused(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    (classifier,) = (folder / "stages").glob("classifier-*.npz")
    other = go(data_dir, tmp_path, "classifier.C=10", resume=folder)  # a new folder beside it, same stages
    (theirs,) = [p for p in (folder / "stages").glob("classifier-*.npz") if p != classifier]
    shutil.copy(classifier, theirs)  # the C = 100 classifier saved under the C = 10 key
    shutil.rmtree(other["run_dir"])
    with pytest.raises(RunError, match="saved under the key .* not .* as its name says"):
        go(data_dir, tmp_path, "classifier.C=10", resume=folder)


def test_stale_temporaries_go_and_shared_stage_folders_are_locked(data_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".classifier.kernel-0123.npz.999999.tmp"  # left by a writer killed mid-write
    stale.write_bytes(b"\0" * 1000)
    res = go(data_dir, tmp_path / "a", cache=cache)
    assert not stale.exists()
    with RunLock(cache):  # as another run using the same stage folder would hold it
        with pytest.raises(RunError, match="in use by another kmjax process"):
            go(data_dir, tmp_path / "b", cache=cache)
    assert "dictionary" not in go(data_dir, tmp_path / "b", cache=cache)["seconds"]  # reused once free
    assert Path(res["run_dir"]).is_dir()


def test_each_start_is_recorded_and_a_code_change_recomputes(data_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "fit_classifier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        go(data_dir, tmp_path)
    monkeypatch.undo()
    folder = tmp_path / "quick"
    first = json.loads((folder / "provenance.json").read_text())["starts"]
    assert len(first) == 1 and set(first[0]) >= {"time", "command", "git", "code", "stage_keys"}
    assert set(first[0]["code"]) == {"dictionary", "features", "classifier"}

    code = dict(first[0]["code"], classifier="0" * 16)  # the classifier's code changed meanwhile
    monkeypatch.setattr(runner_module, "stage_code", lambda: code)
    res = run(load_config("quick", SMALL), data_dir=data_dir, out=tmp_path, resume=folder)
    assert "the classifier stage and those after are computed again" in capsys.readouterr().err
    assert len(res["starts"]) == 2 and res["starts"][1]["code"]["classifier"] == "0" * 16
    assert res["stage_keys"]["dictionary"] == first[0]["stage_keys"]["dictionary"]  # still reused
    assert res["stage_keys"]["classifier"] != first[0]["stage_keys"]["classifier"]
    assert "dictionary" not in res["seconds"] and "classifier" in res["seconds"]
    assert json.loads((folder / "results.json").read_text())["starts"] == res["starts"]


def test_stage_code_follows_each_stages_imports():
    names = {stage: {p.name for p in provenance.closure(modules)}
             for stage, (modules, _) in provenance._STAGES.items()}
    assert {"lloyd.py", "cluster.py", "preprocess.py", "dictionary.py"} <= names["dictionary"]
    assert {"features.py", "encoders.py", "pooling.py"} <= names["features"]
    assert {"select.py", "dual.py", "cg.py", "ridge.py"} <= names["classifier"]
    assert "select.py" not in names["dictionary"] | names["features"]  # a classifier fix keeps the features
    assert len(set(provenance.stage_code().values())) == 3


def test_a_test_set_says_what_it_is(data_dir, tmp_path):
    whole = go(data_dir, tmp_path / "a")
    assert whole["test_set"]["kind"] == "full" and "test_accuracy" in whole
    part = go(data_dir, tmp_path / "b", "data.n_test=20")
    assert part["test_set"] == {"kind": "partial", "images": 20, "complete": False, "images_also_in_training": 0,
                                "accuracy_key": "partial_test_accuracy"}
    assert "test_accuracy" not in part and 0 <= part["partial_test_accuracy"] <= 1
    stand_in = tmp_path / "stand-in"  # a training batch standing in for the test batch, as device runs do
    shutil.copytree(data_dir, stand_in)
    batches = stand_in / "cifar-10-batches-py"
    os.replace(batches / "data_batch_1", batches / "test_batch")
    shutil.copy(batches / "test_batch", batches / "data_batch_1")
    res = go(stand_in, tmp_path / "c")
    assert res["test_set"]["kind"] == "stand-in" and res["test_set"]["images_also_in_training"] == 40
    assert "test_accuracy" not in res and "stand_in_test_accuracy" in res


def test_a_damaged_checkpoint_is_refused_and_one_of_another_size_recomputed(tmp_path):
    from kmjax.classify import GramStats

    store = StageStore(tmp_path)
    checkpoints = store.checkpoints("classifier", "k1")
    gram = GramStats(np.float64(4), np.zeros(3), np.arange(3.0), np.eye(3), np.ones((3, 2)), np.ones(2))
    checkpoints.save("gram", gram)
    path = tmp_path / "classifier.gram-k1.npz"
    intact = path.read_bytes()
    data = bytearray(intact)
    data[data.find(np.eye(3).tobytes())] ^= 0x01
    changed_later(path, bytes(data))
    with pytest.raises(RunError, match="fails its checksum"):
        StageStore(tmp_path).checkpoints("classifier", "k1").get("gram")
    changed_later(path, intact)
    assert np.array_equal(StageStore(tmp_path).checkpoints("classifier", "k1").get("gram").gram, np.eye(3))


def test_a_run_folder_of_an_older_config_spelling_resumes(data_dir, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import kmjax.experiment.runner as r

    original = r.fit_classifier
    r.fit_classifier = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            go(data_dir, tmp_path)
    finally:
        r.fit_classifier = original
    folder = tmp_path / "quick"
    saved = json.loads((folder / "config.json").read_text())
    saved["kmeans"]["tol"], saved["kmeans"]["chunk_size"] = -1.0, 0  # how configs said "none" and "auto" before
    (folder / "config.json").write_text(json.dumps(saved))
    assert go(data_dir, tmp_path, resume=folder)["run_dir"] == str(folder)


def test_a_changed_array_header_is_refused(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    (features,) = (folder / "stages").glob("features.train-*.npy")
    data = features.read_bytes()
    changed_later(features, data.replace(b"'<f4'", b"'<i4'", 1))  # the same bytes read as integers
    assert cli(data_dir, "classifier.C=10", resume=folder) == 2
    assert "its header changed on disk" in capsys.readouterr().err


def test_checksums_are_read_once_per_process_and_never_for_what_it_wrote(tmp_path, monkeypatch):
    import kmjax.checkpoint as checkpoint

    reads = []
    monkeypatch.setattr(checkpoint, "file_checksum", lambda *a, **k: reads.append(a) or "")
    store = StageStore(tmp_path)
    store.save_tree("stage", "k1", {"a": np.arange(4.0)}, {"kind": "x"})
    assert store.load_tree("stage", "k1", {"a": Slot(4)})[1]["stage_key"] == "k1"
    assert reads == []  # written by this process: not hashed again (a 10 GB kernel costs seconds)
    path = tmp_path / "stage-k1.npz"
    os.utime(path, ns=(1, 1))  # as if another process had rewritten it
    with pytest.raises(RunError, match="fails its checksum"):  # hashed now ("" never matches)
        store.load_tree("stage", "k1", {"a": Slot(4)})
    assert reads


def test_damaged_results_and_leftover_checkpoints(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    (folder / "results.json").write_text('{"name": "qu')  # cut short
    assert cli(data_dir, resume=folder) == 2
    assert "results.json is unreadable" in capsys.readouterr().err
    (folder / "results.json").unlink()
    (stage,) = (folder / "stages").glob("classifier-*.npz")
    key = stage.name[len("classifier-"):-len(".npz")]
    StageStore(folder / "stages").save_tree("classifier.gram", key, {"a": np.zeros(2)}, {"kind": "checkpoint"})
    go(data_dir, tmp_path, resume=folder)  # the stage is reused: a checkpoint a killed run left is removed
    assert not list((folder / "stages").glob("classifier.*.npz"))
