"""``kmjax run`` on several processes (``kmjax.experiment.processes``): two local processes with two
forced CPU devices each and a localhost coordinator give the run of one process with four devices,
and a process that dies stops the other within the heartbeat timeout, the run resumable; each
process holds only its share of the images, from which the patch sample and the crops of one
process are assembled. The watch: a hung process stops the one waiting for it within the hang
timeout, a process's death after its share leaves the main process's work alone, and the only
private JAX the package uses sits in two functions."""

from __future__ import annotations

import ast
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
    # its next collective fails, or the watch misses process 1's beats; kmjax says so
    assert "error in process 0 of 2" in err, "".join(lines) + err[-3000:]
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
    # process 1 left after its share (the kernel), and process 0 fitted and evaluated alone
    assert "process 1 of 2: its share of the run is done" in outs[1][1] and "[classifier]" not in outs[1][1]
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


# The watch (``processes.start``), with two real processes and no run: each shares one collective,
# then process 1 hangs, dies at the results barrier, or leaves; process 0 makes progress for 8 s (its
# fit: longer than the 4 s heartbeat timeout) and ends its share.

_WATCHED = """
import sys, time
from kmjax.experiment import processes

me, port, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
processes.start(f"localhost:{port}", 2, me, heartbeat_timeout=4, hang_timeout=3, leave_after_share=case == "leave")
processes.agree("the shared work")
if me == 1:
    if case == "hang":
        time.sleep(60)  # alive (its beats go on), no progress
    print("share done", flush=True)
    print("results:", processes.done_sharing(None), flush=True)
else:
    for _ in range(16):
        time.sleep(0.5)
        processes.beat()
    print("fitted", flush=True)
    print("results:", processes.done_sharing({"accuracy": 1.0}), flush=True)
"""


def _start_watched(tmp_path, case):
    script = tmp_path / "watched.py"
    script.write_text(_WATCHED)
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(script), str(i), str(port), case], env=_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]


@pytest.mark.long
def test_a_hung_process_stops_the_one_waiting_for_it(tmp_path):
    procs = _start_watched(tmp_path, "hang")
    out, err = procs[0].communicate(timeout=60)
    ended = time.monotonic()
    procs[1].communicate(timeout=30)  # it stops too: process 0 failed
    assert time.monotonic() - ended < 15
    assert "fitted" in out and "results" not in out, err[-3000:]  # at the barrier, within the hang timeout
    assert procs[0].returncode == 1 and "error in process 0 of 2: process 1 made no progress for" in err, err[-3000:]
    assert "--hang-timeout 3 s" in err and procs[1].returncode != 0


@pytest.mark.long
def test_a_death_at_the_results_barrier_leaves_the_main_process_s_work_alone(tmp_path):
    # a sweep's process 1 waits for process 0's results, and is killed there: process 0 finishes
    # its 8 s of work (JAX alone would stop it within the 4 s heartbeat timeout), then stops
    procs = _start_watched(tmp_path, "late")
    assert "share done\n" in iter(procs[1].stdout.readline, "")  # (Gloo prints to stdout too)
    time.sleep(1)  # at the barrier
    procs[1].send_signal(signal.SIGKILL)
    out, err = procs[0].communicate(timeout=60)
    procs[1].communicate()
    assert "fitted" in out and "results" not in out, err[-3000:]
    # the barrier was reached by both: the results' collective fails, or the watch stops it
    assert procs[0].returncode != 0 and ("Connection closed by peer" in err or "process 1 stopped answering" in err), \
        err[-3000:]


@pytest.mark.long
def test_in_kmjax_run_the_others_leave_after_their_share(tmp_path):
    procs = _start_watched(tmp_path, "leave")
    outs = [p.communicate(timeout=60) for p in procs]
    assert procs[1].returncode == 0 and "results" not in outs[1][0], outs[1][1][-3000:]
    assert "process 1 of 2: its share of the run is done; process 0 finishes the run" in outs[1][1]
    assert procs[0].returncode == 0 and "results: {'accuracy': 1.0}" in outs[0][0], outs[0][1][-3000:]


def test_the_watch_s_verdicts():
    # (key, "alive progress state") beats of processes 1 and 2, as process 0 reads them
    def beats(*states):
        return [(f"kmjax/beat/{q}", f"{a} {p} {s}") for q, (a, p, s) in enumerate(states, start=1)]

    def judge(t, entries, doing="work", stalled=False):
        return processes._verdict(entries, seen, t, doing, stalled, heartbeat=10, hang=100)

    seen = {1: (None, None, "work", 0.0, 0.0), 2: (None, None, "work", 0.0, 0.0)}
    assert judge(1, beats((1, 1, "work"), (1, 1, "work"))) is None
    # process 2 makes progress, process 1 beats without: a hang, once this process waits for it
    for t in range(2, 150, 2):
        assert judge(t, beats((t, 1, "work"), (t, t, "work"))) is None
    assert "process 1 made no progress for 149 s (--hang-timeout 100 s)" in judge(150, beats((150, 1, "work"),
                                                                                             (150, 150, "work")),
                                                                                    doing="wait")
    assert "nor did this process" in judge(151, beats((151, 1, "work"), (151, 151, "work")), stalled=True)
    assert judge(152, beats((152, 1, "barrier"), (152, 152, "work")), doing="barrier") is None  # it waits too
    # process 2 stops beating at a barrier: no matter while this process works; it stops at its own wait
    assert judge(170, beats((170, 1, "barrier"), (152, 152, "barrier"))) is None
    assert "process 2 stopped answering 18 s ago (--heartbeat-timeout 10 s)" in judge(
        170, beats((170, 1, "barrier"), (152, 152, "barrier")), doing="barrier")
    seen[2] = (None, None, "work", 0.0, 0.0)
    assert "process 2 stopped answering" in judge(20, [])  # never heard from
    assert judge(21, beats((171, 1, "barrier"), (153, 153, "left")), doing="barrier") is None  # it left
    assert "process 1 failed" in judge(22, beats((172, 1, "failed"), (153, 153, "left")))


def test_without_jax_s_client_the_barrier_is_a_device_collective(monkeypatch):
    import jax._src.distributed as private
    from jax.experimental import multihost_utils

    from kmjax._jax import distributed_client

    assert distributed_client() is None  # JAX's client: none before jax.distributed.initialize
    monkeypatch.delattr(private, "global_state")
    with pytest.raises(LookupError, match="global_state"):
        distributed_client()
    synced = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", synced.append)
    monkeypatch.setattr(processes, "count", lambda: 2)
    processes.wait_for_all("results")
    assert synced and synced[0].startswith("kmjax/barrier/results-")


def test_report_lines_are_progress(monkeypatch):
    from kmjax.experiment.report import log, progress

    before = processes._progress
    log("a line", quiet=True)
    assert processes._progress == before + 1
    assert progress("k-means", quiet=True) is None  # one process: no reporter, as always
    monkeypatch.setattr(processes, "watching", lambda: True)
    report = progress("k-means", quiet=True)  # several: a reporter that only beats
    report(1, 10)
    assert processes._progress == before + 2


# the only private JAX of the package, each behind one function with a fallback tested above and in
# tests/test_parallel.py (pyproject.toml bounds jax to the versions checked)
PRIVATE_JAX = {("kmjax/_jax.py", "distributed_client"), ("kmjax/_jax.py", "backends_started")}


def test_private_jax_only_inside_the_isolating_functions():
    found = set()
    for path in sorted((ROOT / "kmjax").rglob("*.py")):
        source = path.read_text()
        lines = [i for i, line in enumerate(source.splitlines(), start=1) if "jax._src" in line]
        if not lines:
            continue
        functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for i in lines:
            inside = [f.name for f in functions if f.lineno <= i <= f.end_lineno]
            where = (str(path.relative_to(ROOT)), inside[-1] if inside else None)
            assert where in PRIVATE_JAX, f"{where[0]}:{i} uses jax._src outside {sorted(PRIVATE_JAX)}"
            found.add(where)
    assert found == PRIVATE_JAX
