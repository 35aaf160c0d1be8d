"""Faults a real run meets (issue 26): a process killed with SIGKILL (no Python cleanup, no
``finally``, no atexit) in the middle of the features, the kernel, a factorization and a CG solve,
then ``--resume``: the same model, byte for byte, as an uninterrupted run; and a disk that fills
while a checkpoint is written: a clear error, no temporary left, the previous checkpoint intact.

The kills are of real ``kmjax run`` processes (``python -m kmjax.cli``; for the kernel, the same
CLI with a shorter checkpoint interval) on a synthetic CIFAR folder, each sized so that the stage it is killed in lasts a few seconds on 2 slow cores; the
moment is read from the stage folder (a ``.rows`` record, a checkpoint file) as it appears, and
checked afterwards from what the killed process left (so that a kill that came too early or too
late fails the test instead of passing it by accident)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kmjax import templates
from kmjax.checkpoint import load_tree
from synthetic_cifar import SMALL, make_cifar

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 1100  # per synthetic batch: 2,200 training images in batches 1 and 2
# the shipped quick config, made small except where a scenario makes its stage long
BASE = ["data.train_batches=[1,2]", "data.n_train=0", "patches.num=2000", "kmeans.k=8", "kmeans.max_iter=3",
        "classifier.max_iter=10", "features.grid=2"]
needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root, n=IMAGES)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # one compilation cache for every process of this module: each program is compiled once
    cache = os.environ.get("KMJAX_COMPILE_CACHE") or str(tmp_path_factory.mktemp("jit"))
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "KMJAX_COMPILE_CACHE": cache}


def command(data_dir, out, overrides, resume=None, before_main=""):
    """``kmjax run quick`` (``python -m kmjax.cli``), progress and log lines on; ``before_main``:
    Python run in that process before the CLI's ``main`` (a shorter checkpoint interval)."""
    args = ["run", "quick", "--data-dir", str(data_dir), "--out", str(out)]
    args += [a for s in BASE + list(overrides) for a in ("--set", s)]
    if resume is not None:
        args += ["--resume", str(resume)]
    if before_main:
        launcher = f"import sys\n{before_main}\nfrom kmjax.cli import main\nsys.exit(main(sys.argv[1:]))"
        return [sys.executable, "-c", launcher, *args]
    return [sys.executable, "-m", "kmjax.cli", *args]


def finish(cmd, env) -> str:
    """Run to the end; its stderr (the log)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def kill_when(cmd, env, logs: Path, ready, timeout: float = 300.0) -> str:
    """Start ``cmd``; as soon as ``ready(stderr so far)`` is true, SIGKILL it. Returns its stderr.

    Polled every 5 ms: the stages below last seconds. A process that ends before it was ready
    fails the test (its stage was too short to be killed in)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while True:
                text = (logs / "stderr").read_text(errors="replace")
                if ready(text):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                code = proc.poll()
                assert code is None, f"the run ended (exit code {code}) before it could be killed:\n{text[-4000:]}"
                assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{text[-4000:]}"
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return (logs / "stderr").read_text(errors="replace")


def exists(folder: Path, pattern: str):
    return lambda _log: folder.is_dir() and any(folder.glob(pattern))


def stage_files(stages: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in stages.glob(pattern))


def model_bytes(out: Path) -> bytes:
    return (out / "quick" / "model.npz").read_bytes()


def assert_resumed_cleanly(stages: Path):
    """What a finished, resumed run leaves: no record of unfinished work, no temporaries of the
    killed process (``atomic_write``'s ``.NAME.PID.tmp``, which a kill in a write leaves)."""
    assert not stage_files(stages, "*.partial") and not stage_files(stages, "*.rows")
    assert not stage_files(stages, "classifier.*.npz")  # the checkpoints go with the finished stage
    assert not stage_files(stages, ".*.tmp")


@needs_sigkill
@pytest.mark.long
def test_killed_in_the_features_resumes_after_its_last_recorded_rows(data_dir, env, tmp_path):
    # 2 x 2,200 training rows (the images and their mirrors): records after 2,048 and 4,096 rows
    extra = ["features.train_flip=true", "classifier.loss=ridge"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    stages = killed / "quick" / "stages"
    kill_when(command(data_dir, killed, extra), env, tmp_path / "logs", exists(stages, "features.train-*.npy.rows"))
    assert stage_files(stages, "features.train-*.npy.partial") and not stage_files(stages, "features-*.done")
    log = finish(command(data_dir, killed, extra, resume=killed / "quick"), env)
    assert re.search(r"\[features\] train: resuming after [1-9]\d* of 4400 rows", log), log
    assert "[dictionary] reusing" in log
    finish(command(data_dir, whole, extra), env)
    assert model_bytes(killed) == model_bytes(whole)
    assert_resumed_cleanly(stages)


@needs_sigkill
@pytest.mark.long
def test_killed_in_the_kernel_resumes_from_its_saved_columns(data_dir, env, tmp_path):
    # the dual solver (features wider than rows: 81 regions x 360 atoms = 29,160 features, 2,200
    # rows) grows the N x N kernel 16,384 columns at a time and checkpoints it every 10 minutes;
    # here after every 16,384 columns (select._SAVE_EVERY = 0), so that the kill, after the first
    # 16,384 columns are saved and while the last 12,776 are added, leaves a partial kernel to
    # resume from
    extra = ["kmeans.k=360", "features.grid=9", "data.n_test=100", "classifier.loss=ridge", "classifier.solver=dual",
             "classifier.C_grid=[1,10]"]
    shorter = "from kmjax.classify import select\nselect._SAVE_EVERY = 0.0"
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    stages = killed / "quick" / "stages"
    kill_when(command(data_dir, killed, extra, before_main=shorter), env, tmp_path / "logs",
              exists(stages, "classifier.kernel-*.npz"))
    [saved] = stages.glob("classifier.kernel-*.npz")
    kernel, _ = load_tree(saved, templates.fit_state("kernel"))
    assert int(kernel.columns) == 16384 and kernel.mean.shape == (29160,)  # killed half-way through the kernel
    assert not stage_files(stages, "classifier-*.npz")
    log = finish(command(data_dir, killed, extra, resume=killed / "quick", before_main=shorter), env)
    assert "[classifier] resuming from its saved kernel" in log and "[features] reusing" in log
    finish(command(data_dir, whole, extra), env)  # uninterrupted, with the runner's own interval
    assert model_bytes(killed) == model_bytes(whole)
    assert_resumed_cleanly(stages)


@needs_sigkill
@pytest.mark.long
def test_killed_in_a_factorization_resumes_from_the_saved_gram_matrix(data_dir, env, tmp_path):
    # 81 regions x 24 atoms = 1,944 features: one float32 Cholesky factorization of the 1,944 x
    # 1,944 Gram matrix per C of the grid, then the final one; the kill comes as the first starts
    extra = ["kmeans.k=24", "features.grid=9", "data.n_test=100", "classifier.loss=ridge", "classifier.solver=gram",
             "classifier.C_grid=[0.1,1,10,100]"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    stages = killed / "quick" / "stages"
    kill_when(command(data_dir, killed, extra), env, tmp_path / "logs", exists(stages, "classifier.gram-*.npz"))
    assert stage_files(stages, "classifier.gram-*.npz") and not stage_files(stages, "classifier-*.npz")
    log = finish(command(data_dir, killed, extra, resume=killed / "quick"), env)
    assert "[classifier] resuming from its saved gram" in log and "Gram:" not in log  # not accumulated again
    finish(command(data_dir, whole, extra), env)
    assert model_bytes(killed) == model_bytes(whole)
    assert_resumed_cleanly(stages)


@needs_sigkill
@pytest.mark.long
def test_killed_in_a_cg_solve_resumes_from_its_last_iteration(data_dir, env, tmp_path):
    # conjugate gradients on 1,944 features, checkpointed after every iteration: C = 1 (about 30
    # passes), then C = 10 (about 85, warm-started from C = 1's weights); the kill comes as soon
    # as C = 10's first iteration is saved, while its solve goes on
    extra = ["kmeans.k=24", "features.grid=9", "data.n_test=100", "classifier.loss=ridge", "classifier.solver=cg",
             "classifier.rank=8", "classifier.max_iter=300", "classifier.C_grid=[1,10]"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    stages = killed / "quick" / "stages"
    kill_when(command(data_dir, killed, extra), env, tmp_path / "logs",
              exists(stages, "classifier.cg-search-C10-*.npz"))
    assert not stage_files(stages, "classifier-*.npz")
    [first], [second] = ([load_tree(p, templates.fit_state("cg-search"))[0] for p in stages.glob(pattern)]
                         for pattern in ("classifier.cg-search-C1-*.npz", "classifier.cg-search-C10-*.npz"))
    assert first.relative.max() <= 1e-6  # C = 1 solved
    assert 0 < int(second.iterations) < 300 and second.relative.max() > 1e-6, \
        (int(second.iterations), float(second.relative.max()))  # C = 10 killed mid-solve
    log = finish(command(data_dir, killed, extra, resume=killed / "quick"), env)
    assert "[classifier] resuming from its saved cg-prep-search" in log
    assert "[classifier] resuming from its saved cg-search-C10" in log
    finish(command(data_dir, whole, extra), env)
    assert model_bytes(killed) == model_bytes(whole)
    assert_resumed_cleanly(stages)


SMALL_CG = SMALL + ["classifier.loss=ridge", "classifier.solver=cg", "classifier.rank=8", "classifier.max_iter=50",
                    "classifier.C_grid=[1,10]"]


def test_a_full_disk_in_a_checkpoint_write_is_a_message_and_keeps_the_previous_checkpoint(small_cifar, tmp_path,
                                                                                           monkeypatch, capsys):
    """In-process, through the CLI: once the CG solve has checkpointed its first iteration at C = 1,
    the next checkpoint write (its second iteration, over that file) runs out of space in the
    middle of the file (after its first member, inside its second), as a real ENOSPC from
    write(2) does: an OSError with no file name. Wanted: exit code 2 and a message that says the
    disk is full and where, no temporary left, the checkpoints already written intact, and a
    resume, once there is space, from them to the model of an uninterrupted run."""
    from kmjax.cli import main

    folder = tmp_path / "runs" / "quick"
    stages = folder / "stages"
    real_write = np.lib.format.write_array
    before, calls = {}, []

    def filling(fp, array, *args, **kwargs):
        if not before and stages.is_dir() and any(stages.glob("classifier.cg-search-C*.npz")):
            before.update({p.name: p.read_bytes() for p in stages.glob("classifier.*.npz")})  # the checkpoints so far
        if before:
            calls.append(1)
            if len(calls) == 2:  # the second member of the next file: part of it written, then the disk is full
                fp.write(b"\x93NUMPY\x01\x00" + b"\0" * 64)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", filling)
    args = ["run", "quick", "--data-dir", str(small_cifar), "--out", str(tmp_path / "runs")]
    args += [a for s in SMALL_CG for a in ("--set", s)]
    assert main(args + ["-q"]) == 2
    assert len(calls) == 2, "the checkpoint write was not reached"
    err = capsys.readouterr().err
    assert re.search(r"no space|disk is full|disk full", err, re.IGNORECASE), err
    # where: the stage folder (or the run folder), or the checkpoint being written
    assert str(folder) in err or str(folder.resolve()) in err or "classifier.cg-search" in err, err
    assert not stage_files(stages, ".*.tmp"), stage_files(stages, ".*")  # the failed write's temporary is gone
    assert (folder / "config.json").is_file() and not (folder / "results.json").exists()
    after = {p.name: p.read_bytes() for p in stages.glob("classifier.*.npz")}
    assert after == before  # the checkpoints written before: there, byte for byte (the one being replaced too)
    saved = {name.split(".", 1)[1].rsplit("-", 1)[0]: load_tree(stages / name, templates.fit_state(
        name.split(".", 1)[1].rsplit("-", 1)[0]))[0] for name in before}  # classifier.NAME-KEY.npz: they read back
    assert set(saved) == {"cg-prep-search", "cg-search-C1"}
    # C = 1 after one iteration, not converged: the write that failed was its second, over this file
    assert int(saved["cg-search-C1"].iterations) == 1 and saved["cg-search-C1"].relative.max() > 1e-6

    monkeypatch.undo()  # space freed: the run resumes from those checkpoints, to the model of a whole run
    assert main(args + ["--resume", str(folder)]) == 0
    assert "[classifier] resuming from its saved cg-search-C1" in capsys.readouterr().err
    assert main(["run", "quick", "--data-dir", str(small_cifar), "--out", str(tmp_path / "whole"), "-q",
                 *[a for s in SMALL_CG for a in ("--set", s)]]) == 0
    assert (folder / "model.npz").read_bytes() == (tmp_path / "whole" / "quick" / "model.npz").read_bytes()
