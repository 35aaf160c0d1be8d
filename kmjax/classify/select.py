"""Model selection: a held-out split of the training rows, C chosen on it, and the final fit.

``fit_classifier`` is the one entry point for all three classifiers: the L-BFGS ones ("svm",
"logistic") and ridge regression from streamed Gram statistics ("ridge"). With a ``C_grid`` it
picks C on a validation split of the training features (never the test set), then fits on all
of them.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from kmjax._checks import check_labels, choice, host_only, integer, number, positive_int
from kmjax.classify.linear import (LOSSES, STORAGES, LinearModel, Standardizer, fit_standardizer, predict_features, standardize,
                                   train_linear)
from kmjax.classify.cg import prepare_cg_ridge, solve_cg_ridge
from kmjax.classify.dual import (KernelStats, accumulate_kernel, dual_scores, empty_kernel_stats, fit_dual,
                                 kernel_memory, primal_model)
from kmjax.classify.ridge import accumulate_gram, fit_ridge, gram_stats

__all__ = ["CLASSIFIERS", "SOLVERS", "ClassifierFit", "validation_split", "search_C", "fit_classifier"]

CLASSIFIERS = (*LOSSES, "ridge")  # the ``loss`` names fit_classifier accepts
# how ridge is solved: exactly from the F x F Gram matrix ("gram") or the N x N kernel ("dual"), the
# smaller of the two ("auto"), or by conjugate gradients ("cg")
SOLVERS = ("auto", "gram", "dual", "cg")
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
    number(val_fraction, "val_fraction", above=0, below=1)
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise ValueError(f"holding out {n_val} of {n} images leaves none to fit; use more rows or a smaller "
                         "val_fraction")
    perm = np.asarray(jax.random.permutation(key, n))
    val, fit = (np.sort(np.concatenate([idx + j * n for j in range(copies)])) for idx in (perm[:n_val], perm[n_val:]))
    return fit, val, np.sort(perm[:n_val])


def _check_grid(grid) -> list[float]:
    grid = list(() if grid is None else grid)
    for C in grid:
        number(C, f"every C of C_grid {grid!r}", above=0)
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
    xf = standardize(std, features[fit]).astype(fit_args["storage"])
    score = _scorer(features, labels, scored, mirror)
    return search_C(C_grid, lambda C: score(std, train_linear(xf, labels[fit], C=C, **fit_args)[0]), log)


def _fit_lbfgs(features, labels, C, C_grid, split, fit_args, mirror, report, log) -> ClassifierFit:
    scores = {}
    if C_grid:
        C, scores = _lbfgs_search(features, labels, split, C_grid, fit_args, mirror, log)
    std = fit_standardizer(features)
    x = standardize(std, features).astype(fit_args["storage"])  # no float32 copy alive beside a bfloat16 one
    model, info = train_linear(x, labels, C=C, progress=report("L-BFGS", "iterations"), **fit_args)
    return ClassifierFit(std, model, float(C), scores, int(info.n_iter), float(info.loss), float(info.grad_norm))


class _States:
    """A fit's intermediate states: ``get(name)`` one saved by an interrupted fit (``resume``), and
    ``save(name, tree)``, which hands a state to ``checkpoint`` and returns what to go on with."""

    def __init__(self, resume, checkpoint):
        self.resume, self.checkpoint = resume, checkpoint

    def get(self, name):
        return None if self.resume is None else self.resume.get(name)

    def save(self, name, tree):
        if self.checkpoint is None:
            return tree
        kept = self.checkpoint(name, tree)
        return tree if kept is None else kept

    def once(self, name, compute):
        """The state saved under ``name``, or ``compute()`` saved there."""
        saved = self.get(name)
        return saved if saved is not None else self.save(name, compute())


def _fit_ridge(features, labels, num_classes, C, C_grid, split, mirror, report, log, states) -> ClassifierFit:
    rows = None if not C_grid else split[0]
    # the Gram matrix is most of the time of a ridge fit: kept, so that an interruption after it costs little
    stats = states.once("gram", lambda: gram_stats(features, labels, num_classes, rows=rows,
                                                   progress=report("Gram", "rows")))
    if not C_grid:
        return ClassifierFit(*fit_ridge(stats, C), float(C), {}, None, None, None)
    _, val, scored = split
    score = _scorer(features, labels, scored, mirror)
    best, scores = search_C(C_grid, lambda C: score(*fit_ridge(stats, C)), log)
    del score
    stats = accumulate_gram(stats, features, labels, rows=val)  # the held-out rows join the final fit
    return ClassifierFit(*fit_ridge(stats, best), best, scores, None, None, None)


def _fit_ridge_cg(features, labels, num_classes, C, C_grid, split, mirror, rank, max_iter, report, log, states):
    """The ridge objective by conjugate gradients (``cg.py``): for features too wide for the Gram
    matrix. The C search warm-starts each C from the previous one's weights. The set-up passes and
    each C's solver state (after every iteration) are checkpointed: an interrupted fit skips the
    set-up and continues each C where it stopped."""
    def solve(prep, C, init, name):
        std, model, info = solve_cg_ridge(prep, features, C, init=init, max_iter=max_iter, state=states.get(name),
                                          progress=report(f"CG at C = {C:g}", "passes"),
                                          checkpoint=lambda state: states.save(name, state))
        if log is not None:
            log(f"  C = {C:g}: {info['iterations']} passes, residual {info['residual']:.1e}"
                + ("" if info["converged"] else " (not converged: raise max_iter)"))
        return std, model, np.asarray(model.weights[:-1], np.float64)

    scores = {}
    if C_grid:
        fit, _, scored = split
        prep = states.once("cg-prep-search", lambda: prepare_cg_ridge(
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
    prep = states.once("cg-prep-final", lambda: prepare_cg_ridge(
        features, labels, num_classes, rank=rank, sketch=basis, progress=report("CG set-up", "passes")))
    std, model, _ = solve(prep, C, init, "cg-final")
    return ClassifierFit(std, model, float(C), scores, None, None, None)


def _fit_ridge_dual(features, labels, num_classes, C, C_grid, split, mirror, report, log, states):
    """Ridge from the N x N kernel (``dual.py``), grown over column blocks of the features and
    checkpointed as it grows (every ``_SAVE_EVERY`` seconds and when complete); each C of the grid
    is one factorization of the fitted rows' block, scored on the held-out rows' cross-kernel."""
    n, f = np.shape(features)
    if log is not None:
        log(f"  dual ridge ({f:,} features, {n:,} rows): a {n:,} x {n:,} float32 kernel and its factorization, "
            f"{kernel_memory(n) / 2**30:.1f} GB")
    stats = states.get("kernel")
    if stats is None or stats.kernel.shape != (n, n) or stats.mean.shape != (f,):
        stats = empty_kernel_stats(n, f)
    if int(stats.columns) < f:
        stats = KernelStats(*(np.array(a) for a in stats))  # writeable copies to grow
        reporter = report("kernel", "features")
        saved = time.monotonic()
        while int(stats.columns) < f:
            stats = accumulate_kernel(stats, features, until=int(stats.columns) + 4 * 4096, progress=reporter)
            if int(stats.columns) == f:
                # the complete kernel goes on as what the checkpoint gives back (the runner: a memory
                # map of its file, so that the solves hold one factorization, not the kernel too)
                stats = states.save("kernel", stats)
            elif time.monotonic() - saved > _SAVE_EVERY:
                states.save("kernel", stats)
                saved = time.monotonic()
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
                   solver: str = "auto", rank: int = 1024, mirror_scoring: bool = False, storage: str = "float32",
                   progress=None, log=None, resume=None, checkpoint=None) -> ClassifierFit:
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
      storage: the dtype L-BFGS holds the standardized features in, "float32" or "bfloat16"
        (half the bytes per iteration, float32 weights and products: see ``train_linear``).
      mirror_scoring: score each held-out image by the summed scores of the image and its mirror,
        the second copy (rows i + N/copies; as the runner's ``features.test_flip`` does on the test set).
      progress: optional factory ``progress(label, unit)`` returning None or a reporter
        ``report(done, total, value=None)``, asked for ("Gram", "rows"), ("L-BFGS", "iterations"), and
        the CG solver's set-up and passes.
      log: optional callable given one line of text per C tried.
      checkpoint: optional ``checkpoint(name, state)``, given a ridge fit's intermediate states as
        pytrees when they are reached, to persist them: its Gram statistics ("gram", a ``GramStats``)
        or its kernel ("kernel", a ``KernelStats``, also every 10 minutes as it grows), the CG
        solver's set-up ("cg-prep-search", "cg-prep-final") and each C's solver state after each
        iteration ("cg-search-C<C>", "cg-final"). It returns None or the state to go on with (e.g.
        the same values, memory-mapped from the file it wrote). ``kmjax.templates.fit_state(name)``
        is each state's file template.
      resume: optional mapping (``get(name)``) of the states an interrupted fit with the same
        arguments handed its ``checkpoint``; the fit resumes from them. The caller keys them by
        everything that determines the fit (the runner: the classifier stage key).

    Returns:
      ClassifierFit(standardizer, model, C, scores, n_iter, objective, grad_norm).
    """
    host_only("fit_classifier", "kmjax.train_linear (L-BFGS, with num_classes given)", features, labels, C)
    choice(loss, CLASSIFIERS, "loss")
    num_classes = integer(num_classes, "num_classes", minimum=2)
    number(C, "C", above=0)
    C_grid = _check_grid(C_grid)
    copies = positive_int(copies, "copies")
    max_iter = positive_int(max_iter, "max_iter")
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {shape}")
    labels = check_labels(labels, shape[0], num_classes)
    if shape[0] % copies:
        raise ValueError(f"{shape[0]} rows are not {copies} copies of the same images: copies must divide the rows")
    choice(solver, SOLVERS, "solver")
    choice(storage, STORAGES, "storage")
    if storage != "float32" and loss == "ridge":
        raise ValueError(f"storage {storage!r} is for the L-BFGS losses (svm, logistic); ridge accumulates its "
                         "statistics in float64 from the features as they are: leave storage at 'float32'")
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

    states = _States(resume, checkpoint)

    if solver == "auto":
        solver = "dual" if shape[1] > shape[0] else "gram"
    if loss == "ridge" and solver == "dual":
        return _fit_ridge_dual(features, labels, num_classes, C, C_grid, split, mirror, report, log, states)
    if loss == "ridge" and solver == "cg":
        return _fit_ridge_cg(features, labels, num_classes, C, C_grid, split, mirror, rank, max_iter, report, log,
                             states)
    if loss == "ridge":
        return _fit_ridge(features, labels, num_classes, C, C_grid, split, mirror, report, log, states)
    fit_args = dict(loss=loss, num_classes=num_classes, max_iter=max_iter, tol=tol, storage=storage)
    return _fit_lbfgs(features, labels, C, C_grid, split, fit_args, mirror, report, log)
