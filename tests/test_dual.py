"""The dual ridge (kmjax.classify.dual) against the primal solver and a float64 NumPy reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import kmjax
from kmjax.classify import (accumulate_kernel, dual_scores, empty_kernel_stats, factor_dual, fit_dual, fit_ridge, gram_stats,
                            predict_features, primal_model)
from kmjax.classify.linear import raw_scores


def _problem(n=150, f=400, classes=4, seed=0):
    """Features wider than the rows, correlated like pooled codes (non-negative, shared factors)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.5, 1.0, (n, 40)) @ rng.uniform(0, 1, (40, f)) / 10
    x = (base + rng.gamma(1.0, 0.5, (n, f))).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return x, labels, classes


def _kernel(x, **kw):
    return accumulate_kernel(empty_kernel_stats(x.shape[0], x.shape[1]), x, **kw)


def test_final_fit_matches_the_primal_solver():
    """All rows, one C: the dual's (Standardizer, LinearModel) is the primal ridge's, to float32
    rounding (both standardize by all rows; the kernel and the Gram matrix are float32 products)."""
    x, labels, classes = _problem()
    C = 10.0
    std_p, model_p = fit_ridge(gram_stats(x, labels, classes), C)
    stats = _kernel(x, block=64)  # several column blocks
    std_d, model_d = primal_model(stats, fit_dual(stats, labels, C, num_classes=classes), x, block=64)
    np.testing.assert_allclose(std_d.mean, std_p.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std_d.scale, std_p.scale, rtol=1e-5)
    w_p = np.asarray(model_p.weights)
    np.testing.assert_allclose(model_d.weights, w_p, rtol=0, atol=2e-4 * np.abs(w_p).max())
    x_test = _problem(seed=1)[0][:50]
    s_p, s_d = (np.asarray(raw_scores(s, m, x_test)) for s, m in ((std_p, model_p), (std_d, model_d)))
    np.testing.assert_allclose(s_d, s_p, rtol=0, atol=2e-4 * np.abs(s_p).max())


def test_subset_fit_and_scores_against_numpy():
    """Fit on some rows, score others: against the float64 ridge on the same standardization
    (mean and scale of all rows), the fitted rows centred on themselves, the bias unregularized."""
    x, labels, classes = _problem(seed=2)
    C = 3.0
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(x))
    fit_rows, held = np.sort(perm[:110]), np.sort(perm[110:])
    stats = _kernel(x)
    solution = fit_dual(stats, labels, C, num_classes=classes, rows=fit_rows)
    scores = dual_scores(stats, solution, held)

    x64 = x.astype(np.float64)
    z = (x64 - x64.mean(0)) / np.sqrt(x64.var(0, ddof=1) + 0.01)
    zf = z[fit_rows]
    m = zf.mean(0)
    t = 2.0 * np.eye(classes)[labels[fit_rows]] - 1.0
    w = np.linalg.solve((zf - m).T @ (zf - m) + len(fit_rows) / (2 * C) * np.eye(x.shape[1]), (zf - m).T @ (t - t.mean(0)))
    ref = (z[held] - m) @ w + t.mean(0)
    np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # and the primal weights of that fit score the held-out rows the same way
    std, model = primal_model(stats, solution, x)
    np.testing.assert_allclose(np.asarray(raw_scores(std, model, x[held])), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_kernel_grows_in_pieces_bitwise():
    """Stopping after some columns and continuing (a resumed run) gives the same kernel, bitwise."""
    x, _, _ = _problem()
    whole = _kernel(x, block=64)
    part = _kernel(x, block=64, until=128)
    assert int(part.columns) == 128
    part = accumulate_kernel(part, x, block=64)
    for a, b in zip(whole, part):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.kernel, whole.kernel.T)
    with pytest.raises(ValueError, match="150-row kernel of 400 features"):
        accumulate_kernel(whole, x[:, :300])


class _Store:
    """fit_classifier's checkpoint in memory: the last state, copied, and the number of calls."""

    def __init__(self):
        self.state, self.saves = None, 0

    def __call__(self, state):
        self.state = jax.tree.map(np.array, state)
        self.saves += 1


def test_fit_classifier_chooses_the_dual_by_shape_and_resumes():
    x, labels, classes = _problem()
    primal = kmjax.fit_classifier(x, labels, num_classes=classes, loss="ridge", C=10.0, solver="gram")
    store = _Store()
    auto = kmjax.fit_classifier(x, labels, num_classes=classes, loss="ridge", C=10.0, checkpoint=store)
    assert store.saves == 1 and int(store.state.kernel.columns) == x.shape[1]  # the dual ran, its kernel was kept
    pred = predict_features(primal.standardizer, primal.model, x)
    assert np.mean(predict_features(auto.standardizer, auto.model, x) == pred) == 1.0
    # a run that stopped half-way resumes from the saved kernel: the same model
    half = _kernel(x, until=200)
    resumed = kmjax.fit_classifier(x, labels, num_classes=classes, loss="ridge", C=10.0,
                                   state=kmjax.classify.ClassifierState(kernel=half), checkpoint=store)
    np.testing.assert_allclose(resumed.model.weights, auto.model.weights, rtol=0, atol=1e-6)
    # a complete kernel handed back read-only (as a runner's memory map) is what the solve goes on with
    mapped = []

    def read_only(state):
        kernel = jax.tree.map(np.array, state.kernel)
        kernel.kernel.flags.writeable = False
        mapped.append(kernel)
        return state._replace(kernel=kernel)

    again = kmjax.fit_classifier(x, labels, num_classes=classes, loss="ridge", C=10.0, checkpoint=read_only)
    np.testing.assert_array_equal(again.model.weights, auto.model.weights)
    assert len(mapped) == 1
    # with a grid: C chosen on held-out rows, like the primal solver's choice on this easy problem
    grid = kmjax.fit_classifier(x, labels, num_classes=classes, loss="ridge", C_grid=[1, 10, 100],
                                key=__import__("jax").random.key(0), solver="dual")
    assert set(grid.scores) == {1.0, 10.0, 100.0} and grid.C in grid.scores


def test_kernel_files_are_mapped_not_read(tmp_path):
    """load_tree(mmap=True) gives read-only memmaps of the file with the saved values; a truncated
    file is a clear error, not a crash."""
    from kmjax.checkpoint import FileFormatError, load_tree, save_tree
    from kmjax.templates import fit_state

    x, _, _ = _problem()
    stats = _kernel(x)
    path = save_tree(tmp_path / "kernel.npz", stats, {"kind": "checkpoint"})
    mapped, _ = load_tree(path, fit_state("kernel"), mmap=True)
    assert isinstance(mapped.kernel, np.memmap) and not mapped.kernel.flags.writeable
    for a, b in zip(mapped, stats):
        np.testing.assert_array_equal(a, b)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FileFormatError):
        load_tree(path, fit_state("kernel"), mmap=True)


def test_one_factorization_serves_the_grid_and_the_final_fit():
    """A factor at one C, its rows ordered [fitted, held out]: the solves at the grid's other Cs
    (on the fitted rows, its leading block) and the final fit (all rows) are those each C's own
    factorization gives, to 1e-6 of the largest coefficient; each takes a few conjugate-gradient
    steps where the condition number allows (at most the ratio of the shifts)."""
    x, labels, classes = _problem(n=240, seed=4)
    stats = _kernel(x)
    rows = np.arange(240)
    fit_rows, held = rows[rows % 6 != 0], rows[rows % 6 == 0]
    factor = factor_dual(stats, fit_rows.size / (2 * 10.0), np.concatenate([fit_rows, held]))
    for C, subset in ((1.0, fit_rows), (10.0, fit_rows), (100.0, fit_rows), (30.0, None)):
        shared = fit_dual(stats, labels, C, num_classes=classes, rows=subset, factor=factor)
        own = fit_dual(stats, labels, C, num_classes=classes, rows=subset)
        assert own.iterations <= 2  # its own factor: the direct solve, refined once at most
        assert shared.iterations <= 40
        order = np.argsort(shared.rows)
        np.testing.assert_array_equal(shared.rows[order], own.rows[np.argsort(own.rows)])
        a_own = own.alpha[np.argsort(own.rows)]
        np.testing.assert_allclose(shared.alpha[order], a_own, rtol=0, atol=1e-6 * np.abs(a_own).max())
        np.testing.assert_allclose(shared.bias, own.bias, rtol=0, atol=1e-6)
        np.testing.assert_allclose(shared.alpha.sum(axis=0), 0, atol=1e-9 * np.abs(a_own).max())
    with pytest.raises(ValueError, match="leading rows must be the rows fitted"):
        fit_dual(stats, labels, 1.0, num_classes=classes, rows=held, factor=factor)
