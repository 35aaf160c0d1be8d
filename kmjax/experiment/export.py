"""``export_features``: a finished run's features and labels in one ``.npz``, for a classifier of one's own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kmjax.checkpoint import save_tree
from kmjax.config import parse_config
from kmjax.experiment.plan import feature_spec, mirror_sums, training_copies
from kmjax.experiment.store import RunError, StageStore

__all__ = ["export_features", "data_of"]


def data_of(run_dir) -> dict | None:
    """The data set a finished run read (results.json's "data"); None if not recorded."""
    try:
        return json.loads((Path(run_dir) / "results.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None


def export_features(run_dir, out) -> Path:
    """Write the features of a finished run, with their labels, to one ``.npz`` (``kmjax.checkpoint``
    layout): ``train/features`` (N, F) float32, ``train/labels``, ``train/mirrored`` (bool: the row is
    the mirror image of row i - n, n the number of images, with ``features.train_flip``; crops
    follow the mirrors and are not marked; with mirror sums no row is a mirror), and ``test/features``, ``test/labels`` when the run had a test
    set (and ``test/mirrored_features`` with ``features.test_flip``); its metadata holds the run's
    config and feature spec."""
    run_dir = Path(run_dir)
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        raise RunError(f"{run_dir} holds no finished run (no results.json); finish it first (kmjax run CONFIG "
                       f"--resume {run_dir})")
    try:
        results = json.loads(results_file.read_text())
        cfg = parse_config(results["config"])
        feature_key = results["stage_keys"]["features"] if cfg.features.enabled else None
    except (ValueError, KeyError, TypeError) as e:  # a damaged or hand-edited results.json
        raise RunError(f"{results_file} is unreadable or incomplete ({type(e).__name__}: {e}); rerun the "
                       "run's config") from None
    if not cfg.features.enabled:
        raise RunError(f"{run_dir} is a dictionary-only run (features.enabled = false): it has no features")
    store = StageStore(run_dir / "stages")
    names = ["train", "train_labels"] + (["test", "test_labels"] if results.get("n_test") else [])
    names += ["test_mirror"] if results.get("n_test") and cfg.features.test_flip and not mirror_sums(cfg) else []
    saved = store.load_arrays("features", feature_key, names)
    if saved is None:
        raise RunError(f"the features of {run_dir} are not kept (features.keep = false, or the stage files were "
                       f"deleted); recompute them with kmjax run CONFIG --set features.keep=true")
    n = len(saved["train_labels"])
    rows = np.arange(n)
    originals = n // training_copies(cfg)  # rows: the images, their mirrors (explicit train_flip), then the crops
    explicit_flip = cfg.features.train_flip and not mirror_sums(cfg)
    tree = {"train": {"features": saved["train"], "labels": saved["train_labels"],
                      "mirrored": (rows >= originals) & (rows < 2 * originals) if explicit_flip else np.zeros(n, bool)}}
    if "test" in saved:
        tree["test"] = {"features": saved["test"], "labels": saved["test_labels"]}
    if "test_mirror" in saved:
        tree["test"]["mirrored_features"] = saved["test_mirror"]
    meta = {"kind": "features", "config": results["config"], "spec": feature_spec(cfg)._asdict(),
            "run_dir": str(run_dir)}
    return save_tree(out, tree, meta)
