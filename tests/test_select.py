"""Tests for kmjax.classify.select: the validation split, the C search and fit_classifier, on
small synthetic data (no data set needed)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kmjax.classify import (
    CLASSIFIERS, ClassifierFit, accumulate_gram, fit_classifier, fit_ridge, fit_standardizer, gram_stats,
    predict_features, search_C, standardize, train_linear, validation_split,
)

K = 4  # classes


def blobs(per_class=40, f=6, sep=3.0, seed=0, copies=1):
    """K Gaussian classes, overlapping a little (so C matters); with copies = 2, a noisy "mirror"
    of every row follows all the originals, as the runner's flipped images do."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K), per_class).astype(np.int32)
    rng.shuffle(labels)
    x = sep * np.eye(K, f)[labels] + rng.standard_normal((labels.size, f)) + 5.0
    if copies == 2:
        x = np.concatenate([x, x + 0.1 * rng.standard_normal(x.shape)])
        labels = np.concatenate([labels, labels])
    return x.astype(np.float32), labels


# ----------------------------------------------------------------------------- validation split


@pytest.mark.parametrize("copies", [1, 2])
def test_validation_split_groups_an_image_with_its_mirror(copies):
    n = 50
    fit, val, scored = validation_split(n * copies, jax.random.key(0), val_fraction=0.2, copies=copies)
    assert val.size == 10 * copies and fit.size == 40 * copies and scored.size == 10
    assert all(np.all(np.diff(a) > 0) for a in (fit, val, scored))  # sorted, distinct
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), np.arange(n * copies))  # a partition
    # an image and its mirror (rows i and i + n) are always on the same side
    assert set(fit % n).isdisjoint(set(val % n))
    for j in range(copies):  # copy j of the held-out images: copy j of the scored ones
        assert set(val[val // n == j] - j * n) == set(scored)
        assert set(fit[fit // n == j] - j * n) == set(range(n)) - set(scored)
    assert np.all(scored < n)  # only originals are scored
    again = validation_split(n * copies, jax.random.key(0), val_fraction=0.2, copies=copies)
    for a, b in zip((fit, val, scored), again):
        np.testing.assert_array_equal(a, b)  # deterministic for a key
    other = validation_split(n * copies, jax.random.key(1), val_fraction=0.2, copies=copies)
    assert not np.array_equal(other[2], scored)


def test_validation_split_rounds_the_held_out_share_and_holds_out_at_least_one():
    assert validation_split(95, jax.random.key(0), val_fraction=0.1)[1].size == 10  # round(9.5): 10
    assert validation_split(85, jax.random.key(0), val_fraction=0.1)[1].size == 8  # round(8.5): 8, as Python rounds
    assert validation_split(4, jax.random.key(0), val_fraction=0.01)[1].size == 1


def test_validation_split_errors():
    with pytest.raises(ValueError, match="copies must divide"):
        validation_split(101, jax.random.key(0), copies=2)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            validation_split(100, jax.random.key(0), val_fraction=bad)
    with pytest.raises(ValueError, match="none to fit"):
        validation_split(2, jax.random.key(0), val_fraction=0.9)
    with pytest.raises(ValueError, match="copies must be a positive integer"):
        validation_split(100, jax.random.key(0), copies=0)


# ----------------------------------------------------------------------------- C search


def test_search_C_ties_go_to_the_smaller_C_whatever_the_grid_order():
    acc = {0.1: 0.5, 1.0: 0.8, 10.0: 0.8, 100.0: 0.7}
    for grid in ([0.1, 1, 10, 100], [100, 10, 1, 0.1], [10, 100, 1, 0.1]):
        lines = []
        best, scores = search_C(grid, lambda C: acc[C], log=lines.append)
        assert best == 1.0 and scores == {float(C): acc[C] for C in grid}
        assert list(scores) == [float(C) for C in grid] and all(type(C) is float for C in scores)
        assert lines == [f"  C = {C:g}: validation accuracy {acc[C]:.4f}" for C in grid]
    assert search_C([3], lambda C: 0.0) == (3.0, {3.0: 0.0})


def test_search_C_errors():
    with pytest.raises(ValueError, match="at least one C"):
        search_C([], lambda C: 1.0)
    for grid in ([1, 0], [1, -2.0], [float("nan")], [True], ["1"]):
        with pytest.raises(ValueError, match="must be a number > 0"):
            search_C(grid, lambda C: 1.0)


# ----------------------------------------------------------------------------- fit_classifier


@pytest.mark.parametrize("loss", ["svm", "logistic", "ridge"])
def test_fit_classifier_learns_each_loss_without_a_grid(loss):
    x, labels = blobs()
    r = fit_classifier(x, labels, num_classes=K, loss=loss, C=10.0, max_iter=100)
    assert isinstance(r, ClassifierFit) and r.C == 10.0 and r.scores == {}
    assert r.model.weights.shape == (x.shape[1] + 1, K)
    xt, yt = blobs(seed=1)  # fresh samples of the same classes
    assert np.mean(predict_features(r.standardizer, r.model, xt) == yt) > 0.8  # chance: 0.25
    if loss == "ridge":
        assert (r.n_iter, r.objective, r.grad_norm) == (None, None, None)
    else:
        assert type(r.n_iter) is int and 1 <= r.n_iter <= 100
        assert type(r.objective) is float and type(r.grad_norm) is float and np.isfinite(r.objective)


@pytest.mark.parametrize("loss", ["svm", "logistic"])
def test_fit_classifier_lbfgs_chooses_C_on_held_out_rows_then_fits_all_rows(loss):
    x, labels = blobs(copies=2)
    grid = [0.01, 1, 100]
    key = jax.random.key(3)
    lines, reports = [], []
    r = fit_classifier(x, labels, num_classes=K, loss=loss, C=5.0, C_grid=grid, key=key, copies=2, max_iter=50,
                       progress=lambda done, total, value: reports.append((done, total)), log=lines.append)
    assert set(r.scores) == {float(C) for C in grid} and r.C in r.scores and len(lines) == 4
    assert r.C == max(r.scores, key=lambda C: (r.scores[C], -C))
    assert r.scores[r.C] > 0.8  # chance: 0.25
    # a line per C, then the one step with progress: the final fit's iterations
    assert lines[3].startswith(f"  L-BFGS at C = {r.C:g} on {x.shape[0]:,} rows")
    assert reports and all(total == 50 for _, total in reports) and reports[-1][0] == r.n_iter
    # the scores are those of a fit on the split's fit rows, scored on its held-out originals
    fit, _, scored = validation_split(x.shape[0], key, copies=2)
    std = fit_standardizer(x[fit])
    model, _ = train_linear(standardize(std, x[fit]), labels[fit], loss=loss, C=r.C, num_classes=K, max_iter=50)
    assert r.scores[r.C] == pytest.approx(np.mean(predict_features(std, model, x[scored]) == labels[scored]))
    # the final fit: all rows at the chosen C, exactly as train_linear gives it
    std = fit_standardizer(x)
    model, info = train_linear(standardize(std, x), labels, loss=loss, C=r.C, num_classes=K, max_iter=50)
    np.testing.assert_array_equal(np.asarray(r.standardizer.mean), np.asarray(std.mean))
    np.testing.assert_array_equal(np.asarray(r.model.weights), np.asarray(model.weights))
    assert r.n_iter == int(info.n_iter)


@pytest.mark.parametrize("copies", [1, 2])
def test_fit_classifier_ridge_chooses_C_then_fits_the_union_of_the_rows(copies):
    x, labels = blobs(copies=copies)
    grid = [1e-3, 0.1, 10]
    lines, reports = [], []
    key = jax.random.key(5)
    r = fit_classifier(x, labels, num_classes=K, loss="ridge", C_grid=grid, key=key, copies=copies,
                       progress=lambda done, total, value: reports.append((done, total)), log=lines.append)
    assert set(r.scores) == {float(C) for C in grid} and r.C == max(r.scores, key=lambda C: (r.scores[C], -C))
    assert r.scores[r.C] > 0.8 and r.scores[1e-3] < 0.5  # C = 1e-3 shrinks the weights to almost nothing
    fit, val, scored = validation_split(x.shape[0], key, copies=copies)
    assert lines[0] == f"  Gram statistics of {fit.size:,} rows" and reports[-1] == (fit.size, fit.size)
    # the scores: a fit on the fit rows only, scored on the held-out originals
    std, model = fit_ridge(gram_stats(x, labels, K, rows=fit), r.C)
    assert r.scores[r.C] == np.mean(predict_features(std, model, x[scored]) == labels[scored])
    # the final fit: held-out rows added to the fit rows' statistics
    stats = accumulate_gram(gram_stats(x, labels, K, rows=fit), x, labels, rows=val)
    std, model = fit_ridge(stats, r.C)
    np.testing.assert_array_equal(np.asarray(r.model.weights), np.asarray(model.weights))
    np.testing.assert_array_equal(np.asarray(r.standardizer.scale), np.asarray(std.scale))
    # ... which is the fit on all rows in one pass, up to the float32 block products' rounding
    std, model = fit_ridge(gram_stats(x, labels, K), r.C)
    np.testing.assert_allclose(np.asarray(r.standardizer.mean), np.asarray(std.mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.standardizer.scale), np.asarray(std.scale), rtol=1e-5)
    w = np.asarray(model.weights)
    np.testing.assert_allclose(np.asarray(r.model.weights), w, atol=1e-5 * np.abs(w).max())


def test_fit_classifier_input_errors():
    x, labels = blobs(per_class=5)
    ok = dict(num_classes=K)
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'.*'svm', 'logistic', 'ridge'"):
        fit_classifier(x, labels, loss="hinge", **ok)
    assert CLASSIFIERS == ("svm", "logistic", "ridge")
    for bad in (0.0, -1.0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="C must be a number > 0"):
            fit_classifier(x, labels, C=bad, **ok)
    for grid in ([1.0, 0.0], [-1], [float("nan")], [None]):
        with pytest.raises(ValueError, match="every C of C_grid"):
            fit_classifier(x, labels, C_grid=grid, key=jax.random.key(0), **ok)
    with pytest.raises(ValueError, match="needs a jax.random key"):
        fit_classifier(x, labels, C_grid=[1.0], **ok)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fit_classifier(x, labels, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        fit_classifier(x, np.where(labels == 0, -1, labels), **ok)
    with pytest.raises(ValueError, match="integer class indices"):
        fit_classifier(x, labels.astype(np.float32), **ok)
    with pytest.raises(ValueError, match="one label per row"):
        fit_classifier(x, labels[:-1], **ok)
    with pytest.raises(ValueError, match=r"features must be \(N, F\)"):
        fit_classifier(x[0], labels, **ok)
    with pytest.raises(ValueError, match="copies must divide"):
        fit_classifier(x[:-1], labels[:-1], copies=2, **ok)
    with pytest.raises(ValueError, match="unknown storage 'float16'"):
        fit_classifier(x, labels, storage="float16", **ok)
    with pytest.raises(ValueError, match="storage 'bfloat16' is for the L-BFGS losses"):
        fit_classifier(x, labels, loss="ridge", storage="bfloat16", **ok)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        fit_classifier(x, np.zeros_like(labels), num_classes=1)
    with pytest.raises(ValueError, match="val_fraction"):
        fit_classifier(x, labels, C_grid=[1.0], key=jax.random.key(0), val_fraction=1.0, **ok)
