"""Model selection: a held-out split of the training rows, C chosen on it, and the final fit.

``fit_classifier`` is the one entry point for all three classifiers: the L-BFGS ones ("svm",
"logistic") and ridge regression from streamed Gram statistics ("ridge"). With a ``C_grid`` it
picks C on a validation split of the training features (never the test set), then fits on all
of them.
"""

from __future__ import annotations

import functools
import operator
import time
from typing import NamedTuple

import jax
import numpy as np

from kmjax._checks import check_labels, choice, host_only, integer, number, positive_int
from kmjax.errors import InputError
from kmjax.classify.linear import (LOSSES, STORAGES, LinearModel, Standardizer, fit_standardizer, predict_features, standardize,
                                   train_linear)
from kmjax.classify.cg import prepare_cg_ridge, solve_cg_ridge
from kmjax.classify import device, tiled
from kmjax.classify.dual import (accumulate_kernel, dual_scores, empty_kernel_stats, factor_dual, fit_dual, kernel_memory,
                                 primal_model)
from kmjax.classify.ridge import accumulate_gram, fit_ridge, gram_stats
from kmjax.classify.spec import ClassifierSpec, ClassifierState
from kmjax.classify.validation import check_grid, search_C, validation_split

__all__ = ["CLASSIFIERS", "SOLVERS", "ClassifierSpec", "ClassifierState", "ClassifierFit", "validation_split", "search_C",
           "fit_classifier"]

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


def _scorer(features, labels, scored, mirror_offset):
    """score(standardizer, model): accuracy on the held-out originals, with their mirrors' scores
    added when ``mirror_offset`` (rows i and i + mirror_offset are an image and its mirror)."""
    xv, yv = np.asarray(features[scored]), labels[scored]
    xm = None if mirror_offset is None else np.asarray(features[scored + mirror_offset])

    def score(std, model):
        return float(np.mean(predict_features(std, model, xv, mirrors=xm) == yv))

    return score


class _Run:
    """What the solver paths of one ``fit_classifier`` share: its data, spec and split, the state it
    stands at, and its callbacks."""

    def __init__(self, features, labels, num_classes, spec: ClassifierSpec, split, mirror, progress, log, state,
                 checkpoint):
        self.features, self.labels, self.num_classes, self.spec = features, labels, num_classes, spec
        self.split, self.mirror, self.progress, self.log = split, mirror, progress, log
        self.state, self.checkpoint = state if state is not None else ClassifierState(), checkpoint

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def step(self, line: str):
        """Announce a step that reports progress (one line of ``log``); its ``progress``."""
        self.say(line)
        return self.progress

    def get(self, name: str):
        """The state part ``name`` (``ClassifierState.parts``) an interrupted fit reached, or None."""
        return self.state.parts().get(name)

    def put(self, name: str, part):
        """Record part ``name`` and hand the whole state to ``checkpoint``; the part to go on with."""
        self.state = ClassifierState.from_parts({**self.state.parts(), name: part})
        if self.checkpoint is not None:
            kept = self.checkpoint(self.state)
            self.state = self.state if kept is None else kept
        return self.get(name)

    def once(self, name: str, compute):
        """The part ``name`` reached before, or ``compute()`` recorded there."""
        saved = self.get(name)
        return saved if saved is not None else self.put(name, compute())


def _lbfgs_search(run: _Run, fit_args):
    # a function of its own: the standardized copy of the fitted part is freed before the final fit
    fit, _, scored = run.split
    features, labels = run.features, run.labels
    std = fit_standardizer(features[fit])
    xf = standardize(std, features[fit]).astype(run.spec.storage)
    score = _scorer(features, labels, scored, run.mirror)
    return search_C(run.spec.C_grid, lambda C: score(std, train_linear(xf, labels[fit], C=C, **fit_args)[0]), run.log)


def _fit_lbfgs(run: _Run) -> ClassifierFit:
    spec, scores, C = run.spec, {}, run.spec.C
    fit_args = dict(loss=spec.loss, num_classes=run.num_classes, max_iter=spec.max_iter, tol=spec.tol,
                    storage=spec.storage)
    if spec.C_grid:
        C, scores = _lbfgs_search(run, fit_args)
    std = fit_standardizer(run.features)
    x = standardize(std, run.features).astype(spec.storage)  # no float32 copy alive beside a bfloat16 one
    report = run.step(f"  L-BFGS at C = {C:g} on {x.shape[0]:,} rows: up to {spec.max_iter} iterations")
    model, info = train_linear(x, run.labels, C=C, progress=report, **fit_args)
    return ClassifierFit(std, model, float(C), scores, int(info.n_iter), float(info.loss), float(info.grad_norm))


def _placement(run: _Run, dual: bool) -> str | None:
    """Whether ridge runs on the accelerator (``device.py``) and how: JAX's default device is one
    (or ``tiled.ON_DEVICE`` forces it, with the features resident) and its memory takes the fit."""
    if not tiled.on_device():
        return None
    return "resident" if tiled.ON_DEVICE is True else device.placement(*np.shape(run.features), dual)


def _fit_ridge_device(run: _Run, dual: bool, placement: str) -> ClassifierFit:
    """Ridge with every pass on the device (``device.py``): the labels and row indices are put
    there once, the features too when resident (else each pass streams them in blocks); what comes
    back is one count of correct validation rows per C, and the model. Each pass is a program of
    its own and takes seconds on an accelerator, so nothing is checkpointed."""
    n, f = np.shape(run.features)
    run.say(f"  ridge on the {jax.default_backend()} device ({'dual' if dual else 'Gram'}: {n:,} rows, {f:,} features), "
            f"features {placement}")
    resident = placement == "resident"
    rows = device.put if resident else np.asarray  # what indexes the features: on their side
    features = device.put(run.features, np.float32) if resident else run.features
    labels, device_labels, num_classes = rows(run.labels), device.put(run.labels), run.num_classes
    kern = device.kernel_on_device(features) if dual else None
    scores, C = {}, run.spec.C
    if run.spec.C_grid:
        fit, val, scored = run.split
        views = [scored] + ([] if run.mirror is None else [scored + run.mirror])
        if dual:
            fit_rows, views = device.put(fit), [device.put(v) for v in views]

            def scores_of(C):
                solution = device.fit_dual_on_device(kern, device_labels, C, fit_rows, num_classes=num_classes)
                return [device.dual_scores_on_device(kern, solution, v) for v in views]
        else:
            stats = device.gram_on_device(features, labels, rows(fit), num_classes=num_classes)
            held = device.put(run.features[np.concatenate(views)], np.float32)  # the held-out rows, each view
            views = [device.put(np.arange(i * scored.size, (i + 1) * scored.size)) for i in range(len(views))]

            def scores_of(C):
                std, model = device.fit_ridge_on_device(stats, C)
                return [device.linear_scores_on_device(std, model, held, v) for v in views]

        scored_labels = device.put(run.labels[scored])

        def score(C):  # (the views' scores added on the device: sum() would start from a host 0)
            correct = int(device.pull(device.correct_on_device(functools.reduce(
                operator.add, scores_of(device.put(C, np.float32))), scored_labels)))
            if correct < 0:
                raise InputError(f"the ridge system at C = {C:g} is too ill-conditioned for a float32 factorization; "
                                 "use a smaller C (stronger regularization)")
            return correct / scored.size

        C, scores = search_C(run.spec.C_grid, score, run.log)
        if not dual:
            stats = device.gram_on_device(features, labels, rows(val), num_classes=num_classes, stats=stats)
    C_dev = device.put(C, np.float32)
    if dual:
        solution = device.fit_dual_on_device(kern, device_labels, C_dev, device.put(np.arange(n)), num_classes=num_classes)
        std, model = device.primal_on_device(kern, solution, features)
    else:
        if not run.spec.C_grid:
            stats = device.gram_on_device(features, labels, rows(np.arange(n)), num_classes=num_classes)
        std, model = device.fit_ridge_on_device(stats, C_dev)
    if not device.pull(device.all_finite((std, model))):
        raise InputError(f"the ridge system at C = {C:g} is too ill-conditioned for a float32 factorization; "
                         "use a smaller C (stronger regularization)")
    return ClassifierFit(std, model, float(C), scores, None, None, None)


def _fit_ridge(run: _Run) -> ClassifierFit:
    placement = _placement(run, dual=False)
    if placement:
        return _fit_ridge_device(run, False, placement)
    C_grid, split = run.spec.C_grid, run.split
    rows = None if not C_grid else split[0]
    features, labels = run.features, run.labels

    def gram():
        report = run.step(f"  Gram statistics of {len(labels) if rows is None else rows.size:,} rows")
        return gram_stats(features, labels, run.num_classes, rows=rows, progress=report)

    # the Gram matrix is most of the time of a ridge fit: kept, so that an interruption after it costs little
    stats = run.once("gram", gram)
    if not C_grid:
        return ClassifierFit(*fit_ridge(stats, run.spec.C), float(run.spec.C), {}, None, None, None)
    _, val, scored = split
    score = _scorer(features, labels, scored, run.mirror)
    best, scores = search_C(C_grid, lambda C: score(*fit_ridge(stats, C)), run.log)
    del score
    stats = accumulate_gram(stats, features, labels, rows=val)  # the held-out rows join the final fit
    return ClassifierFit(*fit_ridge(stats, best), best, scores, None, None, None)


def _fit_ridge_cg(run: _Run) -> ClassifierFit:
    """The ridge objective by conjugate gradients (``cg.py``): for features too wide for the Gram
    matrix. The C search warm-starts each C from the previous one's weights. The set-up passes and
    each C's solver state (after every iteration) are checkpointed: an interrupted fit skips the
    set-up and continues each C where it stopped."""
    spec, features, labels = run.spec, run.features, run.labels

    def solve(prep, C, init, name):
        report = run.step(f"  CG at C = {C:g}: up to {spec.max_iter} iterations, one pass over the features each")
        std, model, info = solve_cg_ridge(prep, features, C, init=init, max_iter=spec.max_iter, state=run.get(name),
                                          progress=report, checkpoint=lambda state: run.put(name, state))
        run.say(f"  C = {C:g}: {info['iterations']} passes, residual {info['residual']:.1e}"
                + ("" if info["converged"] else " (not converged: raise max_iter)"))
        return std, model, np.asarray(model.weights[:-1], np.float64)

    def prepare(rows, sketch=None):
        report = run.step(f"  CG set-up: four passes over {len(labels) if rows is None else rows.size:,} rows")
        return prepare_cg_ridge(features, labels, run.num_classes, rows=rows, rank=spec.rank, sketch=sketch,
                                progress=report)

    scores, C = {}, spec.C
    if spec.C_grid:
        fit, _, scored = run.split
        prep = run.once("cg-prep-search", lambda: prepare(fit))
        score = _scorer(features, labels, scored, run.mirror)
        weights = {}

        def fit_and_score(C):  # each C starts from the last one's weights
            init = list(weights.values())[-1] if weights else None
            std, model, weights[C] = solve(prep, C, init, ClassifierState.search_part(C))
            return score(std, model)

        C, scores = search_C(sorted(spec.C_grid), fit_and_score, run.log)  # small C first: the fastest to converge
        basis = prep.basis, prep.eigenvalues * (labels.shape[0] / fit.size)  # the sketch of the fitted rows, rescaled
        init = weights[C]
    else:
        basis, init = None, None
    prep = run.once("cg-prep-final", lambda: prepare(None, basis))
    std, model, _ = solve(prep, C, init, "cg-final")
    return ClassifierFit(std, model, float(C), scores, None, None, None)


def _fit_ridge_dual(run: _Run) -> ClassifierFit:
    """Ridge from the N x N kernel (``dual.py``), grown over column blocks of the features and
    checkpointed as it grows (every ``_SAVE_EVERY`` seconds and when complete); the grid and the
    final fit share one factorization (``factor_dual``), each C solved by preconditioned conjugate
    gradients and scored on the held-out rows' cross-kernel."""
    placement = _placement(run, dual=True)
    if placement:
        return _fit_ridge_device(run, True, placement)
    features, labels, num_classes = run.features, run.labels, run.num_classes
    n, f = np.shape(features)
    run.say(f"  dual ridge ({f:,} features, {n:,} rows): a {n:,} x {n:,} float32 kernel and its factorization, "
            f"{kernel_memory(n) / 2**30:.1f} GB")
    stats = run.get("kernel")
    if stats is None or stats.kernel.shape != (n, n) or stats.mean.shape != (f,):
        stats = empty_kernel_stats(n, f)
    elif int(stats.columns) < f:
        stats = jax.tree.map(np.array, stats)  # writeable copies of the saved kernel, to grow
    if int(stats.columns) < f:
        report = run.step(f"  the kernel of {f:,} features")
        saved = time.monotonic()
        while int(stats.columns) < f:
            stats = accumulate_kernel(stats, features, until=int(stats.columns) + 4 * 4096, progress=report)
            if int(stats.columns) == f or time.monotonic() - saved > _SAVE_EVERY:
                # the complete kernel goes on as the checkpoint gives it back (the runner: a memory map of
                # its file, so that the solves hold one factorization, not the kernel too)
                stats = run.put("kernel", stats)
                saved = time.monotonic()
    scores, C, factor = {}, run.spec.C, None
    if run.spec.C_grid:
        fit, val, scored = run.split
        # one factorization for the grid and the final fit: rows ordered [fitted, held out], shifted for the
        # grid's geometric middle, so that no C is more than sqrt(max / min) of the grid away from it
        middle = float(np.sqrt(min(run.spec.C_grid) * max(run.spec.C_grid)))
        run.say(f"  one factorization of the {n:,} x {n:,} kernel (at C = {middle:.3g}) for every C")
        factor = factor_dual(stats, fit.size / (2.0 * middle), np.concatenate([fit, val]))

        def score(C):
            solution = fit_dual(stats, labels, C, num_classes=num_classes, rows=fit, factor=factor)
            s = dual_scores(stats, solution, scored)
            if run.mirror is not None:
                s += dual_scores(stats, solution, scored + run.mirror)
            run.say(f"  C = {C:g}: {solution.iterations} conjugate-gradient steps")
            return float(np.mean(np.argmax(s, axis=1) == labels[scored]))

        C, scores = search_C(run.spec.C_grid, score, run.log)
    std, model = primal_model(stats, fit_dual(stats, labels, C, num_classes=num_classes, factor=factor), features)
    return ClassifierFit(std, model, float(C), scores, None, None, None)


_D = ClassifierSpec._field_defaults  # the options' defaults, defined once with ClassifierSpec


def fit_classifier(features, labels, *, num_classes: int, loss: str = _D["loss"], C: float = _D["C"],
                   C_grid=_D["C_grid"], val_fraction: float = _D["val_fraction"], key=None, copies: int = 1,
                   max_iter: int = _D["max_iter"], tol: float = _D["tol"], solver: str = _D["solver"],
                   rank: int = _D["rank"], mirror_scoring: bool = _D["mirror_scoring"], storage: str = _D["storage"],
                   progress=None, log=None, state: ClassifierState | None = None, checkpoint=None) -> ClassifierFit:
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
        (The options and their defaults are those of ``ClassifierSpec``.)
      log: optional ``log(line)``, given a line as each step that reports progress starts (the Gram
        statistics, the kernel, the CG set-up, each CG solve, the final L-BFGS fit) and a line per
        C tried.
      progress: optional ``progress(done, total, value)``: the progress of the step the last line
        of ``log`` announced (rows, features, passes or iterations; value: L-BFGS's objective, CG's
        relative residual, or None).
      state: a ``ClassifierState`` that ``checkpoint`` was given by an interrupted fit with the same
        arguments: the fit continues from the states it holds.
      checkpoint: optional ``checkpoint(state) -> ClassifierState | None``, given the whole
        ``ClassifierState`` each time a ridge fit reaches a state worth keeping: its Gram statistics
        (before the held-out rows join them), its kernel (every 10 minutes as it grows, and when
        complete), the CG solver's set-ups and each C's solver state after every iteration. A caller
        that persists it need only write the parts (``state.parts()``) that are not the objects it
        wrote before. What it returns, when not None, is the state to go on with: the same values,
        e.g. a complete kernel memory-mapped from the file it was written to (so that the solves
        never hold it twice). The fit goes on to change the arrays of the states it handed in place
        (the Gram statistics gain the held-out rows, a kernel grows): persist or copy them there.
        ``kmjax.templates.fit_state(name)`` is each part's file template.

    Returns:
      ClassifierFit(standardizer, model, C, scores, n_iter, objective, grad_norm).
    """
    host_only("fit_classifier", "kmjax.train_linear (L-BFGS, with num_classes given)", features, labels, C)
    choice(loss, CLASSIFIERS, "loss")
    num_classes = integer(num_classes, "num_classes", minimum=2)
    number(C, "C", above=0)
    C_grid = check_grid(C_grid)
    copies = positive_int(copies, "copies")
    max_iter = positive_int(max_iter, "max_iter")
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] < 2:
        raise InputError(f"features must be (N, F) with N >= 2, got shape {shape}")
    labels = check_labels(labels, shape[0], num_classes)
    if shape[0] % copies:
        raise InputError(f"{shape[0]} rows are not {copies} copies of the same images: copies must divide the rows")
    choice(solver, SOLVERS, "solver")
    choice(storage, STORAGES, "storage")
    if storage != "float32" and loss == "ridge":
        raise InputError(f"storage {storage!r} is for the L-BFGS losses (svm, logistic); ridge accumulates its "
                         "statistics in float64 from the features as they are: leave storage at 'float32'")
    if solver not in ("auto", "gram") and loss != "ridge":
        raise InputError(f"solver {solver!r} is for loss='ridge'; the {loss} loss is trained with L-BFGS")
    if mirror_scoring and copies < 2:
        raise InputError("mirror_scoring needs the mirrored rows: copies >= 2 (rows i and i + N/copies)")
    split = None
    if C_grid:
        if key is None:
            raise InputError("choosing C from C_grid needs a jax.random key for the validation split: pass key=")
        split = validation_split(shape[0], key, val_fraction=val_fraction, copies=copies)
    if solver == "auto":
        solver = "dual" if shape[1] > shape[0] else "gram"
    spec = ClassifierSpec(loss=loss, C=float(C), C_grid=tuple(C_grid), val_fraction=float(val_fraction),
                          max_iter=max_iter, tol=float(tol), solver=solver, rank=int(rank), storage=storage,
                          mirror_scoring=bool(mirror_scoring))
    run = _Run(features, labels, num_classes, spec, split, shape[0] // copies if mirror_scoring else None, progress,
               log, state, checkpoint)
    if loss != "ridge":
        return _fit_lbfgs(run)
    return {"dual": _fit_ridge_dual, "cg": _fit_ridge_cg, "gram": _fit_ridge}[solver](run)
