"""Validation and test accuracy against C for a finished dual-ridge run, from its own stage files:
does the config's grid bracket the validation optimum, and how far does the test accuracy move
over what the validation set can resolve?

The run's training features, labels and test features are read from its stage folder (memory-
mapped); the N x N kernel is accumulated again, or read from ``--kernel`` (a saved kernel
checkpoint, ``classifier.kernel-KEY.npz``). Then, as ``fit_classifier`` does: the runner's
validation split (``jax.random.split(key(seed))[1]``), one factorization of the kernel shifted for
the grid's geometric middle with its rows ordered [fitted, held out], and for every C of the grid
conjugate-gradient solves on the fitted rows (scored on the held-out images) and on all rows; the
primal weights of every C come from one pass over the features (their alphas side by side), and
score the test set.

    python3 experiments/c_grid.py RUN_DIR --grid 3,10,20,30,50,100,200,300,1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from kmjax.checkpoint import load_tree
from kmjax.classify import DualFit, accumulate_kernel, dual_scores, empty_kernel_stats, factor_dual, fit_dual, primal_model
from kmjax.classify.linear import predict_features
from kmjax.classify.validation import validation_split
from kmjax.config import parse_config
from kmjax.experiment.plan import classifier_spec, training_copies
from kmjax.templates import fit_state


def _stage(run: Path, name: str):
    found = sorted((run / "stages").glob(f"features.{name}-*.npy"))
    if len(found) != 1:
        raise SystemExit(f"expected one stages/features.{name}-*.npy in {run}, found {len(found)}")
    return np.load(found[0], mmap_mode="r")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--grid", default="3,10,20,30,50,100,200,300,1000")
    p.add_argument("--kernel", type=Path, default=None, help="a saved kernel checkpoint of this run's features")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    grid = [float(c) for c in args.grid.split(",")]
    cfg = parse_config(json.loads((args.run / "config.json").read_text()))
    spec, copies = classifier_spec(cfg), training_copies(cfg)
    if spec.mirror_scoring:
        raise SystemExit("mirror scoring of held-out rows is not handled here (the flip-closed configs do not use it)")
    x, labels = _stage(args.run, "train"), np.asarray(_stage(args.run, "train_labels"))
    x_test, test_labels = _stage(args.run, "test"), np.asarray(_stage(args.run, "test_labels"))
    n, f = x.shape
    out = {"run": str(args.run), "config": cfg.name, "seed": cfg.seed, "rows": n, "features": f, "grid": grid}
    start = time.perf_counter()
    if args.kernel is not None:
        stats = load_tree(args.kernel, fit_state("kernel"), mmap=True, checksum=True)[0]
        if int(stats.columns) != f or stats.kernel.shape != (n, n):
            raise SystemExit(f"{args.kernel} is not the complete kernel of these features")
    else:
        stats = accumulate_kernel(empty_kernel_stats(n, f), x)
    out["kernel_s"] = round(time.perf_counter() - start, 1)
    print(f"kernel: {out['kernel_s']} s", flush=True)

    fit, val, scored = validation_split(n, jax.random.split(jax.random.key(cfg.seed))[1], val_fraction=spec.val_fraction,
                                        copies=copies)
    middle = float(np.sqrt(min(grid) * max(grid)))
    start = time.perf_counter()
    factor = factor_dual(stats, fit.size / (2.0 * middle), np.concatenate([fit, val]))
    out["factor_s"] = round(time.perf_counter() - start, 1)
    print(f"one factorization (at C = {middle:.3g}): {out['factor_s']} s", flush=True)

    rows, finals = [], []
    for C in grid:
        start = time.perf_counter()
        search = fit_dual(stats, labels, C, num_classes=10, rows=fit, factor=factor)
        val_acc = float(np.mean(np.argmax(dual_scores(stats, search, scored), axis=1) == labels[scored]))
        final = fit_dual(stats, labels, C, num_classes=10, factor=factor)
        finals.append(final)
        rows.append({"C": C, "validation_accuracy": val_acc, "cg_steps_search": search.iterations,
                     "cg_steps_final": final.iterations, "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    # every C's primal weights from one pass over the features: their alphas side by side (every final fit
    # solves over the factor's rows, in its order)
    assert all(np.array_equal(fi.rows, finals[0].rows) for fi in finals)
    together = DualFit(finals[0].rows, np.hstack([fi.alpha for fi in finals]), np.concatenate([fi.bias for fi in finals]), 0)
    start = time.perf_counter()
    std, model = primal_model(stats, together, x)
    weights = np.asarray(model.weights)
    for i, row in enumerate(rows):
        one = type(model)(jax.numpy.asarray(weights[:, 10 * i : 10 * (i + 1)]))
        row["test_accuracy"] = float(np.mean(predict_features(std, one, x_test) == test_labels))
    out["primal_and_test_s"] = round(time.perf_counter() - start, 1)
    out["by_C"] = rows
    best = max(rows, key=lambda r: (r["validation_accuracy"], -r["C"]))
    out["chosen_C"], out["chosen_test_accuracy"] = best["C"], best["test_accuracy"]
    out["validation_images"], out["test_images"] = int(scored.size), int(test_labels.size)
    for row in rows:
        print(f"C = {row['C']:>7g}: validation {row['validation_accuracy']:.4f}, test {row['test_accuracy']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
