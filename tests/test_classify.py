"""Tests for kmjax.classify's classifiers and statistics against float64 NumPy references (model
selection: test_select.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kmjax.classify import (
    ClassifierState, GramStats, LBFGSState, LinearModel, accumulate_gram, accuracy, empty_gram_stats, fit_ridge, fit_standardizer, gram_stats,
    predict, predict_features, softmax_loss, standardize, svm_loss, train_linear,
)
from kmjax.classify.tiled import add_gram, cholesky, cholesky_solve, mirror_tiles, row_tiles_matmul


def svm_ref(w, x, labels, C):
    """½‖W‖² + C Σ_k mean_i max(0, 1 − y_ik x_i·w_k)², and its analytic gradient."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    n, k = x.shape[0], w.shape[1]
    y = -np.ones((n, k))
    for i, l in enumerate(labels):
        y[i, l] = 1.0
    margin = np.zeros((n, k))
    for i in range(n):
        for j in range(k):
            margin[i, j] = max(0.0, 1.0 - y[i, j] * (x[i] @ w[:, j]))
    loss = 0.5 * np.sum(w * w) + C * sum(np.mean(margin[:, j] ** 2) for j in range(k))
    grad = w - (2.0 * C / n) * x.T @ (margin * y)
    return loss, grad


def softmax_ref(w, x, labels, C):
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    ce = []
    for i, l in enumerate(labels):
        z = x[i] @ w
        m = z.max()
        ce.append(m + np.log(np.sum(np.exp(z - m))) - z[l])
    return 0.5 * np.sum(w * w) + C * np.mean(ce)


def _problem(seed=0, n=30, f=6, k=3, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    w = (scale * rng.normal(size=(f, k))).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    return w, x, labels


def blobs(seed=0, per_class=15, f=4, k=3, sep=10.0):
    rng = np.random.default_rng(seed)
    centres = sep * np.eye(k, f)
    x = np.concatenate([centres[c] + rng.normal(size=(per_class, f)) for c in range(k)])
    labels = np.repeat(np.arange(k), per_class)
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


# ---------------------------------------------------------------- standardization


def test_fit_standardizer_matches_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(3.0, 2.0, size=(50, 7)).astype(np.float32)
    f[:, 0] = 5.0  # constant column: scale sqrt(0 + 0.01) = 0.1
    st = fit_standardizer(f)
    mean_ref = np.array([np.mean(f[:, j].astype(np.float64)) for j in range(7)])
    var_ref = np.array([np.sum((f[:, j].astype(np.float64) - mean_ref[j]) ** 2) / (len(f) - 1) for j in range(7)])
    # stored as float32: 1e-6 relative is a few ulps
    np.testing.assert_allclose(np.asarray(st.mean), mean_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.scale), np.sqrt(var_ref + 0.01), rtol=1e-6)
    assert abs(float(st.scale[0]) - 0.1) < 1e-7
    st2 = fit_standardizer(f, eps=1.0)
    np.testing.assert_allclose(np.asarray(st2.scale), np.sqrt(var_ref + 1.0), rtol=1e-6)


def test_standardize_appends_ones_column():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(9, 4)).astype(np.float32)
    st = fit_standardizer(f)
    out = np.asarray(standardize(st, f))
    assert out.shape == (9, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, -1], np.ones(9))
    ref = (f - f.mean(0)) / np.sqrt(f.var(0, ddof=1) + 0.01)
    # float32 subtraction and division of O(1) values: 1e-5 absolute
    np.testing.assert_allclose(out[:, :-1], ref, atol=1e-5)
    # columns of the standardized training set have mean ~0
    np.testing.assert_allclose(out[:, :-1].mean(0), 0.0, atol=1e-5)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("C", [1.0, 100.0])
def test_svm_loss_and_gradient(C):
    w, x, labels = _problem(0, scale=0.3)  # a mix of active and inactive margins
    loss_ref, grad_ref = svm_ref(w, x, labels, C)
    loss, grad = jax.value_and_grad(svm_loss)(jnp.asarray(w), jnp.asarray(x), jnp.asarray(labels), C)
    # float32 with HIGHEST-precision products over 30 x 6 values: ~1e-6 relative rounding, 1e-4 safe
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad), grad_ref, rtol=1e-4, atol=1e-4 * np.abs(grad_ref).max())


def test_svm_loss_zero_margin_term_when_separated():
    # every margin satisfied: the loss is just the regularizer
    x = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
    w = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    loss = svm_loss(jnp.asarray(w), jnp.asarray(x), jnp.asarray([0, 1]), 100.0)
    assert float(loss) == pytest.approx(0.5 * 4.0, rel=1e-6)  # exact up to float32


@pytest.mark.parametrize("C", [1.0, 10.0])
def test_softmax_loss_matches_numpy(C):
    w, x, labels = _problem(1)
    got = softmax_loss(jnp.asarray(w), jnp.asarray(x), jnp.asarray(labels), C)
    # float32 log-sum-exp over logits ~N(0, 6): ~1e-6 relative
    np.testing.assert_allclose(float(got), softmax_ref(w, x, labels, C), rtol=1e-4)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("loss", ["svm", "logistic"])
def test_train_linear_separable_blobs(loss):
    x, labels = blobs()
    xs = np.asarray(standardize(fit_standardizer(x), x))
    model, info = train_linear(xs, labels, loss=loss, C=10.0, max_iter=200)
    assert isinstance(model, LinearModel) and model.weights.shape == (5, 3)
    assert accuracy(model, xs, labels) == 1.0
    pred = np.asarray(predict(model, xs))
    assert pred.dtype == np.int32
    np.testing.assert_array_equal(pred, labels)
    assert np.isfinite(float(info.loss)) and int(info.n_iter) >= 1


@pytest.mark.parametrize("C", [1.0, 100.0])
@pytest.mark.parametrize("n", [40, 37])  # 37 rows: 3 padding rows masked out (kmjax._ops.bucket(37) = 40)
def test_train_linear_reaches_scipy_optimum(C, n, monkeypatch):
    monkeypatch.setenv("KMJAX_BUCKET_ROWS", "1")  # padded as on an accelerator
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    f, k = 5, 3
    x = rng.normal(size=(n, f))
    x = np.concatenate([x, np.ones((n, 1))], axis=1)
    labels = (x[:, :3] + 0.8 * rng.normal(size=(n, 3))).argmax(1)  # noisy: many active margins

    def fun(wflat):
        loss, grad = svm_ref(wflat.reshape(f + 1, k), x, labels, C)
        return loss, grad.ravel()

    res = optimize.minimize(fun, np.zeros((f + 1) * k), jac=True, method="L-BFGS-B",
                            options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})
    w_ref, f_ref = res.x.reshape(f + 1, k), res.fun

    model, info = train_linear(x.astype(np.float32), labels, loss="svm", C=C, num_classes=k,
                               max_iter=500, tol=1e-5)
    w = np.asarray(model.weights, np.float64)
    f_got, _ = svm_ref(w, x, labels, C)
    # float32 L-BFGS vs float64: objective within 1e-3 relative (the brief's tolerance)
    assert abs(f_got - f_ref) <= 1e-3 * abs(f_ref)
    assert abs(float(info.loss) - f_ref) <= 1e-3 * abs(f_ref)
    # strongly convex (modulus 1 from ½‖W‖²), so ‖W − W*‖² <= 2 (f − f*): objective agreement
    # forces weight agreement; observed ~1e-6, 1e-3 absolute leaves room for float32 L-BFGS
    np.testing.assert_allclose(w, w_ref, atol=1e-3)


@pytest.mark.parametrize("loss", ["svm", "logistic"])
def test_padded_rows_are_masked_out_of_the_loss(loss):
    """train_linear pads its rows to a bucket (kmjax._ops.bucket): with ``count`` the rows after the
    first ``count`` count for nothing, whatever they hold, and the mean divides by ``count``: the
    unpadded objective and gradient to float32 rounding (the summation order changes: 1e-6)."""
    rng = np.random.default_rng(11)
    n, f, k = 70, 9, 4
    x = rng.standard_normal((n, f)).astype(np.float32)
    labels = rng.integers(0, k, n)
    w = jnp.asarray(0.3 * rng.standard_normal((f, k)), jnp.float32)
    junk = np.concatenate([x, 100 * rng.standard_normal((2, f)).astype(np.float32)])
    fun = {"svm": svm_loss, "logistic": softmax_loss}[loss]
    ref, g_ref = jax.value_and_grad(fun)(w, x, labels, 10.0)
    got, g = jax.value_and_grad(fun)(w, junk, np.concatenate([labels, [1, 3]]), 10.0, count=jnp.int32(n))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6 * np.abs(g_ref).max())


def test_train_linear_row_counts_in_one_bucket_share_the_lbfgs_programs(monkeypatch):
    """70 and 71 rows are both padded to 72 (as on an accelerator; a CPU does not pad, see
    kmjax._ops.bucket): the second fit builds only its padding program, and its reported objective
    is that of its own rows, unpadded (to float32 rounding)."""
    monkeypatch.setenv("KMJAX_BUCKET_ROWS", "1")
    from kmjax.experiment.compile_cache import CompileCounter
    rng = np.random.default_rng(12)
    x = rng.standard_normal((71, 6)).astype(np.float32)
    labels = (x[:, :3] + 0.5 * rng.standard_normal((71, 3))).argmax(1)
    args = dict(C=10.0, num_classes=3, max_iter=30, tol=0.0)
    train_linear(x[:70], labels[:70], **args)
    before = len(CompileCounter.compiled)
    model, info = train_linear(x, labels, **args)
    assert CompileCounter.compiled[before:] == ["jit(_padded)"]
    np.testing.assert_allclose(float(info.loss), float(svm_loss(model.weights, x, labels, 10.0)), rtol=1e-6)


def test_train_linear_num_classes_larger_than_labels():
    x, labels = blobs(k=2, f=3)
    model, _ = train_linear(np.asarray(standardize(fit_standardizer(x), x)), labels, num_classes=4, max_iter=20)
    assert model.weights.shape == (4, 4)


@pytest.mark.parametrize("loss", ["svm", "logistic"])
def test_bfloat16_storage_is_the_float32_fit_of_the_rounded_features(loss):
    """storage="bfloat16" holds the features rounded to bfloat16 and multiplies them by the exact
    float32 weights (three bfloat16 parts): the fit is the float32 fit of the rounded features,
    to float32 rounding. Splitting the weights in one or two parts instead, or rounding them,
    moves the weights by ~1e-3 of their size here: 30x the tolerance."""
    rng = np.random.default_rng(5)
    n, f, k = 600, 40, 4
    x = rng.standard_normal((n, f)).astype(np.float32)
    labels = (x[:, :k] + 0.8 * rng.standard_normal((n, k))).argmax(1)
    xs = np.asarray(standardize(fit_standardizer(x), x))
    rounded = np.asarray(jnp.asarray(xs).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.max(np.abs(rounded - xs)) > 1e-3  # the rounding is real
    args = dict(loss=loss, C=10.0, num_classes=k, max_iter=300, tol=1e-4)
    model, info = train_linear(xs, labels, storage="bfloat16", **args)
    ref, ref_info = train_linear(rounded, labels, **args)
    w, w_ref = np.asarray(model.weights), np.asarray(ref.weights)
    np.testing.assert_allclose(w, w_ref, atol=3e-5 * np.max(np.abs(w_ref)))
    assert abs(float(info.loss) - float(ref_info.loss)) <= 1e-5 * float(ref_info.loss)


def test_bfloat16_products_multiply_by_the_exact_weights():
    from kmjax.classify.linear import _dot
    rng = np.random.default_rng(6)
    a = jnp.asarray(rng.standard_normal((300, 200)), jnp.bfloat16)
    b = rng.standard_normal((200, 7)).astype(np.float32)
    exact = np.asarray(a, np.float64) @ b.astype(np.float64)
    for dot in (_dot, jax.jit(_dot)):  # compiled too: no pass may fold the split away
        got = np.asarray(dot(a, jnp.asarray(b)))
        assert got.dtype == np.float32
        # float32 accumulation of 200 terms: ~1e-6 of the largest entry; b rounded to bfloat16 once
        # would be ~1e-3
        np.testing.assert_allclose(got, exact, atol=2e-6 * np.max(np.abs(exact)))


def test_svm_gradient_with_bfloat16_features_is_float32_without_a_transposed_copy():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((200, 30)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((30, 4)) * 0.1, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 200))
    g = jax.grad(svm_loss)(w, x, labels, 10.0)
    ref = svm_ref(np.asarray(w), np.asarray(x.astype(jnp.float32)), np.asarray(labels), 10.0)[1]
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- errors


def test_train_linear_errors():
    x, labels = blobs(per_class=3)
    with pytest.raises(ValueError, match="unknown loss"):
        train_linear(x, labels, loss="hinge")
    for bad_c in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="C must be"):
            train_linear(x, labels, C=bad_c)
    with pytest.raises(ValueError, match="labels must lie"):
        train_linear(x, labels, num_classes=2)  # labels go up to 2
    with pytest.raises(ValueError, match="labels must lie"):
        train_linear(x, np.where(labels == 0, -1, labels))
    with pytest.raises(ValueError, match="x must be"):
        train_linear(x, labels[:-1])
    with pytest.raises(ValueError, match="x must be"):
        train_linear(x[:, :, None], labels)
    with pytest.raises(ValueError, match="unknown storage"):
        train_linear(x, labels, storage="float16")


# ----------------------------------------------------------------------------- ridge from the Gram matrix


def _ridge_problem(n=400, f=30, c=4, seed=0):
    rng = np.random.default_rng(seed)
    # uneven scales and large means, as pooled features have
    x = (rng.standard_normal((n, f)) * rng.uniform(0.5, 3.0, f) + rng.uniform(0.0, 50.0, f)).astype(np.float32)
    w = rng.standard_normal((f, c))
    labels = np.argmax((x - x.mean(0)) @ w + rng.standard_normal((n, c)), axis=1).astype(np.int32)
    assert len(np.unique(labels)) == c
    return x, labels


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_fit_ridge_matches_sklearn_ridge_on_standardized_features(C):
    from sklearn.linear_model import Ridge

    x, labels = _ridge_problem()
    n = x.shape[0]
    std, model = fit_ridge(gram_stats(x, labels, 4, block=64), C)
    x64 = x.astype(np.float64)
    mean, scale = x64.mean(0), np.sqrt(x64.var(0, ddof=1) + 0.01)
    # 1/2 ||W||^2 + C/n sum ||y - zW - b||^2 is sklearn's ||y - zW - b||^2 + alpha ||W||^2 with alpha = n/(2C)
    ref = Ridge(alpha=n / (2 * C), solver="cholesky").fit((x64 - mean) / scale, 2.0 * np.eye(4)[labels] - 1.0)
    np.testing.assert_allclose(np.asarray(std.mean), mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(std.scale), scale, rtol=1e-5)
    w = np.asarray(model.weights, np.float64)
    # float32 block products summed in float64, float32 weights: 1e-5 of the weights' size
    np.testing.assert_allclose(w[:-1], ref.coef_.T, atol=1e-5 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(w[-1], ref.intercept_, atol=1e-5)


def test_gram_stats_is_the_same_for_any_blocking_or_split_and_leaves_its_input_alone():
    x, labels = _ridge_problem(n=300)
    before = x.copy()
    whole = gram_stats(x, labels, 4, block=1000)
    np.testing.assert_array_equal(x, before)
    rng = np.random.default_rng(1)
    rows = rng.permutation(300)
    part = gram_stats(x, labels, 4, rows=rows[:200], shift=whole.shift, block=7)
    big = part.gram
    both = accumulate_gram(part, x, labels, rows=rows[200:])
    assert both.gram is big and both.count == 300  # the consumed statistics' F x F array, reused: no copy
    for a, b in zip(whole[1:], both[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(x, before)


def _fields_equal(a, b):
    for name, u, v in zip(GramStats._fields, a, b):
        assert u.dtype == v.dtype == np.float64 and u.shape == v.shape, name
        np.testing.assert_array_equal(u, v, err_msg=name)


def test_accumulating_rows_a_then_rows_b_is_one_pass_over_both_in_every_field():
    x, labels = _ridge_problem(n=300)
    rows = np.random.default_rng(2).permutation(300)
    once = gram_stats(x, labels, 4, rows=rows[:250], block=50)
    np.testing.assert_array_equal(once.shift, x[np.sort(rows[:250])[:50]].mean(axis=0, dtype=np.float64))
    # A = the first 100 of the sorted rows: the same blocks in the same order, so the same sums, exactly
    ordered = np.sort(rows[:250])
    stats = gram_stats(x, labels, 4, rows=ordered[:100], shift=once.shift, block=50)
    arrays = [id(a) for a in stats[1:]]
    stats = accumulate_gram(stats, x, labels, rows=ordered[100:], block=50)
    assert [id(a) for a in stats[1:]] == arrays  # the consumed statistics' arrays, reused: no copy
    _fields_equal(stats, once)
    # from empty statistics
    _fields_equal(accumulate_gram(empty_gram_stats(once.shift, 4), x, labels, rows=rows[:250], block=50), once)
    # any other split and blocking: the same numbers up to float32 products summed in float64
    stats = gram_stats(x, labels, 4, rows=rows[:70], shift=once.shift, block=9)
    stats = accumulate_gram(stats, x, labels, rows=rows[70:250], block=33)
    for name, u, v in zip(GramStats._fields, stats, once):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-3, err_msg=name)
    assert stats.count.shape == () and float(stats.count) == 250.0
    np.testing.assert_array_equal(stats.gram, stats.gram.T)  # the lower tiles mirror the upper ones


def test_empty_gram_stats_hold_no_rows_and_own_their_shift():
    shift = np.arange(5.0)
    stats = empty_gram_stats(shift, 3)
    assert float(stats.count) == 0.0 and stats.count.shape == ()
    assert stats.gram.shape == (5, 5) and stats.cross.shape == (5, 3) and stats.y_sum.shape == (3,)
    assert not np.shares_memory(stats.shift, shift) and all(a.dtype == np.float64 for a in stats)
    assert not any(np.any(a) for a in (stats.count, stats.x_sum, stats.gram, stats.cross, stats.y_sum))


def test_gram_stats_reads_a_memmap_in_blocks(tmp_path):
    x, labels = _ridge_problem(n=200)
    path = tmp_path / "f.npy"
    np.save(path, x)
    on_disk = np.load(path, mmap_mode="r")  # read-only: an in-place write would raise
    a = gram_stats(on_disk, labels, 4, block=32)
    b = gram_stats(x, labels, 4, block=32)
    np.testing.assert_array_equal(a.gram, b.gram)


def test_predict_features_equals_standardize_then_predict():
    x, labels = _ridge_problem(n=250)
    std, model = fit_ridge(gram_stats(x, labels, 4), 1.0)
    want = np.asarray(predict(model, standardize(std, x)))
    np.testing.assert_array_equal(predict_features(std, model, x, block=16), want)
    assert np.mean(want == labels) > 0.5  # the fit learned the planted classes (chance: 0.25)


def test_ridge_input_errors():
    x, labels = _ridge_problem(n=50)
    with pytest.raises(ValueError, match="one label per row"):
        gram_stats(x, labels[:-1], 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        gram_stats(x, labels, 3)
    with pytest.raises(ValueError, match="no rows"):
        gram_stats(x, labels, 4, rows=[])
    with pytest.raises(ValueError, match=r"rows must be indices in \[0, 50\)"):
        gram_stats(x, labels, 4, rows=[3, 50])
    with pytest.raises(ValueError, match="rows must be distinct"):
        gram_stats(x, labels, 4, rows=[0, 0, 2])
    with pytest.raises(ValueError, match="shift must be"):
        gram_stats(x, labels, 4, shift=np.zeros(29))
    stats = gram_stats(x, labels, 4)
    snapshot = [a.copy() for a in stats]
    with pytest.raises(ValueError, match="holds statistics of 30 features"):
        accumulate_gram(stats, x[:, :10], labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        accumulate_gram(stats, x, np.where(labels == 0, 4, labels))
    with pytest.raises(ValueError, match="float64 NumPy arrays"):
        accumulate_gram(stats._replace(x_sum=stats.x_sum.astype(np.float32)), x, labels)
    frozen = stats._replace(gram=stats.gram.copy())
    frozen.gram.flags.writeable = False  # as np.load(..., mmap_mode="r") gives it
    with pytest.raises(ValueError, match="writeable"):
        accumulate_gram(frozen, x, labels)
    for a, b in zip(stats, snapshot):  # a refused call changes nothing
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="C must be a number > 0"):
        fit_ridge(stats, 0.0)


def test_fit_ridge_refinement_reaches_float64_on_correlated_features():
    # 60 features from 5 latent factors plus 1% noise: at this C, A = Z^T Z + n/(2C) I has a
    # condition number ~1e5, and a float32 factorization alone loses most of its digits. The
    # reference solves the same statistics' system in float64 (what the refinement promises).
    rng = np.random.default_rng(3)
    n, f = 2000, 60
    x = (rng.standard_normal((n, 5)) @ rng.standard_normal((5, f)) + 0.01 * rng.standard_normal((n, f)) + 20.0)
    x = x.astype(np.float32)
    labels = rng.integers(0, 3, n)
    stats = gram_stats(x, labels, 3)
    C = 1000.0
    m = stats.x_sum / n
    gram = stats.gram - n * np.outer(m, m)
    scale = np.sqrt(np.diag(gram) / (n - 1) + 0.01)
    a = gram / np.outer(scale, scale) + n / (2 * C) * np.eye(f)
    ref = np.linalg.solve(a, (stats.cross - np.outer(m, stats.y_sum)) / scale[:, None])
    assert np.linalg.cond(a) > 1e4
    errors = {}
    for refine in (0, 3):
        w = np.asarray(fit_ridge(stats, C, refine=refine)[1].weights, np.float64)[:-1]
        errors[refine] = np.abs(w - ref).max() / np.abs(ref).max()
    assert errors[3] < 1e-6  # float64-grade (the weights are returned in float32: ~1e-7)
    assert errors[0] > 10 * errors[3]  # and the refinement is what got it there


@pytest.fixture(params=[False, True], ids=["numpy", "device"])
def products(request, monkeypatch):
    """The ridge solvers' float32 products through NumPy's BLAS (the CPU default) or through JAX, as
    on an accelerator (here on the CPU device: the same code path, checked against NumPy)."""
    from kmjax.classify import tiled

    monkeypatch.setattr(tiled, "ON_DEVICE", request.param)
    return request.param


def test_tiled_gram_equals_the_plain_product(products):
    # gram_stats sums x^T x from tiles of at most 16,384 columns (NumPy's OpenBLAS crashes on x^T x
    # of 32,000 columns); small tiles with a ragged last one exercise the same code on a small x.
    x = np.random.default_rng(0).standard_normal((50, 23)).astype(np.float32)
    gram = np.ones((23, 23))  # accumulates onto what is there, as accumulate_gram needs
    add_gram(gram, x, tile=7)
    mirror_tiles(gram, tile=7)
    np.testing.assert_allclose(gram, 1.0 + x.astype(np.float64).T @ x, rtol=1e-5, atol=1e-4)
    v = np.random.default_rng(1).standard_normal((23, 3))
    np.testing.assert_allclose(row_tiles_matmul(gram, v, tile=7), gram @ v, rtol=1e-12, atol=1e-10)


def test_tiled_cholesky_solves_like_numpy(products):
    rng = np.random.default_rng(4)
    b = rng.standard_normal((40, 23))
    a = (b.T @ b + 23 * np.eye(23)).astype(np.float32)
    r = rng.standard_normal((23, 3)).astype(np.float32)
    want = np.linalg.solve(a.astype(np.float64), r)
    for block in (5, 7, 23):  # several blocks, and one
        l = cholesky(a.copy(), block=block)  # a ragged last block
        np.testing.assert_allclose(np.tril(l), np.linalg.cholesky(a.astype(np.float64)), atol=1e-5)
        np.testing.assert_allclose(cholesky_solve(l, r, tile=7), want, rtol=1e-4, atol=1e-5)


def test_ridge_solvers_give_the_same_model_with_products_on_the_device(monkeypatch, tmp_path):
    # the whole ridge path (Gram statistics, tiled factorization, CG passes) through JAX against NumPy
    from kmjax.classify import prepare_cg_ridge, solve_cg_ridge, tiled

    x, labels = _correlated_problem(n=600, f=40, seed=3)
    monkeypatch.setattr(tiled, "_TILE", 16)  # several tiles, a ragged last one
    monkeypatch.setattr(tiled, "_BLOCK", 12)
    fits = {}
    for device in (False, True):
        monkeypatch.setattr(tiled, "ON_DEVICE", device)
        stats = gram_stats(x, labels, 4, block=256)
        std, model = fit_ridge(stats, 10.0)
        prep = prepare_cg_ridge(x, labels, 4, rank=16)
        cg = solve_cg_ridge(prep, x, 10.0, tol=1e-8)[1]
        fits[device] = stats.gram, np.asarray(model.weights), np.asarray(cg.weights)
    (g0, w0, c0), (g1, w1, c1) = fits[False], fits[True]
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-6 * np.abs(g0).max())
    np.testing.assert_allclose(w1, w0, atol=1e-5 * np.abs(w0).max())
    np.testing.assert_allclose(c1, c0, atol=1e-4 * np.abs(c0).max())


def test_progress_reports_change_nothing():
    # with a reporter the loop runs in pieces of the same compiled program: the same bits
    from kmjax.classify import standardize, fit_standardizer, train_linear

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)
    xs = standardize(fit_standardizer(x), x)
    quiet_model, quiet_info = train_linear(xs, labels, C=10.0, max_iter=35, tol=0.0)
    seen = []
    model, info = train_linear(xs, labels, C=10.0, max_iter=35, tol=0.0, progress=lambda *a: seen.append(a))
    np.testing.assert_array_equal(np.asarray(model.weights), np.asarray(quiet_model.weights))
    assert int(info.n_iter) == int(quiet_info.n_iter) == 35
    assert [s[0] for s in seen] == [10, 20, 30, 35] and all(s[1] == 35 for s in seen)
    values = [s[2] for s in seen]
    assert all(b <= a + 1e-4 * abs(a) for a, b in zip(values, values[1:]))  # the objective decreases
    np.testing.assert_allclose(values[-1], float(info.loss), rtol=1e-5)  # and ends at the final one
    # the state handed to checkpoint after iteration 20, given back as state=, ends where the whole fit
    # ends, bit for bit (the same compiled loop, in pieces); a state of another call is refused
    states = []
    train_linear(xs, labels, C=10.0, max_iter=35, tol=0.0, checkpoint=lambda s: states.append(jax.tree.map(np.asarray, s)))
    assert [int(s.iterations) for s in states] == [10, 20, 30, 35] and isinstance(states[1], LBFGSState)
    resumed, resumed_info = train_linear(xs, labels, C=10.0, max_iter=35, tol=0.0, state=states[1])
    np.testing.assert_array_equal(np.asarray(resumed.weights), np.asarray(quiet_model.weights))
    assert int(resumed_info.n_iter) == 35
    with pytest.raises(ValueError, match="not an L-BFGS state of this call"):
        train_linear(xs, labels, C=10.0, max_iter=35, memory=5, state=states[1])


def _correlated_problem(n=1500, f=300, seed=0):
    # columns of low rank plus noise, far from zero mean: the hard case for iterative solvers
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 20))
    x = (base @ rng.normal(size=(20, f)) + 0.5 * rng.normal(size=(n, f)) + 3).astype(np.float32)
    return x, (base[:, 0] > 0).astype(np.int64) + 2 * (base[:, 1] > 0)


@pytest.mark.parametrize("C", [1.0, 100.0])
def test_cg_ridge_reaches_the_exact_ridge_solution(C, tmp_path):
    from kmjax.classify import prepare_cg_ridge, solve_cg_ridge

    x, labels = _correlated_problem()
    np.save(tmp_path / "f.npy", x)
    on_disk = np.load(tmp_path / "f.npy", mmap_mode="r")  # read-only: never written
    std, model = fit_ridge(gram_stats(x, labels, 4), C)
    prep = prepare_cg_ridge(on_disk, labels, 4, rank=64)
    std2, model2, info = solve_cg_ridge(prep, on_disk, C, tol=1e-8)
    assert info["converged"] and info["residual"] <= 1e-8
    np.testing.assert_allclose(np.asarray(std2.mean), np.asarray(std.mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(std2.scale), np.asarray(std.scale), rtol=1e-5)
    w, w2 = np.asarray(model.weights), np.asarray(model2.weights)
    # float32 products summed in float64 on both sides: 1e-4 of the largest weight
    np.testing.assert_allclose(w2, w, atol=1e-4 * np.abs(w).max())
    np.testing.assert_array_equal(predict_features(std2, model2, x), predict_features(std, model, x))
    # a warm start from the solution needs (almost) no pass
    assert solve_cg_ridge(prep, on_disk, C, init=w2[:-1], tol=1e-6)[2]["iterations"] <= 2


def test_fit_classifier_ridge_cg_matches_the_gram_solver():
    import jax

    from kmjax.classify import fit_classifier

    x, labels = _correlated_problem(n=1200, f=200, seed=1)
    kw = dict(num_classes=4, loss="ridge", C_grid=[1.0, 10.0], key=jax.random.key(0), copies=2)
    exact = fit_classifier(x, labels, **kw)
    cg = fit_classifier(x, labels, solver="cg", rank=64, **kw)
    assert cg.C == exact.C and set(cg.scores) == set(exact.scores)
    for C in exact.scores:
        assert abs(cg.scores[C] - exact.scores[C]) <= 2 / 60  # at most a held-out image or two differ
    np.testing.assert_allclose(np.asarray(cg.model.weights), np.asarray(exact.model.weights),
                               atol=1e-3 * np.abs(np.asarray(exact.model.weights)).max())
    with pytest.raises(ValueError, match="solver 'cg' is for loss='ridge'"):
        fit_classifier(x, labels, num_classes=4, loss="svm", solver="cg")


class _MemoryCheckpoints:
    """``fit_classifier(state=, checkpoint=)`` in memory: the last state, copied (the fit goes on to
    change its arrays in place), and the parts each call handed over."""

    def __init__(self):
        self.state, self.parts = None, set()

    def __call__(self, state):
        assert isinstance(state, ClassifierState)
        self.state = jax.tree.map(np.copy, state)
        self.parts |= set(state.parts())


@pytest.mark.parametrize("solver", ["gram", "cg"])
def test_fit_classifier_resumes_a_ridge_fit_from_its_checkpoints(solver, monkeypatch):
    from kmjax.classify import fit_classifier, select

    x, labels = _correlated_problem(n=1200, f=200, seed=1)
    kw = dict(num_classes=4, loss="ridge", C_grid=[1.0, 10.0], key=jax.random.key(0), copies=2, solver=solver,
              rank=64)
    store, first_log, again_log = _MemoryCheckpoints(), [], []
    first = fit_classifier(x, labels, checkpoint=store, log=first_log.append, **kw)
    assert sorted(store.parts) == (["gram"] if solver == "gram" else
                                   ["cg-final", "cg-prep-final", "cg-prep-search", "cg-search-C1", "cg-search-C10"])
    assert sorted(store.state.parts()) == sorted(store.parts)
    if solver == "gram":  # saved before the held-out rows join: the statistics of the fitted rows only
        assert float(store.state.gram.count) == 1080
    else:
        assert set(store.state.cg_search) == {1.0, 10.0}
    # resumed: nothing computed again that was saved
    for name in ("gram_stats", "prepare_cg_ridge"):
        monkeypatch.setattr(select, name, lambda *a, **k: pytest.fail("computed again"))
    again = fit_classifier(x, labels, state=store.state, checkpoint=store, log=again_log.append, **kw)
    assert again.C == first.C and again.scores == first.scores
    np.testing.assert_array_equal(np.asarray(again.model.weights), np.asarray(first.model.weights))
    if solver == "cg":  # each C continues from its saved solver state, here converged: no pass, the same weights
        passes = [int(line.split(": ")[1].split()[0]) for line in again_log if line.startswith("  C = ") and "passes" in line]
        first_passes = [int(line.split(": ")[1].split()[0]) for line in first_log if line.startswith("  C = ") and "passes" in line]
        assert passes == first_passes and min(first_passes) > 2, (first_log, again_log)


def test_fit_classifier_announces_each_step_before_its_progress():
    from kmjax.classify import fit_classifier

    x, labels = _correlated_problem(n=400, f=30, seed=2)
    events = []
    fit_classifier(x, labels, num_classes=4, loss="ridge", solver="cg", rank=8, log=lambda line: events.append(line),
                   progress=lambda done, total, value: events.append((done, total)))
    steps = [i for i, e in enumerate(events) if isinstance(e, str) and not e.startswith("  C = ")]
    assert [events[i].split(":")[0] for i in steps] == ["  CG set-up", "  CG at C = 100"]
    assert events[steps[0] + 1 : steps[1]] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the set-up's four passes
    assert all(total == 1000 for _, total in events[steps[1] + 1 : -1])  # then the solve's, of max_iter


def test_mirror_averaging_sums_the_two_views_scores():
    from kmjax.classify import fit_classifier

    x, labels = _correlated_problem(n=400, f=30, seed=2)
    std, model = fit_ridge(gram_stats(x, labels, 4), 1.0)
    rng = np.random.default_rng(0)
    other = x + rng.normal(size=x.shape).astype(np.float32)
    scores = [np.asarray(standardize(std, v) @ model.weights) for v in (x, other)]
    np.testing.assert_array_equal(predict_features(std, model, x, mirrors=other, block=64),
                                  np.argmax(scores[0] + scores[1], axis=1))
    with pytest.raises(ValueError, match="mirrors must have"):
        predict_features(std, model, x, mirrors=other[:5])
    with pytest.raises(ValueError, match="mirror_scoring needs the mirrored rows: copies >= 2"):
        fit_classifier(x, labels, num_classes=4, mirror_scoring=True)


def test_every_solver_state_reads_back_through_its_derived_template(tmp_path):
    """Each state's template comes from its init (``kmjax.templates.derived``): a state of other sizes
    saved with ``save_tree`` reads back through it, and one of another state's shapes is refused."""
    from kmjax import templates
    from kmjax.checkpoint import FileFormatError, load_tree, save_tree
    from kmjax.classify import empty_kernel_stats, init_cg, init_lbfgs, prepare_cg_ridge
    from kmjax.lloyd import LoopState

    x, labels = _ridge_problem(n=60)
    prep = prepare_cg_ridge(x, labels, 4, rank=6)
    states = {
        "lbfgs": (init_lbfgs(31, 4, 20), templates.lbfgs_state()),
        "gram": (gram_stats(x, labels, 4), templates.fit_state("gram")),
        "kernel": (empty_kernel_stats(60, 30), templates.fit_state("kernel")),
        "cg-prep": (prep, templates.fit_state("cg-prep-final")),
        "cg": (init_cg(prep, x, 10.0), templates.fit_state("cg-search-C10")),
        "kmeans": (LoopState(np.ones((5, 4), np.float32), np.full(9, np.nan, np.float32), np.int32(3), np.bool_(False)),
                   templates.fit_state("kmeans")),
    }
    for name, (state, like) in states.items():
        path = save_tree(tmp_path / f"{name}.npz", jax.tree.map(np.asarray, state))
        back, _ = load_tree(path, like)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=name)
    bad = empty_gram_stats(np.zeros(30), 4)._replace(gram=np.zeros((30, 29)))  # F must agree everywhere
    with pytest.raises(FileFormatError, match="must agree"):
        load_tree(save_tree(tmp_path / "bad.npz", bad), templates.fit_state("gram"))


def test_a_field_added_to_a_state_is_in_its_derived_template():
    from typing import NamedTuple

    from kmjax.templates import derived

    class State(NamedTuple):
        weights: np.ndarray
        best: np.ndarray  # the new field: made by init, so in the template with no other edit

    def init(F, classes):
        return State(np.zeros((F, classes)), np.full(classes, np.inf))

    like = derived(init, F=7, classes=3)
    assert like.weights.shape == ("F", "classes") and like.weights.finite
    assert like.best.shape == ("classes",) and not like.best.finite and like.best.kind == "f"
    with pytest.raises(ValueError, match="distinct"):
        derived(init, F=3, classes=3)


def test_rows_are_padded_only_where_compiling_costs_more(monkeypatch):
    """kmjax._ops.bucket: on a CPU (this backend) n itself, by default; forced either way."""
    from kmjax._ops import bucket
    monkeypatch.delenv("KMJAX_BUCKET_ROWS", raising=False)
    assert bucket(50_000) == 50_000
    monkeypatch.setenv("KMJAX_BUCKET_ROWS", "1")
    assert [bucket(n) for n in (50_000, 76, 70, 16)] == [53_248, 80, 72, 16]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("KMJAX_BUCKET_ROWS")
    assert bucket(50_000) == 53_248
    monkeypatch.setenv("KMJAX_BUCKET_ROWS", "0")
    assert bucket(50_000) == 50_000
