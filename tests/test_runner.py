"""The runner's own logic on a small synthetic data set in CIFAR layout (no real data needed):
resume rules, the run-folder lock, stage keys, failures that leave nothing behind, disk space,
exports, and what the CLI says about each."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from kmjax import templates
from kmjax.checkpoint import read_meta
from kmjax.cli import main
from kmjax.config import ConfigError, load_config, to_dict
from kmjax.data import DataError
from kmjax.experiment import RunError, export_features, run, sweep
from kmjax.experiment import runner as runner_module
from kmjax.experiment.store import RunLock, StageCheckpoints, StageStore
from synthetic_cifar import SMALL, make_cifar

@pytest.fixture(scope="module")
def data_dir(small_cifar):
    return small_cifar


def config(*extra):
    return load_config("quick", SMALL + list(extra))


def go(data_dir, out, *extra, **kw):
    return run(config(*extra), data_dir=data_dir, out=out, quiet=True, **kw)


def stage_names(folder: Path) -> set[str]:
    return {p.name for p in (folder / "stages").iterdir()}


def test_a_run_writes_its_folder(data_dir, tmp_path):
    res = go(data_dir, tmp_path)
    folder = Path(res["run_dir"])
    assert folder == tmp_path / "quick"
    for name in ("config.json", "results.json", "model.npz", "dictionary.npz", "filters.png", "objective.png",
                 "confusion.png"):
        assert (folder / name).is_file(), name
    assert res["n_train"] == 80 and res["n_test"] == 40
    assert sum(map(sum, res["confusion"])) == 40
    assert set(res["compile_seconds"]) >= {"dictionary", "features", "classifier"}
    if Path("/proc/self/status").is_file():  # the process's own memory, below what counts mapped files too
        assert 0 < res["peak_anon_memory_mb"] <= res["peak_memory_mb"]
    env = res["environment"]
    assert env["kmjax"] == "0.2.0" and set(env["versions"]) == {"jax", "jaxlib", "optax", "numpy", "matplotlib"}
    assert all(env["versions"].values())
    with RunLock(folder):  # released at the end of the run
        pass


def test_same_config_twice_gives_byte_identical_models(data_dir, tmp_path):
    a, b = go(data_dir, tmp_path), go(data_dir, tmp_path)
    assert a["run_dir"] != b["run_dir"]
    assert (Path(a["run_dir"]) / "model.npz").read_bytes() == (Path(b["run_dir"]) / "model.npz").read_bytes()
    assert (Path(a["run_dir"]) / "dictionary.npz").read_bytes() == (Path(b["run_dir"]) / "dictionary.npz").read_bytes()


def test_resume_of_a_finished_run_changes_nothing(data_dir, tmp_path):
    first = go(data_dir, tmp_path)
    folder = Path(first["run_dir"])
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    again = go(data_dir, tmp_path, resume=folder)
    assert again == first
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not (tmp_path / "quick-2").exists()


def test_resume_refuses_another_experiments_folder(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    before = (folder / "results.json").read_bytes()
    with pytest.raises(RunError, match=r"kmeans\.k: 8 there, 9 here.*only classifier settings may change"):
        go(data_dir, tmp_path, "kmeans.k=9", resume=folder)
    args = ["run", "quick", "--data-dir", str(data_dir), "--resume", str(folder), "-q"]
    for s in SMALL + ["kmeans.k=9", "features.encoder=hard"]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "kmeans.k" in err and "features.encoder" in err
    assert (folder / "results.json").read_bytes() == before


def test_an_interrupted_run_resumes_in_place_from_its_last_stage(data_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "fit_classifier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        go(data_dir, tmp_path)
    folder = tmp_path / "quick"
    assert not (folder / "results.json").exists() and (folder / "config.json").is_file()  # kept: stages finished
    monkeypatch.undo()
    res = go(data_dir, tmp_path, resume=folder)
    assert res["run_dir"] == str(folder)
    assert "dictionary" not in res["seconds"] and "features" not in res["seconds"] and "classifier" in res["seconds"]


def test_a_failed_run_leaves_no_folder(data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner_module, "learn_dictionary", broken)
    with pytest.raises(RuntimeError, match="boom"):
        go(data_dir, tmp_path)
    assert not (tmp_path / "quick").exists()
    monkeypatch.undo()
    with pytest.raises(DataError):  # missing data: no folder either
        go(tmp_path / "nowhere", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert go(data_dir, tmp_path)["run_dir"] == str(tmp_path / "quick")  # the name was not used up


def test_a_locked_folder_is_refused(data_dir, tmp_path):
    folder = tmp_path / "quick"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_dict(config())))  # an unfinished run of this config
    with RunLock(folder):  # as another process would hold it
        with pytest.raises(RunError, match=f"in use by another kmjax process \\(pid {os.getpid()}\\)"):
            go(data_dir, tmp_path, resume=folder)


def test_stage_keys_follow_the_version_and_the_data(data_dir, tmp_path, monkeypatch):
    first = go(data_dir, tmp_path / "a")
    other = tmp_path / "other-data"
    make_cifar(other, n=40, seed=7)
    changed_data = go(other, tmp_path / "b")
    assert changed_data["stage_keys"]["dictionary"] != first["stage_keys"]["dictionary"]
    monkeypatch.setattr(runner_module, "__version__", "9.9.9")
    changed_code = go(data_dir, tmp_path / "c")
    assert len({first["stage_keys"]["features"], changed_data["stage_keys"]["features"],
                changed_code["stage_keys"]["features"]}) == 3
    # a shared stage cache: a code change recomputes instead of reusing stale stages
    cache = tmp_path / "cache"
    monkeypatch.setattr(runner_module, "__version__", "0.2.0")
    go(data_dir, tmp_path / "d", cache=cache)
    monkeypatch.setattr(runner_module, "__version__", "9.9.9")
    assert "dictionary" in go(data_dir, tmp_path / "e", cache=cache)["seconds"]


def test_too_many_training_images_is_an_error(data_dir, tmp_path):
    with pytest.raises(DataError, match="data.n_train = 100 but data.train_batches = \\[1, 2\\] hold 80 images"):
        go(data_dir, tmp_path, "data.n_train=100")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "..", ""])
def test_run_names_are_plain_folder_names(name):
    with pytest.raises(ConfigError, match="not a plain folder name"):
        config(f"name='{name}'")


def test_not_enough_disk_space_is_said_before_the_features(data_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(RunError, match=r"has 0\.00 GB free, the features need .* \(\d+ bytes\)"):
        go(data_dir, tmp_path)


def test_a_full_disk_while_reserving_the_features_is_a_message(data_dir, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(RunError, match=r"no space left in .*stages for features\.train.*bytes"):
        go(data_dir, tmp_path)
    assert not list((tmp_path / "quick" / "stages").glob("*.partial"))


def test_an_unwritable_out_folder_is_a_message(data_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["run", "quick", "--data-dir", str(data_dir), "--out", str(blocker / "runs"), "-q"]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 2
    assert "cannot write in" in capsys.readouterr().err


def test_export_writes_features_labels_and_mirrors(data_dir, tmp_path, capsys):
    res = go(data_dir, tmp_path, "features.train_flip=true")
    out = tmp_path / "features.npz"
    assert main(["export", res["run_dir"], "--out", str(out)]) == 0
    meta = read_meta(out, kind="features")
    assert meta["config"]["features"]["train_flip"] is True
    with np.load(out) as z:
        train, labels, mirrored = z["train/features"], z["train/labels"], z["train/mirrored"]
        assert train.shape == (160, 4 * 8) and z["test/features"].shape == (40, 32)
        assert mirrored.sum() == 80 and mirrored[80:].all()
        np.testing.assert_array_equal(labels[:80], labels[80:])


def test_export_marks_the_mirrors_not_the_crops(data_dir, tmp_path):
    """Rows: the images, their mirrors, then the crops: only the mirrors are marked; with crops
    alone, none; with mirror sums (a flip-closed dictionary), none and no extra rows."""
    cases = {("features.train_flip=true", "features.train_crops=2", "classifier.loss=ridge"): (320, range(80, 160)),
             ("features.train_crops=1", "classifier.loss=ridge"): (160, range(0)),
             ("features.train_flip=true", "kmeans.flip_closed=true", "features.pool_size=15",
              "features.pool_stride=6", "classifier.loss=ridge"): (80, range(0))}
    for i, (extra, (rows, marked)) in enumerate(cases.items()):
        res = go(data_dir, tmp_path / str(i), *extra)
        out = export_features(res["run_dir"], tmp_path / f"f{i}.npz")
        with np.load(out) as z:
            assert z["train/features"].shape[0] == rows
            np.testing.assert_array_equal(np.flatnonzero(z["train/mirrored"]), np.array(marked, int))


def test_flip_closed_mirrors_come_free_and_predictions_are_mirror_invariant(data_dir, tmp_path, capsys):
    from kmjax.augment import mirror
    from kmjax.data import load_cifar10
    from kmjax.model import load, predict_images

    extra = ("kmeans.flip_closed=true", "features.train_flip=true", "features.test_flip=true",
             "features.pool_size=15", "features.pool_stride=6", "features.encoder=soft_threshold",
             "classifier.loss=ridge", "classifier.C_grid=[1,10]")
    res = go(data_dir, tmp_path, *extra)
    folder = Path(res["run_dir"])
    saved = StageStore(folder / "stages").load_arrays("features", res["stage_keys"]["features"], ["train", "test"])
    assert saved["train"].shape == (80, 9 * 2 * 8 // 2) and saved["test"].shape == (40, 72)  # pair sums, no mirrors
    model = load(folder / "model.npz")
    assert model.spec.mirror_sums and model.centroids.shape[0] == 8
    test = load_cifar10(data_dir, "test")
    np.testing.assert_array_equal(predict_images(model, test.images), predict_images(model, mirror(test.images)))
    assert main(["run", "quick", "--data-dir", str(data_dir), "--out", str(tmp_path / "q"), "--quiet",
                 *[f"--set={e}" for e in SMALL + ["kmeans.flip_closed=true", "features.train_flip=true"]]]) == 2
    assert "not mirror-symmetric" in capsys.readouterr().err  # the paper's quadrants
    with pytest.raises(ConfigError, match="even kmeans.k"):
        config("kmeans.flip_closed=true", "kmeans.k=7")


def test_features_keep_false_deletes_the_stage_files(data_dir, tmp_path):
    res = go(data_dir, tmp_path, "features.keep=false")
    folder = Path(res["run_dir"])
    assert not any("features" in name for name in stage_names(folder))
    assert "test_accuracy" in res
    with pytest.raises(RunError, match="features.keep = false"):
        export_features(folder, tmp_path / "x.npz")


def test_filters_are_redrawn_beside_the_run_not_over_it(data_dir, tmp_path, capsys):
    folder = Path(go(data_dir, tmp_path)["run_dir"])
    original = (folder / "filters.png").read_bytes()
    assert main(["filters", str(folder)]) == 0
    assert main(["filters", str(folder / "dictionary.npz")]) == 0
    assert (folder / "filters.png").read_bytes() == original
    assert (folder / "filters-redrawn.png").is_file() and (folder / "filters-redrawn-2.png").is_file()


def test_sweeps_resume(data_dir, tmp_path, monkeypatch):
    calls = []
    real = runner_module.fit_classifier

    def flaky(*args, **kwargs):
        calls.append(kwargs["C"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "fit_classifier", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep("quick", {"classifier.C": ["1", "10"]}, overrides=SMALL, data_dir=data_dir, out=tmp_path, quiet=True)
    folder = tmp_path / "quick-sweep"
    assert len(json.loads((folder / "sweep.json").read_text())) == 1  # the finished row was kept
    rows = sweep("quick", {"classifier.C": ["1", "10"]}, overrides=SMALL, data_dir=data_dir, out=tmp_path,
                 resume=folder, quiet=True)
    assert [r["classifier.C"] for r in rows] == [1, 10]
    assert calls == [1.0, 10.0, 10.0]  # the finished run was read back, not run again
    second = json.loads((Path(rows[1]["run_dir"]) / "results.json").read_text())
    assert "features" not in second["seconds"]  # the interrupted run kept its stages


def test_info_tells_the_truth_about_the_data_folder(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KMJAX_DATA_DIR", raising=False)
    assert main(["info", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "from --data-dir" in out and "will stop with an error" in out and "downloads" not in out
    assert main(["info", "--data-dir", str(data_dir)]) == 0
    assert "CIFAR-10 found" in capsys.readouterr().out
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["info"]) == 0
    assert "kmjax run downloads it" in capsys.readouterr().out


def test_cli_errors_name_cli_flags(tmp_path, capsys):
    assert main(["run", "quick", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "data_dir)" not in err


def test_shipped_configs_run_by_name(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    res = go(data_dir, tmp_path / "runs")
    assert res["name"] == "quick"
    with pytest.raises(ConfigError, match="ships no config of that name.*coates2011_triangle_1600"):
        load_config("no_such_config")


def test_classifier_stage_file_holds_its_report(data_dir, tmp_path):
    res = go(data_dir, tmp_path, "classifier.C_grid=[1,10]")
    store = StageStore(Path(res["run_dir"]) / "stages")
    tree, meta = store.load_tree("classifier", res["stage_keys"]["classifier"], templates.classifier_stage())
    assert meta["C"] == res["classifier"]["C"] and set(meta["scores"]) == {"1", "10"}
    assert tree["model"].weights.shape == (33, 10)


def test_provenance_names_the_kmjax_commit_only(tmp_path):
    import subprocess

    from kmjax.experiment.provenance import source_commit

    here = Path(__file__).resolve().parents[1]
    if (here / ".git").exists():
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert source_commit()["commit"] == head.strip()
    other = tmp_path / "someone-elses-repo"  # kmjax installed inside another project's repository
    (other / "kmjax").mkdir(parents=True)
    (other / "kmjax" / "__init__.py").write_text("")
    (other / "pyproject.toml").write_text('[project]\nname = "their-app"\n')
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    assert source_commit(other) is None


def test_stage_files_count_only_once_committed(tmp_path):
    store = StageStore(tmp_path / "stages")
    a = store.new_array("features", "k1", "train", (3, 2))
    a[:] = 1.0
    assert store.load_arrays("features", "k1", ["train"]) is None  # still .partial: an interrupted stage
    assert not store.any_finished()
    store.commit_arrays("features", "k1", {"train": a})
    assert not list((tmp_path / "stages").glob("*.partial"))
    np.testing.assert_array_equal(store.load_arrays("features", "k1", ["train"])["train"], np.ones((3, 2)))
    assert store.load_arrays("features", "k2", ["train"]) is None  # another key is another stage
    (tmp_path / "stages" / "features-k1.done").unlink()  # a marker-less stage is recomputed
    assert store.load_arrays("features", "k1", ["train"]) is None
    store.save_tree("dictionary", "k1", {"x": np.zeros(2)}, {"kind": "dictionary"})
    assert store.any_finished()


@pytest.mark.long
def test_bench_runs_from_the_package(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "features", "--k", "8", "--images", "8", "--repeats", "1", "--batch-wide-step", "8",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {r["variant"] for r in records} == {"default", "batch-wide"} and all(r["images_per_s"] > 0 for r in records)
    assert all(r["shape_bound_images_per_s"] > 0 and r["shape_rows"] == 2 * 729 for r in records)  # 2 images per product
    assert main(["bench", "kmeans", "--libs", "kmjax", "--problems", "", "--ks", "8", "--kn", "500", "--kd", "4",
                 "--iters", "1", "--repeats", "1", "--json", str(out)]) == 0
    timed = [r for r in json.loads(out.read_text()) if r["library"] == "kmjax"]
    assert len(timed) == 1 and 0 < timed[0]["fraction_of_shape"] < 10  # of the bound of its (chunk x 4) @ (4 x 8)


def test_a_run_compiles_each_function_once_and_a_rerun_nothing(data_dir, tmp_path):
    from collections import Counter

    from kmjax.experiment.report import CompileCounter

    extra = ["kmeans.k=11", "classifier.C_grid=[1,10]"]  # shapes no other test compiles
    start = CompileCounter.read()[1]
    first = go(data_dir, tmp_path, *extra)
    compiled = Counter(CompileCounter.compiled[start:])
    # train and test features, train and test evaluation: one compiled shape each, whatever the sizes
    for name in ("iterate", "finish", "batch_features", "raw_scores"):
        assert compiled[f"jit({name})"] == 1, compiled
    # the L-BFGS loop: one shape for the C search (the fitted part), one for the final fit
    assert compiled["jit(_lbfgs_iterate)"] == 2, compiled
    again = CompileCounter.read()[1]
    # a second run in the same process reuses every compiled program, with progress reports too
    # (they run the same programs in pieces: no new program, and the same bits)
    loud = run(config(*extra), data_dir=data_dir, out=tmp_path, quiet=False)
    assert CompileCounter.compiled[again:] == []
    assert (Path(loud["run_dir"]) / "model.npz").read_bytes() == (Path(first["run_dir"]) / "model.npz").read_bytes()


def test_more_devices_than_there_are_is_a_message(data_dir, tmp_path):
    import jax

    n = len(jax.local_devices())
    with pytest.raises(RunError, match=f"devices = {n + 1} but this process sees {n}"):
        go(data_dir, tmp_path, f"devices={n + 1}")
    assert list(tmp_path.iterdir()) == []


def test_run_splits_the_cpu_into_the_devices_its_config_asks_for(monkeypatch):
    """Before JAX starts, `kmjax run` sets XLA's CPU device count from the config's devices (0: one
    per core); a count already in XLA_FLAGS, one device, or a backend already started: unchanged."""
    import argparse

    from jax._src import xla_bridge

    from kmjax.cli import _split_cpu

    def flags_after(devices, flags="", started=False):
        monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: started)
        monkeypatch.setenv("XLA_FLAGS", flags)
        _split_cpu(argparse.Namespace(config="quick", set=[f"devices={devices}"]))
        return os.environ["XLA_FLAGS"]

    from kmjax.parallel import MAX_CPU_DEVICES

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = min(threads, MAX_CPU_DEVICES)
    assert flags_after(0, "--xla_foo=1") == ("--xla_foo=1" + (f" --xla_force_host_platform_device_count={count}"
                                                              if count > 1 else ""))
    assert flags_after(3) == "--xla_force_host_platform_device_count=3"
    assert flags_after(1) == ""
    assert flags_after(3, "--xla_force_host_platform_device_count=2") == "--xla_force_host_platform_device_count=2"
    assert flags_after(3, started=True) == ""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert flags_after(3) == ""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert flags_after(3) == "--xla_force_host_platform_device_count=3"


@pytest.mark.long
def test_run_on_two_devices_matches_one(data_dir, tmp_path):
    # kmjax run --devices 2 on a CPU split into two devices (in a fresh process: JAX fixes the count
    # when it starts): the same dictionary and features as one device, to float32 rounding
    import subprocess
    import sys

    args = ["run", "quick", "--data-dir", str(data_dir), "-q"] + [a for s in SMALL for a in ("--set", s)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, "-m", "kmjax.cli", *args, "--out", str(tmp_path / str(devices)),
                               "--devices", str(devices)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    one, two = (json.loads((tmp_path / d / "quick" / "results.json").read_text()) for d in ("1", "2"))
    assert two["config"]["devices"] == 2 and two["stage_keys"]["dictionary"] != one["stage_keys"]["dictionary"]
    np.testing.assert_allclose(two["kmeans"]["objective"], one["kmeans"]["objective"], rtol=1e-5)
    from kmjax.model import load

    a, b = (load(tmp_path / d / "quick" / "model.npz") for d in ("1", "2"))
    np.testing.assert_allclose(np.asarray(b.centroids), np.asarray(a.centroids), rtol=1e-4, atol=1e-4)
    store = {d: StageStore(tmp_path / d / "quick" / "stages") for d in ("1", "2")}
    fa = store["1"].load_arrays("features", one["stage_keys"]["features"], ["train"])["train"]
    fb = store["2"].load_arrays("features", two["stage_keys"]["features"], ["train"])["train"]
    np.testing.assert_allclose(fb, fa, rtol=1e-3, atol=1e-3)


def test_mirrored_test_images_and_the_cg_solver(data_dir, tmp_path):
    res = go(data_dir, tmp_path, "features.train_flip=true", "features.test_flip=true", "classifier.loss=ridge",
             "classifier.solver=cg", "classifier.rank=8", "classifier.C_grid=[1,10]")
    folder = Path(res["run_dir"])
    saved = StageStore(folder / "stages").load_arrays("features", res["stage_keys"]["features"],
                                                      ["test", "test_mirror"])
    assert saved["test_mirror"].shape == saved["test"].shape == (40, 32)
    assert not np.array_equal(saved["test_mirror"], saved["test"])
    from kmjax.classify import predict_features
    from kmjax.model import load

    model = load(folder / "model.npz")
    pred = predict_features(model.standardizer, model.classifier, saved["test"], mirrors=saved["test_mirror"])
    assert res["test_accuracy"] == float(np.mean(pred == np.asarray(
        StageStore(folder / "stages").load_arrays("features", res["stage_keys"]["features"], ["test_labels"])
        ["test_labels"])))
    assert set(res["C_validation"]) == {"1", "10"}
    out = tmp_path / "f.npz"
    export_features(folder, out)
    with np.load(out) as z:
        assert z["test/mirrored_features"].shape == (40, 32)


def test_random_crops_are_extra_training_copies(data_dir, tmp_path):
    res = go(data_dir, tmp_path, "features.train_flip=true", "features.train_crops=2", "classifier.loss=ridge",
             "classifier.C_grid=[1,10]", "features.test_flip=true")
    assert res["n_train"] == 80
    saved = StageStore(Path(res["run_dir"]) / "stages").load_arrays("features", res["stage_keys"]["features"],
                                                                    ["train", "train_labels"])
    train, labels = saved["train"], np.asarray(saved["train_labels"])
    assert train.shape == (4 * 80, 32)  # the images, their mirrors, two crops of each
    np.testing.assert_array_equal(labels.reshape(4, 80), np.tile(labels[:80], (4, 1)))
    assert not np.array_equal(train[160:240], train[240:])  # two different crops
    again = go(data_dir, tmp_path, "features.train_flip=true", "features.train_crops=2", "classifier.loss=ridge",
               "classifier.C_grid=[1,10]", "features.test_flip=true")
    assert (Path(again["run_dir"]) / "model.npz").read_bytes() == (Path(res["run_dir"]) / "model.npz").read_bytes()


def test_feature_arrays_resume_from_their_last_recorded_rows(tmp_path):
    store = StageStore(tmp_path / "stages")
    a, done = store.open_array("features", "k1", "train", (6, 2))
    assert done == 0
    a[:4] = 7.0
    store.mark_rows(a, 4)
    del a
    b, done = store.open_array("features", "k1", "train", (6, 2))
    assert done == 4
    np.testing.assert_array_equal(b[:4], 7.0)
    assert store.open_array("features", "k1", "train", (5, 2))[1] == 0  # another shape: started again
    assert store.open_array("features", "k2", "train", (6, 2))[1] == 0  # another stage key: its own file
    c, _ = store.open_array("features", "k1", "train", (6, 2))
    store.commit_arrays("features", "k1", {"train": c})
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == [
        "features-k1.done", "features.train-k1.npy", "features.train-k2.npy.partial"]


def test_an_interrupted_features_stage_resumes_after_its_last_segment(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_module, "_SEGMENT", 16)
    mark_rows, calls = StageStore.mark_rows, []

    def interrupted(self, a, rows):
        mark_rows(self, a, rows)
        calls.append(rows)
        if len(calls) == 2:  # 32 of the 80 training images written
            raise KeyboardInterrupt

    monkeypatch.setattr(StageStore, "mark_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        go(data_dir, tmp_path / "a")
    monkeypatch.setattr(StageStore, "mark_rows", mark_rows)
    extract, images = runner_module.extract_features, []

    def counted(x, *args, **kwargs):
        images.append(len(x))
        return extract(x, *args, **kwargs)

    monkeypatch.setattr(runner_module, "extract_features", counted)
    res = run(config(), data_dir=data_dir, out=tmp_path / "a", resume=tmp_path / "a" / "quick")
    assert "[features] train: resuming after 32 of 80 rows" in capsys.readouterr().err
    assert sum(images) == 48 + 40  # the rest of the training images, then the test images
    assert "features" in res["seconds"]
    folder = Path(res["run_dir"])
    assert not list((folder / "stages").glob("*.partial")) and not list((folder / "stages").glob("*.rows"))
    fresh = go(data_dir, tmp_path / "b")  # uninterrupted: the same features, the same model
    assert (folder / "model.npz").read_bytes() == (Path(fresh["run_dir"]) / "model.npz").read_bytes()


@pytest.mark.parametrize("solver", ["gram", "cg", "dual"])
def test_an_interrupted_ridge_fit_resumes_from_its_checkpoints(data_dir, tmp_path, monkeypatch, solver):
    from kmjax.classify import select

    extra = ["classifier.loss=ridge", f"classifier.solver={solver}", "classifier.rank=8", "classifier.C_grid=[1,10]"]
    search_C = select.search_C

    def interrupted(grid, score, log=None):
        search_C(grid, score, log)  # every C of the grid fitted (and, for CG, checkpointed), then a crash
        raise KeyboardInterrupt

    monkeypatch.setattr(select, "search_C", interrupted)
    with pytest.raises(KeyboardInterrupt):
        go(data_dir, tmp_path / "a", *extra)
    stages = tmp_path / "a" / "quick" / "stages"
    kept = sorted(p.name.rsplit("-", 1)[0] for p in stages.glob("classifier.*.npz"))
    assert kept == {"gram": ["classifier.gram"], "dual": ["classifier.kernel"],
                    "cg": ["classifier.cg-prep-search", "classifier.cg-search-C1", "classifier.cg-search-C10"]}[solver]
    monkeypatch.undo()
    gram_calls = []
    if solver in ("gram", "dual"):
        name = "gram_stats" if solver == "gram" else "accumulate_kernel"
        monkeypatch.setattr(select, name, lambda *a, **k: gram_calls.append(1))
    res = run(config(*extra), data_dir=data_dir, out=tmp_path / "a", resume=tmp_path / "a" / "quick", quiet=True)
    monkeypatch.undo()
    assert not gram_calls  # the Gram statistics were read back, not accumulated again
    assert not list(stages.glob("classifier.*.npz"))  # the checkpoints are gone with the finished stage
    fresh = go(data_dir, tmp_path / "b", *extra)
    if solver in ("gram", "dual"):  # the same statistics: the same model, byte for byte
        assert (stages.parent / "model.npz").read_bytes() == (Path(fresh["run_dir"]) / "model.npz").read_bytes()
    assert res["C_validation"] == fresh["C_validation"] and res["classifier"]["C"] == fresh["classifier"]["C"]
    assert abs(res["test_accuracy"] - fresh["test_accuracy"]) <= 1 / 40


def test_the_anonymous_memory_peak_sees_a_large_array():
    from kmjax.experiment.report import AnonMemoryPeak

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc: the peak is not sampled here")
    with AnonMemoryPeak(interval=0.01) as before:
        pass
    with AnonMemoryPeak(interval=0.01) as memory:
        a = np.ones(400 * 2**20 // 8)  # 400 MB of anonymous memory, held for a few samples
        import time

        time.sleep(0.1)
        del a
    assert memory.peak_mb >= before.peak_mb + 300


def test_cpu_model_names_the_matrix_extensions(tmp_path, monkeypatch):
    from kmjax.experiment import report

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    real = report.Path
    monkeypatch.setattr(report, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert report.cpu_model() == "Some CPU (avx512f, amx_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Plain CPU\nflags\t\t: fpu sse2\n")
    assert report.cpu_model() == "Plain CPU"


def test_an_interrupted_kmeans_resumes_from_its_saved_loop_state(data_dir, tmp_path, monkeypatch, capsys):
    # the k-means loop state is checkpointed as it runs (here after every iteration); a run killed in
    # the middle continues from the last saved iteration and ends with the model of an uninterrupted run
    whole = go(data_dir, tmp_path / "whole", "kmeans.max_iter=8")
    monkeypatch.setattr(runner_module, "_SAVE_KMEANS", -1.0)
    save, saved = StageCheckpoints.save, []

    def interrupted(self, name, tree):
        save(self, name, tree)
        saved.append(int(tree.it))
        if len(saved) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(StageCheckpoints, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        go(data_dir, tmp_path / "a", "kmeans.max_iter=8")
    assert saved == [1, 2, 3, 4]
    monkeypatch.setattr(StageCheckpoints, "save", save)
    iterations = []
    learn = runner_module.learn_dictionary
    monkeypatch.setattr(runner_module, "learn_dictionary",
                        lambda *a, progress=None, **kw: learn(*a, progress=lambda i, t, v: iterations.append(i), **kw))
    res = run(config("kmeans.max_iter=8"), data_dir=data_dir, out=tmp_path / "a", resume=tmp_path / "a" / "quick")
    assert "[dictionary] resuming from its saved kmeans" in capsys.readouterr().err
    assert iterations == [5, 6, 7, 8]  # from the fifth iteration on
    assert (Path(res["run_dir"]) / "model.npz").read_bytes() == (Path(whole["run_dir"]) / "model.npz").read_bytes()
    assert not list((Path(res["run_dir"]) / "stages").glob("dictionary.kmeans-*"))  # cleared once the stage is saved
