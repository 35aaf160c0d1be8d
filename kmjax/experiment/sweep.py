"""``sweep``: every combination of a grid of config values, one table and one plot.

The runs share one stage cache, so a stage that a grid key does not affect (the dictionary when
only the encoder changes, the features when only the classifier does) is computed once. A sweep
folder can be resumed: finished runs are kept as they are, unfinished ones continue.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
from pathlib import Path

import numpy as np

from kmjax import plots
from kmjax._io import atomic_write
from kmjax.config import ConfigError, load_config, parse_value
from kmjax.experiment.provenance import TEST_KEYS, test_accuracy_of
from kmjax.experiment.report import log
from kmjax.experiment import processes
from kmjax.experiment.runner import run
from kmjax.experiment.store import RunError, RunLock, new_run_dir, write_json

__all__ = ["sweep", "parse_grid", "fold_summary"]

# a run's test accuracy is under the key of its kind of test set (``provenance.TEST_KEYS``), named in "test_set"
_COLUMNS = ["train_accuracy", "test_set", *TEST_KEYS.values(), "seconds", "run_dir"]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["kmeans.k=100,200", "preprocess.whiten=true,false"]`` -> {"kmeans.k": ["100", "200"], ...}."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"grid {item!r} must look like section.key=value1,value2,...")
        key, values = item.split("=", 1)
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ConfigError(f"grid {item!r} lists no values")
    return grid


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=,+" else "_" for c in name)


def sweep(config_path, grid: dict[str, list], *, overrides: list[str] = (), data_dir=None,
          out: str | os.PathLike = "runs", resume: str | os.PathLike | None = None, quiet: bool = False,
          compile_cache=None) -> list[dict]:
    """Run every combination of ``grid`` values on top of a config; return one row per run.

    ``sweep.csv`` / ``sweep.json`` are rewritten after each run, so an interrupted sweep keeps every
    finished row; ``resume`` (the sweep folder) continues it: finished runs are read back, an
    interrupted one resumes from its last finished stage, the others run.
    """
    base = load_config(config_path, list(overrides))  # validate every combination before any work
    keys = list(grid)
    configs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        sets = list(overrides) + [f"{k}={v}" for k, v in zip(keys, combo)]
        configs.append((combo, load_config(config_path, sets + [f"name={_safe_name(base.name + '_' + label)}"])))
    main = processes.is_main()  # on several processes, the main one alone writes (kmjax.experiment.processes)
    if resume is None:
        sweep_dir = Path(processes.agree(str(new_run_dir(Path(out), f"{base.name}-sweep")) if main else None))
    else:
        sweep_dir = Path(resume)
        if main and not (sweep_dir / "cache").is_dir():
            raise RunError(f"{sweep_dir} is not a sweep folder (no cache/); pass the folder a sweep wrote")
    log(f"sweep folder: {sweep_dir} ({len(configs)} runs)", quiet or not main)
    rows = []
    with RunLock(sweep_dir) if main else contextlib.nullcontext():
        for i, (combo, cfg) in enumerate(configs):
            log(f"=== sweep run {i + 1}/{len(configs)}: {cfg.name}", quiet or not main)
            previous = sweep_dir / "runs" / cfg.name
            again = processes.agree(main and resume is not None and (previous / "config.json").is_file())
            res = run(cfg, data_dir=data_dir, out=sweep_dir / "runs", cache=sweep_dir / "cache", quiet=quiet,
                      compile_cache=compile_cache, resume=previous if again else None)
            rows.append({**dict(zip(keys, (parse_value(v) for v in combo))),
                         "train_accuracy": res.get("train_accuracy"),
                         "test_set": res.get("test_set", {}).get("kind"),
                         **{k: res[k] for k in TEST_KEYS.values() if k in res},
                         "seconds": res["seconds"]["total"], "run_dir": res["run_dir"]})
            if main:
                _write_sweep(sweep_dir, keys, rows)
    if main:
        plots.save_sweep(sweep_dir / "sweep.png", keys, rows)
        if FOLD in keys:
            write_json(sweep_dir / "folds.json", fold_summary(rows))
    return rows


FOLD = "data.fold"


def fold_summary(rows: list[dict]) -> list[dict]:
    """STL-10's protocol (Coates et al.): the test accuracy's mean and standard deviation over the
    folds of a ``data.fold`` grid, one entry per combination of the other grid keys (in the order
    of the rows). ``std`` is the sample standard deviation (n - 1; None for one fold); ``test_set``
    the kinds of test set measured ("full" for the whole test split)."""
    keys = [k for k in rows[0] if k not in _COLUMNS]
    groups: dict = {}
    for r in rows:
        tested = test_accuracy_of(r)
        if tested is not None and FOLD in r:
            settings = tuple((k, r[k]) for k in keys if k != FOLD)
            group = groups.setdefault(settings, {"folds": [], "acc": [], "kind": set()})
            group["folds"].append(r[FOLD])
            group["acc"].append(tested[1])
            group["kind"].add(tested[0])
    out = []
    for settings, g in groups.items():
        acc = np.asarray(g["acc"], np.float64)
        out.append({**dict(settings), "folds": g["folds"], "test_accuracies": g["acc"], "mean": float(acc.mean()),
                    "std": float(acc.std(ddof=1)) if len(acc) > 1 else None, "test_set": sorted(g["kind"])})
    return out


def _write_sweep(sweep_dir: Path, keys, rows) -> None:
    write_json(sweep_dir / "sweep.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys + _COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / "sweep.csv", lambda f: f.write(buf.getvalue().encode()))
