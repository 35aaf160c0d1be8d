"""What a run compiles (issue 27, item 3): results.json counts, per stage and in total, the XLA
programs built, how many of them were read from the persistent compile cache, and the seconds; the
quick config builds a known number of programs; a warm start (a new process, the same cache folder)
compiles none of them; a run that differs only in the sizes its stages pad away compiles nothing new."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kmjax.config import load_config
from kmjax.experiment import run
from synthetic_cifar import SMALL

STAGES = ("load", "dictionary", "features", "classifier", "evaluate")

# The programs `kmjax run quick` builds on the CPU on the small test data (SMALL on small_cifar),
# measured: 22 in the stages (dictionary 11, features 3, classifier 7, evaluate 1) and 11 between
# them (the seed's keys, arrays moved onto the device: templates, the fitted model). Most are tiny
# (jnp.asarray, a reduction). The bound is the measured count, with no margin, so that a change which
# builds one more program fails here and says so; lower it when a change builds fewer.
QUICK_PROGRAMS = 33

_CLI = "import sys; from kmjax.cli import main; sys.exit(main(sys.argv[1:]))"


def kmjax_run(data_dir: Path, out: Path, compile_cache: Path) -> dict:
    """``kmjax run quick`` of the small test config in a process of its own (so with nothing compiled
    in memory yet); its results.json."""
    sets = [arg for s in SMALL for arg in ("--set", s)]
    done = subprocess.run([sys.executable, "-c", _CLI, "run", "quick", *sets, "--data-dir", str(data_dir),
                           "--out", str(out), "--compile-cache", str(compile_cache)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from the compile cache" in done.stderr  # each stage's log line says what it compiled
    return json.loads((out / "quick" / "results.json").read_text())


@pytest.fixture(scope="module")
def cold_and_warm(small_cifar, tmp_path_factory):
    """The same run twice, one process after the other, sharing one compile-cache folder that starts empty."""
    root = tmp_path_factory.mktemp("compiles")
    cold = kmjax_run(small_cifar, root / "cold", root / "jit")
    warm = kmjax_run(small_cifar, root / "warm", root / "jit")
    return cold, warm


def check_record(compiles: dict) -> None:
    assert set(compiles) == {*STAGES, "total"}, compiles
    for name, c in compiles.items():
        assert set(c) == {"programs", "compiled", "from_cache", "seconds"}, name
        assert c["programs"] >= 0 and 0 <= c["from_cache"] <= c["programs"], (name, c)
        assert c["compiled"] == c["programs"] - c["from_cache"] and c["seconds"] >= 0, (name, c)
    # the total runs from the start of the run to its results: the work between the stages too
    assert compiles["total"]["programs"] >= sum(compiles[s]["programs"] for s in STAGES)


def test_a_cold_run_records_what_it_compiled_and_compiles_at_most_the_known_count(cold_and_warm):
    cold, _ = cold_and_warm
    compiles = cold["compiles"]
    check_record(compiles)
    assert cold["compile_seconds"] == {s: compiles[s]["seconds"] for s in STAGES}  # one measure, two views
    total = compiles["total"]
    assert total["from_cache"] == 0 and total["programs"] > 0 and total["seconds"] > 0  # an empty cache folder
    assert compiles["load"]["programs"] == 0  # reading the data compiles nothing
    for stage in ("dictionary", "features", "classifier", "evaluate"):
        assert compiles[stage]["programs"] > 0, stage
    if cold["environment"]["platform"] == "cpu":  # another backend builds other programs (e.g. Triton kernels)
        assert total["programs"] <= QUICK_PROGRAMS, compiles


def test_a_warm_start_reads_every_program_from_the_persistent_cache(cold_and_warm):
    cold, warm = cold_and_warm
    check_record(warm["compiles"])
    for name, c in warm["compiles"].items():
        assert c["compiled"] == 0 and c["from_cache"] == c["programs"], (name, warm["compiles"])
    assert warm["compiles"]["total"]["programs"] == cold["compiles"]["total"]["programs"]
    assert {s: c["programs"] for s, c in warm["compiles"].items()} == \
        {s: c["programs"] for s, c in cold["compiles"].items()}


def test_sizes_the_stages_pad_away_compile_nothing_new(small_cifar, tmp_path, monkeypatch):
    """The features are computed, and the evaluation scored, in blocks padded to a fixed number of
    rows: other numbers of images reuse their programs. The dictionary's patch sampling and the
    classifier's L-BFGS pad the training images and rows to a bucket (``kmjax._ops.bucket``: 76 and
    80 -> 80, 70 -> 72): within a bucket the dictionary builds nothing new, and the classifier only
    its two programs over the unpadded rows (the selection's ``standardize`` and train_linear's
    padding); in another bucket (70) the dictionary and classifier stages build theirs again. (Rows
    are padded as on an accelerator: a CPU does not pad them by default, see ``kmjax._ops.bucket``.)"""
    monkeypatch.setenv("KMJAX_BUCKET_ROWS", "1")
    def go(*extra):
        return run(load_config("quick", SMALL + list(extra)), data_dir=small_cifar, out=tmp_path, quiet=True)

    first = go()
    fewer_tests = go("data.n_test=30")
    assert (first["n_test"], fewer_tests["n_test"]) == (40, 30)
    assert fewer_tests["compiles"]["total"]["programs"] == 0, fewer_tests["compiles"]
    same_bucket = go("data.n_train=76")
    assert same_bucket["n_train"] == 76
    assert {s: c["programs"] for s, c in same_bucket["compiles"].items()} == \
        {"load": 0, "dictionary": 0, "features": 0, "classifier": 2, "evaluate": 0, "total": 2}, same_bucket["compiles"]
    fewer_train = go("data.n_train=70")
    assert (first["n_train"], fewer_train["n_train"]) == (80, 70)
    assert fewer_train["compiles"]["features"]["programs"] == 0, fewer_train["compiles"]
    assert fewer_train["compiles"]["evaluate"]["programs"] == 0, fewer_train["compiles"]
