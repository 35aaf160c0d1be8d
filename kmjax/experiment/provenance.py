"""What a run records of the code and data that made it.

- ``start_record``: written when a run starts and again at each resume (``provenance.json`` in the
  run folder, and ``results.json``'s ``starts``): the command line, the time, the kmjax commit and
  whether the checkout had uncommitted changes, and the code id of each stage.
- ``stage_code``: a hash of the source of the code each stage runs (the modules its library entry
  point imports, followed through kmjax, plus the runner's own files), part of the stage keys: a
  resume after a change of that code computes the stage again instead of reusing what other code
  made.
- ``test_set``: whether a test set is the whole one, a part of it, or a stand-in that shares images
  with the training set, and the results key its accuracy goes under (only the whole, disjoint
  test set gives a ``test_accuracy``).
"""

from __future__ import annotations

import ast
import datetime
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np


__all__ = ["stage_code", "code_id", "start_record", "test_set", "TEST_KEYS", "test_accuracy_of"]

_PACKAGE = Path(__file__).resolve().parents[1]  # the kmjax folder

# Each stage: (library modules followed through their kmjax imports, runner files taken as they are:
# the runner's glue imports nearly everything, and following it would tie every stage to all code)
# (processes.py places rows and orders sums across processes: part of every stage)
_RUNNER = ["experiment/plan.py", "experiment/runner.py", "experiment/processes.py"]
_STAGES = {
    "dictionary": (["kmjax.dictionary", "kmjax.augment"], _RUNNER),
    "features": (["kmjax.features", "kmjax.augment", "kmjax.symmetry"], _RUNNER),
    "classifier": (["kmjax.classify"], _RUNNER + ["experiment/shared.py"]),
}


def source_commit(root: Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the kmjax source tree itself, when kmjax runs from a git checkout of
    kmjax (``root``: the folder above the package); None when it is installed anywhere else, even
    inside some other git repository."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    if not ((root / ".git").exists() and (root / "kmjax" / "__init__.py").is_file()
            and (root / "pyproject.toml").is_file() and 'name = "kmjax"' in (root / "pyproject.toml").read_text()):
        return None
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=5).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty} if commit else None


def _file(module: str) -> Path | None:
    """The source file of a kmjax module (a package: its ``__init__.py``), or None."""
    parts = module.split(".")[1:]
    path = _PACKAGE.joinpath(*parts)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports(path: Path) -> set[str]:
    """The kmjax modules a source file imports (``from kmjax.x import y`` is ``kmjax.x.y`` when that
    is a module, else ``kmjax.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kmjax")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kmjax" \
                and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if _file(sub) is not None else node.module)
    return found


def closure(modules) -> list[Path]:
    """The source files of ``modules`` and of every kmjax module they import, transitively (sorted)."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        path = _file(module)
        if module in seen or path is None:
            continue
        seen[module] = path
        todo.extend(_imports(path))
    return sorted(set(seen.values()))


def code_id(files) -> str:
    """A short hash of the contents of source files (named by their paths inside the package)."""
    h = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def stage_code() -> dict[str, str]:
    """{stage: code id} of the code each stage of a run executes (computed once per process)."""
    return {stage: code_id(closure(modules) + [_PACKAGE / f for f in files])
            for stage, (modules, files) in _STAGES.items()}


def start_record(code: dict[str, str]) -> dict:
    """What a run records each time it starts or resumes; ``code``: its ``stage_code()``."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv and sys.argv[0] else list(sys.argv),
        "cwd": os.getcwd(),
        "host": platform.node(),
        "git": source_commit(),
        "code": code,
    }


# the results key of a test accuracy, by the kind of test set it was measured on
TEST_KEYS = {"full": "test_accuracy", "partial": "partial_test_accuracy", "stand-in": "stand_in_test_accuracy"}
_STAND_IN = 0.01  # a test set with more than this fraction of its images among the training images


def _image_hashes(images) -> set[bytes]:
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return {hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in flat}


def test_set(test, train, complete: bool) -> dict:
    """What kind of test set ``test`` is: "full" (every image of the data set's test split, none of
    them a training image), "partial" (only the first images of it), or "stand-in" (more than 1%
    of its images are also training images: e.g. a training batch standing in for a missing test
    batch, as the device timing runs do). ``train``: the training images this process holds."""
    shared = len(_image_hashes(test.images) & _image_hashes(train.images))
    kind = "stand-in" if shared > _STAND_IN * len(test.images) else ("full" if complete else "partial")
    return {"kind": kind, "images": int(len(test.images)), "complete": bool(complete),
            "images_also_in_training": shared, "accuracy_key": TEST_KEYS[kind]}


def test_accuracy_of(results: dict) -> tuple[str, float] | None:
    """(kind of test set, accuracy) of a run's results, whichever kind it was measured on; None
    without a test set."""
    for kind, key in TEST_KEYS.items():
        if results.get(key) is not None:
            return kind, results[key]
    return None
