"""``kmjax run`` on several processes (``kmjax.experiment.processes``): two local processes with two
forced CPU devices each and a localhost coordinator give the run of one process with four devices,
and a process that dies stops the other within the heartbeat timeout, the run resumable; each
process holds only its share of the images, from which the patch sample and the crops of one
process are assembled."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from kmjax.augment import random_crops
from kmjax.config import load_config
from kmjax.dictionary import patch_key
from kmjax.experiment import processes
from kmjax.experiment.plan import data_ids, dictionary_patches, load_data
from kmjax.experiment.store import data_id
from kmjax.patches import extract_patches, sample_patches
from synthetic_cifar import make_cifar

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.train_batches=[1,2]", "data.n_train=0", "data.n_test=0", "patches.num=20000", "kmeans.k=16", "kmeans.max_iter=25",
        "classifier.loss=ridge", "classifier.C_grid=[1,10]", "features.grid=2",
        "features.train_flip=true", "features.train_crops=1"]  # 64 features, 240 rows: the Gram solver
HEARTBEAT = 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root, n=40)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(data_dir, out, *extra):
    sets = [a for s in SETS for a in ("--set", s)]
    return [sys.executable, "-m", "kmjax.cli", "run", "quick", *sets, "--data-dir", str(data_dir), "--out", str(out),
            "--compile-cache", "off", *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def _start_two(data_dir, out, *extra):
    port = _free_port()
    return [subprocess.Popen(_command(data_dir, out, "--devices", "2", "--coordinator", f"localhost:{port}",
                                      "--num-processes", "2", "--process-id", str(i), "--heartbeat-timeout",
                                      str(HEARTBEAT), *extra),
                             env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (0, 1)]


def _model(run_dir):
    with np.load(Path(run_dir) / "model.npz") as f:
        return {k: f[k] for k in f.files if f[k].dtype.kind == "f"}


@pytest.mark.long
def test_two_processes_run_what_one_process_runs_and_survive_a_death(data_dir, tmp_path):
    one = subprocess.run(_command(data_dir, tmp_path / "one", "--devices", "4", "-q"), env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = json.loads((tmp_path / "one" / "quick" / "results.json").read_text())

    # process 1 dies as the features start: process 0 stops within the heartbeat timeout, saying why
    procs = _start_two(data_dir, tmp_path / "two")
    lines = []
    for line in procs[0].stderr:  # process 0's progress
        lines.append(line)
        if "[features]" in line:  # the dictionary is saved; the features need both processes
            break
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    err = procs[0].communicate(timeout=HEARTBEAT + 60)[1]
    assert procs[0].returncode != 0 and time.monotonic() - killed < HEARTBEAT + 30
    # JAX stops it on the missing heartbeats, or its next collective fails and kmjax says so
    assert "another task died" in err or "error in process 0 of 2" in err, "".join(lines) + err[-3000:]
    procs[1].communicate()
    run_dir = tmp_path / "two" / "quick"
    assert (run_dir / "config.json").is_file() and not (run_dir / "results.json").exists()
    assert not list((tmp_path / "two").glob("quick-*"))  # process 1 wrote nothing

    # the same command on both with --resume finishes the run: the results of one process with 4 devices
    procs = _start_two(data_dir, tmp_path / "two", "--resume", str(run_dir))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "train accuracy" in outs[0][0] and "accuracy" not in outs[1][0]  # one summary
    assert "[dictionary] reusing" in outs[0][1]
    assert "Gram statistics of 216 rows, summed over 2 processes" in outs[0][1]  # the fitted 90%, 3 copies each
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stage_keys"] == reference["stage_keys"]  # 4 devices in both: the same experiment
    assert results["train_accuracy"] == reference["train_accuracy"]
    assert results["kmeans"]["n_iter"] == reference["kmeans"]["n_iter"]
    np.testing.assert_allclose(results["kmeans"]["objective"], reference["kmeans"]["objective"], rtol=1e-5)
    a, b = _model(run_dir), _model(tmp_path / "one" / "quick")
    for name in b:  # sums added across processes in another order: float32 rounding apart
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-4 * max(1.0, float(np.abs(b[name]).max())),
                                   err_msg=name)


@pytest.mark.long
def test_two_processes_share_the_dual_kernel_by_columns(data_dir, tmp_path):
    # ridge from the N x N kernel: each process adds the kernel of half the feature columns
    dual = ("--set", "classifier.solver=dual")
    one = subprocess.run(_command(data_dir, tmp_path / "one", "--devices", "4", "-q", *dual), env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    procs = _start_two(data_dir, tmp_path / "two", *dual)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "240 x 240 kernel of 64 features, their columns shared by 2 processes" in outs[0][1]
    reference = json.loads((tmp_path / "one" / "quick" / "results.json").read_text())
    results = json.loads((tmp_path / "two" / "quick" / "results.json").read_text())
    assert results["train_accuracy"] == reference["train_accuracy"]
    assert results["C_validation"] == reference["C_validation"]
    a, b = _model(tmp_path / "two" / "quick"), _model(tmp_path / "one" / "quick")
    for name in b:  # the kernel's float32 sums in another order
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-4 * max(1.0, float(np.abs(b[name]).max())),
                                   err_msg=name)


@pytest.mark.long
def test_a_failing_main_process_stops_the_others(data_dir, tmp_path):
    # process 0 refuses the run (its --resume folder is not a run folder): process 1, waiting for its
    # decision, stops within the heartbeat timeout, and neither leaves a run folder behind
    procs = _start_two(data_dir, tmp_path, "--resume", str(tmp_path / "nothing"))
    start = time.monotonic()
    outs = [p.communicate(timeout=HEARTBEAT + 90) for p in procs]
    assert time.monotonic() - start < HEARTBEAT + 60
    assert procs[0].returncode == 2 and "is not a run folder" in outs[0][1]
    assert procs[1].returncode != 0
    assert not any(tmp_path.iterdir())


# Each process's share, checked in one process by standing in for process p of P: the index
# arithmetic of the loading, the patch sample and the crops, without starting processes.

def _as_process(monkeypatch, p, count):
    monkeypatch.setattr(processes, "count", lambda: count)
    monkeypatch.setattr(processes, "index", lambda: p)
    monkeypatch.setattr(processes, "is_main", lambda: p == 0)
    monkeypatch.setattr(processes, "agree", lambda value: value)


def test_each_process_holds_only_its_share_of_the_images(data_dir, monkeypatch):
    # 70 training images of two 40-image batches: the second batch cut short
    cfg = load_config("quick", ["data.train_batches=[1,2]", "data.n_train=70", "data.n_test=0"])
    train, test = load_data(cfg, data_dir)
    ids = data_ids(cfg, data_dir, train, test)
    assert train.images.shape[0] == 70 and test.images.shape[0] == 40
    for p in range(3):
        _as_process(monkeypatch, p, 3)
        mine, mine_test = load_data(cfg, data_dir)
        np.testing.assert_array_equal(mine.images, train.images[p::3])  # every third image, from its index
        np.testing.assert_array_equal(mine_test.images, test.images[p::3])
        np.testing.assert_array_equal(mine.labels, train.labels)  # and every label
        if p == 0:  # the main process's ids of the whole sets, read again batch by batch
            assert data_ids(cfg, data_dir, mine, mine_test) == ids


def test_the_patch_sample_and_the_crops_assembled_from_the_shares_are_one_process_s(data_dir, monkeypatch):
    for sampling in ("random", "grid"):
        monkeypatch.undo()  # one process again
        cfg = load_config("quick", ["data.train_batches=[1]", "data.n_train=0", "data.n_test=-1", "patches.num=1000",
                                    f"patches.sampling={sampling!r}", "patches.stride=5"])
        train, _ = load_data(cfg, data_dir)
        key = jax.random.key(3)
        parts = {}
        for p in range(3):
            _as_process(monkeypatch, p, 3)
            monkeypatch.setattr(processes, "gather_rows", lambda local, owners, everywhere, p=p:
                                parts.setdefault(p, (local, owners)))
            dictionary_patches(cfg, key, train._replace(images=train.images[p::3]))
        owners = parts[0][1]
        assembled = np.zeros((owners.size,) + parts[0][0].shape[1:], parts[0][0].dtype)
        for p, (local, o) in parts.items():
            np.testing.assert_array_equal(o, owners)
            assembled[owners == p] = local
        if sampling == "random":
            expected = sample_patches(patch_key(key), train.images, 1000, cfg.patches.size)
        else:
            expected = extract_patches(train.images, cfg.patches.size, 5).reshape(-1, assembled.shape[1])
        np.testing.assert_array_equal(assembled, expected)
    crops = random_crops(key, train.images)
    for p in range(3):
        np.testing.assert_array_equal(random_crops(key, train.images[p::3], among=(np.arange(40)[p::3], 40)),
                                      crops[p::3])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\)"):
        random_crops(key, train.images[:2], among=(np.array([0, 40]), 40))
    # the whole set's id from its batches, one at a time; pieces short of the declared shape are refused
    assert data_id((np.uint8, train.images.shape, np.split(train.images, 4))) == data_id(train.images)
    with pytest.raises(ValueError, match="hold"):
        data_id((np.uint8, train.images.shape, [train.images[:10]]))
