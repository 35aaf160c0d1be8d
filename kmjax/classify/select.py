"""Model selection: a held-out split of the training rows, C chosen on it, and the final fit.

``fit_classifier`` is the one entry point for all three classifiers: the L-BFGS ones ("svm",
"logistic") and ridge regression from streamed Gram statistics ("ridge"). With a ``C_grid`` it
picks C on a validation split of the training features (never the test set), then fits on all
of them.
"""

from __future__ import annotations

import numbers
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from kmjax._checks import host_only, positive_int
from kmjax.checkpoint import Slot
from kmjax.classify.linear import (LOSSES, LinearModel, Standardizer, fit_standardizer, predict_features, standardize,
                                   train_linear)
from kmjax.classify.cg import CGRidge, prepare_cg_ridge, solve_cg_ridge
from kmjax.classify.dual import (KernelStats, accumulate_kernel, dual_scores, empty_kernel_stats, fit_dual,
                                 kernel_memory, primal_model)
from kmjax.classify.ridge import GramStats, accumulate_gram, fit_ridge, gram_stats

__all__ = ["CLASSIFIERS", "SOLVERS", "ClassifierFit", "validation_split", "search_C", "fit_classifier"]

CLASSIFIERS = (*LOSSES, "ridge")  # the ``loss`` names fit_classifier accepts
# how ridge is solved: exactly from the F x F Gram matrix ("gram") or the N x N kernel ("dual"), the
# smaller of the two ("auto"), or by conjugate gradients ("cg")
SOLVERS = ("auto", "gram", "dual", "cg")
_KERNEL_LIKE = KernelStats(Slot(kind="i"), Slot("F"), Slot("F"), Slot("N", "N"))
_SAVE_EVERY = 600.0  # seconds between two checkpoints of a growing kernel


class ClassifierFit(NamedTuple):
    """What ``fit_classifier`` learned.

    standardizer, model: as ``fit_standardizer`` / ``train_linear`` give them (use with
    ``predict_features``). C: the C of the final fit. scores: {C: validation accuracy} over the
    grid, empty without one. n_iter, objective, grad_norm: L-BFGS iterations run, final objective
    and its gradient's norm; None for ridge (a direct solve).
    """

    standardizer: Standardizer
    model: LinearModel
    C: float
    scores: dict
    n_iter: int | None
    objective: float | None
    grad_norm: float | None


def validation_split(n_rows: int, key, *, val_fraction: float = 0.1, copies: int = 1):
    """(fit rows, held-out rows, held-out rows to score): sorted int indices into ``n_rows`` rows.

    With ``copies`` = 2, rows i and i + n (n = n_rows // 2) hold one image and its mirror: the
    split is by image, so that no image's mirror is fitted while the image itself is validated,
    and only the originals are scored. ``round(val_fraction * n)`` images (at least one) are held
    out, the first of ``jax.random.permutation(key, n)``.
    """
    host_only("validation_split", "jax.random.permutation", key)
    n_rows, copies = positive_int(n_rows, "n_rows"), positive_int(copies, "copies")
    if n_rows % copies:
        raise ValueError(f"{n_rows} rows are not {copies} copies of the same images: copies must divide the rows")
    n = n_rows // copies
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise ValueError(f"holding out {n_val} of {n} images leaves none to fit; use more rows or a smaller "
                         "val_fraction")
    perm = np.asarray(jax.random.permutation(key, n))
    val, fit = (np.sort(np.concatenate([idx + j * n for j in range(copies)])) for idx in (perm[:n_val], perm[n_val:]))
    return fit, val, np.sort(perm[:n_val])


def _check_grid(grid) -> list[float]:
    grid = list(() if grid is None else grid)
    if any(isinstance(C, (bool, np.bool_)) or not isinstance(C, numbers.Real) or not C > 0 for C in grid):
        raise ValueError(f"C_grid must hold numbers > 0, got {grid!r}")
    return grid


def search_C(grid, score: Callable[[float], float], log: Callable[[str], None] | None = None):
    """(best C, {C: score(C)}) over ``grid``, each C as a float; ties go to the stronger
    regularization (the smaller C). ``log``: optional callable given one line per C."""
    grid = _check_grid(grid)
    if not grid:
        raise ValueError("search_C needs at least one C in the grid")
    scores = {}
    for C in grid:
        scores[float(C)] = score(float(C))
        if log is not None:
            log(f"  C = {C:g}: validation accuracy {scores[float(C)]:.4f}")
    return max(scores, key=lambda C: (scores[C], -C)), scores


def _scorer(features, labels, scored, mirror_offset):
    """score(standardizer, model): accuracy on the held-out originals, with their mirrors' scores
    added when ``mirror_offset`` (rows i and i + mirror_offset are an image and its mirror)."""
    xv, yv = np.asarray(features[scored]), labels[scored]
    xm = None if mirror_offset is None else np.asarray(features[scored + mirror_offset])

    def score(std, model):
        return float(np.mean(predict_features(std, model, xv, mirrors=xm) == yv))

    return score


def _lbfgs_search(features, labels, split, C_grid, fit_args, mirror, log):
    # a function of its own: the standardized copy of the fitted part is freed before the final fit
    fit, _, scored = split
    std = fit_standardizer(features[fit])
    xf = standardize(std, features[fit])
    score = _scorer(features, labels, scored, mirror)
    return search_C(C_grid, lambda C: score(std, train_linear(xf, labels[fit], C=C, **fit_args)[0]), log)


def _fit_lbfgs(features, labels, C, C_grid, split, fit_args, mirror, report, log) -> ClassifierFit:
    scores = {}
    if C_grid:
        C, scores = _lbfgs_search(features, labels, split, C_grid, fit_args, mirror, log)
    std = fit_standardizer(features)
    model, info = train_linear(standardize(std, features), labels, C=C, progress=report("L-BFGS", "iterations"),
                               **fit_args)
    return ClassifierFit(std, model, float(C), scores, int(info.n_iter), float(info.loss), float(info.grad_norm))


def _checkpointed(checkpoints, name, like, compute):
    """``compute()``, or what ``checkpoints`` holds under ``name`` from an interrupted fit; saved
    there when computed."""
    saved = None if checkpoints is None else checkpoints.load(name, like)
    if saved is not None:
        return saved
    value = compute()
    if checkpoints is not None:
        checkpoints.save(name, value)
    return value


_CG_LIKE = CGRidge(Slot(None, kind="i"), Slot("F"), Slot("F"), Slot("F", "classes"), Slot("classes"), Slot("F", "rank"),
                   Slot("rank"))
_GRAM_LIKE = GramStats(Slot(), Slot("F"), Slot("F"), Slot("F", "F"), Slot("F", "classes"), Slot("classes"))


def _fit_ridge(features, labels, num_classes, C, C_grid, split, mirror, report, log, checkpoints) -> ClassifierFit:
    rows = None if not C_grid else split[0]
    # the Gram matrix is most of the time of a ridge fit: kept, so that an interruption after it costs little
    stats = _checkpointed(checkpoints, "gram", _GRAM_LIKE, lambda: gram_stats(
        features, labels, num_classes, rows=rows, progress=report("Gram", "rows")))
    if not C_grid:
        return ClassifierFit(*fit_ridge(stats, C), float(C), {}, None, None, None)
    _, val, scored = split
    score = _scorer(features, labels, scored, mirror)
    best, scores = search_C(C_grid, lambda C: score(*fit_ridge(stats, C)), log)
    del score
    accumulate_gram(stats, features, labels, rows=val)  # the held-out rows join the final fit
    return ClassifierFit(*fit_ridge(stats, best), best, scores, None, None, None)


def _fit_ridge_cg(features, labels, num_classes, C, C_grid, split, mirror, rank, max_iter, report, log, checkpoints):
    """The ridge objective by conjugate gradients (``cg.py``): for features too wide for the Gram
    matrix. The C search warm-starts each C from the previous one's weights. The set-up passes and
    each solution are checkpointed: an interrupted fit skips the set-up and restarts each C from
    its saved solution (a pass or two)."""
    def solve(prep, C, init, name):
        saved = None if checkpoints is None else checkpoints.load(name, Slot("F", "classes"))
        init = init if saved is None else saved
        std, model, info = solve_cg_ridge(prep, features, C, init=init, max_iter=max_iter,
                                          progress=report(f"CG at C = {C:g}", "passes"))
        if log is not None:
            log(f"  C = {C:g}: {info['iterations']} passes, residual {info['residual']:.1e}"
                + ("" if info["converged"] else " (not converged: raise classifier.max_iter)"))
        weights = np.asarray(model.weights[:-1], np.float64)
        if checkpoints is not None:
            checkpoints.save(name, weights)
        return std, model, weights

    scores = {}
    if C_grid:
        fit, _, scored = split
        prep = _checkpointed(checkpoints, "cg-prep-search", _CG_LIKE, lambda: prepare_cg_ridge(
            features, labels, num_classes, rows=fit, rank=rank, progress=report("CG set-up", "passes")))
        score = _scorer(features, labels, scored, mirror)
        weights = {}

        def fit_and_score(C):  # each C starts from the last one's weights
            init = list(weights.values())[-1] if weights else None
            std, model, weights[C] = solve(prep, C, init, f"cg-search-C{C:g}")
            return score(std, model)

        C, scores = search_C(sorted(C_grid), fit_and_score, log)  # small C first: the fastest to converge
        basis = prep.basis, prep.eigenvalues * (labels.shape[0] / fit.size)  # the sketch of the fitted rows, rescaled
        init = weights[C]
    else:
        basis, init = None, None
    prep = _checkpointed(checkpoints, "cg-prep-final", _CG_LIKE, lambda: prepare_cg_ridge(
        features, labels, num_classes, rank=rank, sketch=basis, progress=report("CG set-up", "passes")))
    std, model, _ = solve(prep, C, init, "cg-final")
    return ClassifierFit(std, model, float(C), scores, None, None, None)


def _fit_ridge_dual(features, labels, num_classes, C, C_grid, split, mirror, report, log, checkpoints):
    """Ridge from the N x N kernel (``dual.py``), grown over column blocks of the features and
    checkpointed as it grows (every ``_SAVE_EVERY`` seconds and when complete); each C of the grid
    is one factorization of the fitted rows' block, scored on the held-out rows' cross-kernel."""
    n, f = np.shape(features)
    if log is not None:
        log(f"  dual ridge ({f:,} features, {n:,} rows): a {n:,} x {n:,} float32 kernel and its factorization, "
            f"{kernel_memory(n) / 2**30:.1f} GB")
    # a saved kernel is mapped, not read: once complete, the solves read it through the page cache,
    # and the process holds only one factorization
    stats = None if checkpoints is None else checkpoints.load("kernel", _KERNEL_LIKE, mmap=True)
    if stats is None or stats.kernel.shape != (n, n) or stats.mean.shape != (f,):
        stats = empty_kernel_stats(n, f)
    if int(stats.columns) < f:
        stats = KernelStats(*(np.array(a) for a in stats))  # writeable copies to grow
        reporter = report("kernel", "features")
        saved = time.monotonic()
        while int(stats.columns) < f:
            accumulate_kernel(stats, features, until=int(stats.columns) + 4 * 4096, progress=reporter)
            if checkpoints is not None and (int(stats.columns) == f or time.monotonic() - saved > _SAVE_EVERY):
                checkpoints.save("kernel", stats)
                saved = time.monotonic()
        if checkpoints is not None:
            stats = checkpoints.load("kernel", _KERNEL_LIKE, mmap=True)
    scores = {}
    if C_grid:
        fit, _, scored = split

        def score(C):
            solution = fit_dual(stats, labels, C, num_classes=num_classes, rows=fit)
            s = dual_scores(stats, solution, scored)
            if mirror is not None:
                s += dual_scores(stats, solution, scored + mirror)
            return float(np.mean(np.argmax(s, axis=1) == labels[scored]))

        C, scores = search_C(C_grid, score, log)
    std, model = primal_model(stats, fit_dual(stats, labels, C, num_classes=num_classes), features)
    return ClassifierFit(std, model, float(C), scores, None, None, None)


def fit_classifier(features, labels, *, num_classes: int, loss: str = "svm", C: float = 100.0, C_grid=(),
                   val_fraction: float = 0.1, key=None, copies: int = 1, max_iter: int = 1000, tol: float = 1e-3,
                   solver: str = "auto", rank: int = 1024, mirror_scoring: bool = False,
                   progress=None, log=None, checkpoints=None) -> ClassifierFit:
    """Fit a linear classifier to raw (N, F) features, choosing C on a held-out split if asked.

    Args:
      features: (N, F) array-like (a ``np.memmap`` works; ridge reads it in blocks, never whole).
      labels: (N,) int class indices in [0, num_classes).
      num_classes: number of classes (>= 2).
      loss: "svm" (one-vs-all squared hinge) or "logistic" (softmax cross-entropy), both trained
        with L-BFGS on standardized features; or "ridge" (least squares, from the Gram matrix).
      C: weight of the data term against 1/2 ||W||^2, used when ``C_grid`` is empty.
      C_grid: Cs to try: each is fitted on the rows ``validation_split`` keeps for fitting and
        scored on its held-out originals; the best (ties: the smaller C) is refitted on all rows.
      val_fraction, copies: as for ``validation_split`` (copies = 2: rows i and i + N/2 are an
        image and its mirror). key: a ``jax.random`` key for the split, required with a grid.
      max_iter, tol: L-BFGS iterations at most, and the gradient norm to stop at; for ridge with
        the "cg" solver, max_iter caps the passes over the features.
      solver: for ridge, "gram" (the exact solve from the F x F Gram matrix: up to ~36,000
        features in 20 GB), "dual" (the exact solve from the N x N kernel, ``kmjax.classify.dual``:
        any width, up to ~50,000 rows in 20 GB), "auto" (the smaller of the two: "dual" when F > N)
        or "cg" (conjugate gradients over the features on disk, a rank-``rank`` Nystrom
        preconditioner, ``kmjax.classify.cg``).
      mirror_scoring: score each held-out image by the summed scores of the image and its mirror,
        the second copy (rows i + N/copies; as the runner's ``features.test_flip`` does on the test set).
      progress: optional factory ``progress(label, unit)`` returning None or a reporter
        ``report(done, total, value=None)``, asked for ("Gram", "rows"), ("L-BFGS", "iterations"), and
        the CG solver's set-up and passes.
      log: optional callable given one line of text per C tried.
      checkpoints: optional store of a ridge fit's intermediate results, so that an interrupted
        fit resumes: an object with ``load(name, like, mmap=False)`` (the tree saved under ``name``,
        in the structure of the ``kmjax.checkpoint.Slot`` template ``like``, its arrays read-only
        memmaps with ``mmap``; or None) and ``save(name, tree)``. Ridge keeps its Gram statistics
        ("gram") or its kernel ("kernel"), the CG solver its set-up and each C's weights. The caller
        keys it by everything that determines the fit (the runner: the classifier stage key).

    Returns:
      ClassifierFit(standardizer, model, C, scores, n_iter, objective, grad_norm).
    """
    host_only("fit_classifier", "kmjax.train_linear (L-BFGS, with num_classes given)", features, labels, C)
    if loss not in CLASSIFIERS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {CLASSIFIERS}")
    num_classes = positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(C, (bool, np.bool_)) or not isinstance(C, numbers.Real) or not C > 0:
        raise ValueError(f"C must be a number > 0, got {C!r}")
    C_grid = _check_grid(C_grid)
    copies = positive_int(copies, "copies")
    max_iter = positive_int(max_iter, "max_iter")
    labels = np.asarray(labels)
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {shape}")
    if labels.shape != (shape[0],):
        raise ValueError(f"features are {shape} but labels {labels.shape}: one label per row")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    if shape[0] % copies:
        raise ValueError(f"{shape[0]} rows are not {copies} copies of the same images: copies must divide the rows")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if solver not in ("auto", "gram") and loss != "ridge":
        raise ValueError(f"solver {solver!r} is for loss='ridge'; the {loss} loss is trained with L-BFGS")
    if mirror_scoring and copies < 2:
        raise ValueError("mirror_scoring needs the mirrored rows: copies >= 2 (rows i and i + N/copies)")
    mirror = shape[0] // copies if mirror_scoring else None
    split = None
    if C_grid:
        if key is None:
            raise ValueError("choosing C from C_grid needs a jax.random key for the validation split: pass key=")
        split = validation_split(shape[0], key, val_fraction=val_fraction, copies=copies)

    def report(label, unit):
        return None if progress is None else progress(label, unit)

    if solver == "auto":
        solver = "dual" if shape[1] > shape[0] else "gram"
    if loss == "ridge" and solver == "dual":
        return _fit_ridge_dual(features, labels, num_classes, C, C_grid, split, mirror, report, log, checkpoints)
    if loss == "ridge" and solver == "cg":
        return _fit_ridge_cg(features, labels, num_classes, C, C_grid, split, mirror, rank, max_iter, report, log,
                             checkpoints)
    if loss == "ridge":
        return _fit_ridge(features, labels, num_classes, C, C_grid, split, mirror, report, log, checkpoints)
    fit_args = dict(loss=loss, num_classes=num_classes, max_iter=max_iter, tol=tol)
    return _fit_lbfgs(features, labels, C, C_grid, split, fit_args, mirror, report, log)
