"""Tests for kmjax.cluster against loop-based float64 NumPy references and scikit-learn."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmjax.cluster import EMPTY_POLICIES, INITS, KMeansResult, assign, init_centroids, kmeans

KEY = jax.random.key(0)


# ---------------------------------------------------------------- references and data


def sqdist_ref(x, c):
    """(N, K) squared distances, one centroid at a time, float64."""
    x = np.asarray(x, np.float64)
    c = np.asarray(c, np.float64)
    return np.stack([((x - cj) ** 2).sum(axis=1) for cj in c], axis=1)


def lloyd_ref(x, c0, iters, weights=None, min_margin=1e-4):
    """Plain Lloyd in float64: nearest centroid, weighted mean update, empty cluster -> 0.

    Returns (centroids, labels of the final centroids, objective at the start of each iteration).
    Asserts that no point is within ``min_margin`` of a tie, so float32 cannot flip a label.
    """
    x = np.asarray(x, np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    c = np.array(c0, np.float64)
    objective = []
    for _ in range(iters):
        d = sqdist_ref(x, c)
        labels = d.argmin(axis=1)
        part = np.sort(d, axis=1)
        assert (part[:, 1] - part[:, 0]).min() > min_margin, "near-tie: choose other test data"
        objective.append((w * d[np.arange(len(x)), labels]).sum())
        for j in range(len(c)):
            m = labels == j
            c[j] = (w[m, None] * x[m]).sum(axis=0) / w[m].sum() if w[m].sum() > 0 else 0.0
    labels = sqdist_ref(x, c).argmin(axis=1)
    return c, labels, np.array(objective)


def spherical_ref(x, c0, iters, min_margin=1e-4):
    """Gain-shape k-means in float64: label = argmax |x.c|, c_j <- normalize(sum_i (x_i.c_j) x_i)."""
    x = np.asarray(x, np.float64)
    c = np.array(c0, np.float64)
    for _ in range(iters):
        proj = x @ c.T
        labels = np.abs(proj).argmax(axis=1)
        part = np.sort(np.abs(proj), axis=1)
        assert (part[:, -1] - part[:, -2]).min() > min_margin, "near-tie: choose other test data"
        for j in range(len(c)):
            s = np.zeros(x.shape[1])
            for i in np.flatnonzero(labels == j):
                s += proj[i, j] * x[i]
            norm = np.linalg.norm(s)
            c[j] = s / norm if norm > 0 else 0.0
    return c


def blobs(n_per, centers, std, seed):
    """Gaussian blobs around ``centers`` (K, D), float32, shuffled."""
    rng = np.random.default_rng(seed)
    centers = np.asarray(centers, np.float64)
    x = np.concatenate([c + std * rng.normal(size=(n_per, centers.shape[1])) for c in centers])
    labels = np.repeat(np.arange(len(centers)), n_per)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), labels[perm]


def unit_data(n=150, d=3, k=4, seed=0):
    """Unit-scale overlapping blobs (several Lloyd iterations to converge) and an init of k
    data points."""
    rng = np.random.default_rng(seed)
    x, _ = blobs(n // k, rng.normal(size=(k, d)), 0.5, seed)
    c0 = x[rng.choice(len(x), k, replace=False)]
    return x, c0


# ---------------------------------------------------------------- Lloyd vs references


@pytest.mark.parametrize("max_iter", [0, 1, 6])
def test_lloyd_matches_numpy_reference(max_iter):
    x, c0 = unit_data(seed=1)
    res = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=max_iter, empty="zero")
    assert isinstance(res, KMeansResult)
    c_ref, labels_ref, obj_ref = lloyd_ref(x, c0, max_iter)
    assert res.centroids.shape == (4, 3) and res.centroids.dtype == np.float32
    # Means of ~40 unit-scale float32 points: rounding ~1e-7, so 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(res.centroids), c_ref, atol=1e-5)
    index, _ = assign(x, res.centroids)
    np.testing.assert_array_equal(np.asarray(index), labels_ref)
    np.testing.assert_array_equal(np.asarray(res.counts), np.bincount(labels_ref, minlength=4))
    # Sums of 150 float32 squared distances: 1e-5 relative.
    np.testing.assert_allclose(np.asarray(res.objective), obj_ref, rtol=1e-5)
    inertia_ref = sqdist_ref(x, c_ref)[np.arange(len(x)), labels_ref].sum()
    np.testing.assert_allclose(float(res.inertia), inertia_ref, rtol=1e-5)


@pytest.mark.parametrize("max_iter", [2, 50])
def test_inertia_matches_sklearn(max_iter):
    from sklearn.cluster import KMeans

    x, c0 = unit_data(n=200, d=4, k=5, seed=2)
    res = kmeans(KEY, x, 5, init=c0, tol=None, max_iter=max_iter, empty="zero")
    sk = KMeans(5, init=c0.astype(np.float64), n_init=1, max_iter=max_iter, tol=0, algorithm="lloyd")
    sk.fit(x.astype(np.float64))
    # float32 vs float64 sums of 200 O(1) terms: the brief's 1e-4 relative.
    np.testing.assert_allclose(float(res.inertia), sk.inertia_, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(res.centroids), sk.cluster_centers_, atol=1e-5)


# ---------------------------------------------------------------- objective never increases


def check_monotone(res, x):
    n = int(res.n_iter)
    obj = np.asarray(res.objective, np.float64)
    assert n >= 1 and np.all(np.isfinite(obj[:n]))
    # Each error is ||x||^2 - 2 x.c + ||c||^2 (spherical: ||x||^2 - (c.x)^2) in float32, and a
    # unit centroid's norm is only 1 +- 1e-7: rounding is ~1e-7 of sum ||x||^2 (and of the first
    # objective), not of the (possibly much smaller) current objective. Slack: 1e-6 of that scale.
    slack = 1e-6 * max(obj[0], float((x.astype(np.float64) ** 2).sum()))
    assert np.all(np.diff(obj[:n]) <= slack), obj[:n]
    assert float(res.inertia) <= obj[n - 1] + slack


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("seed", [0, 1])
def test_objective_non_increasing(seed, init, spherical):
    x = np.random.default_rng(seed).normal(size=(120, 3)).astype(np.float32)  # no cluster structure: many iterations
    res = kmeans(jax.random.key(seed), x, 7, init=init, tol=None, max_iter=25, spherical=spherical)
    check_monotone(res, x)
    assert int(res.n_iter) == 25
    # It did move: the last objective is below the first (random starts are far from optimal).
    assert res.objective[24] < res.objective[0]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0),
    offset=st.floats(-5.0, 5.0),
    spherical=st.booleans(),
    empty=st.sampled_from(EMPTY_POLICIES),
)
def test_objective_non_increasing_property(seed, scale, offset, spherical, empty):
    # One shape (32 x 2, k = 5) so that examples share compilations; data, scale, offset,
    # variant and empty policy vary. randn init (0.1 * N(0, 1)) often leaves clusters empty.
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(32, 2)) * rng.uniform(0.1, 1.0, size=2) * scale + offset).astype(np.float32)
    res = kmeans(jax.random.key(seed), x, 5, init="randn", tol=None, max_iter=10, spherical=spherical, empty=empty)
    check_monotone(res, x)


# ---------------------------------------------------------------- chunking, jit, weights


def test_chunk_size_does_not_change_result():
    x, c0 = unit_data(n=200, d=4, k=5, seed=3)
    runs = {
        chunk: kmeans(KEY, x, 5, init=c0, tol=None, max_iter=8, chunk_size=chunk)
        for chunk in (7, 64, 200)  # 7 and 64 do not divide N = 200 (padded chunks)
    }
    base = runs[200]
    for chunk, res in runs.items():
        # Only the summation order differs: float32 rounding of unit-scale means, 1e-5 abs.
        np.testing.assert_allclose(np.asarray(res.centroids), np.asarray(base.centroids), atol=1e-5, err_msg=str(chunk))
        np.testing.assert_array_equal(np.asarray(res.counts), np.asarray(base.counts))  # pads weigh 0
        np.testing.assert_allclose(float(res.inertia), float(base.inertia), rtol=1e-5)
    idx7, d7 = assign(x, base.centroids, chunk_size=7)
    idx, d = assign(x, base.centroids)
    assert idx7.shape == (200,)
    np.testing.assert_array_equal(np.asarray(idx7), np.asarray(idx))
    # Different product shapes round differently; expanded-form cancellation ~1e-7 * ||x||^2.
    np.testing.assert_allclose(np.asarray(d7), np.asarray(d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
def test_jit_and_no_jit_agree(spherical):
    x, c0 = unit_data(n=12, d=2, k=3, seed=4)
    if spherical:
        c0 = c0 / np.linalg.norm(c0, axis=1, keepdims=True)
    kw = dict(init=c0, tol=None, max_iter=3, spherical=spherical)
    jitted = kmeans(KEY, x, 3, **kw)
    with jax.disable_jit():
        eager = kmeans(KEY, x, 3, **kw)
    # Same float32 arithmetic, possibly fused differently: 1e-5.
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_integer_weights_equal_duplicated_points():
    x, c0 = unit_data(n=60, d=3, k=3, seed=5)
    w = np.random.default_rng(5).integers(0, 4, size=len(x))  # includes 0: point dropped
    dup = np.repeat(x, w, axis=0)
    kw = dict(init=c0, tol=None, max_iter=8, empty="zero")
    a = kmeans(KEY, x, 3, weights=w.astype(np.float32), **kw)
    b = kmeans(KEY, dup, 3, **kw)
    # Weighted and repeated float32 sums of unit-scale points: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(a.centroids), np.asarray(b.centroids), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.counts), np.asarray(b.counts))  # sums of small ints: exact
    np.testing.assert_allclose(float(a.inertia), float(b.inertia), rtol=1e-5)
    c_ref, _, _ = lloyd_ref(x, c0, 8, weights=w)
    np.testing.assert_allclose(np.asarray(a.centroids), c_ref, atol=1e-5)


# ---------------------------------------------------------------- empty clusters


@pytest.fixture(scope="module")
def far_init_problem():
    """Three tight blobs far from the origin and an init with a fourth centroid far from all data
    (it is empty after the first assignment; the origin is also far from all data)."""
    centers = np.array([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    x, _ = blobs(30, centers, 0.5, seed=6)
    c0 = np.vstack([centers + 0.3, [[100.0, 100.0]]]).astype(np.float32)
    return x, c0, centers


def test_empty_zero(far_init_problem):
    x, c0, _ = far_init_problem
    res = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=5, empty="zero")
    np.testing.assert_array_equal(np.asarray(res.centroids[3]), [0.0, 0.0])
    assert float(res.counts[3]) == 0.0
    np.testing.assert_array_equal(np.asarray(res.counts[:3]), [30, 30, 30])


def test_empty_reseed(far_init_problem):
    x, c0, centers = far_init_problem
    zero = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=5, empty="zero")
    res = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=5, empty="reseed")
    counts = np.asarray(res.counts)
    assert np.all(counts > 0) and counts.sum() == len(x)
    # The fourth centroid moved from (100, 100) into one of the blobs (std 0.5).
    assert np.linalg.norm(centers - np.asarray(res.centroids[3]), axis=1).min() < 3.0
    assert float(res.inertia) < float(zero.inertia)


def test_empty_reseed_several_empty_clusters(far_init_problem):
    x, _, centers = far_init_problem
    c0 = np.vstack([centers[:1] + 0.3, [[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]]).astype(np.float32)
    res = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=6, empty="reseed")
    # Three empty clusters in the first iteration take three distinct points: none stays empty.
    assert np.all(np.asarray(res.counts) > 0)
    assert len({tuple(c) for c in np.round(np.asarray(res.centroids), 4)}) == 4


def test_empty_reseed_takes_worst_served_points_in_order(far_init_problem):
    x, _, centers = far_init_problem
    c0 = np.vstack([centers[:1] + 0.3, [[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]]).astype(np.float32)
    res = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=1, empty="reseed")
    # First assignment: every point goes to c0[0]; clusters 1, 2, 3 are empty and take, in
    # order, the 1st, 2nd, 3rd worst-served points (largest distance to c0[0]).
    err = sqdist_ref(x, c0).min(axis=1)
    worst = np.argsort(-err)[:3]
    assert np.sort(err)[-3] - np.sort(err)[-4] > 1e-3  # no ties in the ranking
    np.testing.assert_array_equal(np.asarray(res.centroids[1:]), x[worst])
    np.testing.assert_allclose(np.asarray(res.centroids[0]), x.mean(axis=0), atol=1e-5)  # float32 mean


# ---------------------------------------------------------------- n_iter / converged


def test_tol_none_runs_max_iter():
    x, c0 = unit_data(seed=7)
    res = kmeans(KEY, x, 4, init=c0, tol=None, max_iter=6)
    assert int(res.n_iter) == 6
    assert not bool(res.converged)
    assert np.all(np.isfinite(np.asarray(res.objective)))


def test_tol_zero_converges_early_on_separated_data(far_init_problem):
    x, _, centers = far_init_problem
    c0 = (centers + 0.3).astype(np.float32)
    res = kmeans(KEY, x, 3, init=c0, tol=0.0, max_iter=20)
    n = int(res.n_iter)
    assert bool(res.converged)
    assert 2 <= n < 20  # needs one iteration to compare with; fixed point after ~2
    obj = np.asarray(res.objective)
    assert obj.shape == (20,)
    assert np.all(np.isfinite(obj[:n])) and np.all(np.isnan(obj[n:]))


# ---------------------------------------------------------------- init


@pytest.mark.parametrize("method", INITS)
def test_init_shape_finite_and_reproducible(method):
    x = np.random.default_rng(8).normal(size=(120, 3)).astype(np.float32)  # shapes shared with
    c = init_centroids(jax.random.key(1), x, 7, method)  # the objective tests: same compilations
    assert c.shape == (7, 3) and c.dtype == np.float32
    assert np.all(np.isfinite(np.asarray(c)))
    again = init_centroids(jax.random.key(1), x, 7, method)
    other = init_centroids(jax.random.key(2), x, 7, method)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(again))
    assert not np.array_equal(np.asarray(c), np.asarray(other))
    sph = init_centroids(jax.random.key(1), x, 7, method, spherical=True)
    # Unit rows: float32 normalization, 1e-6.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sph), axis=1), 1.0, atol=1e-6)


def test_init_random_distinct_rows_of_x():
    x, _ = unit_data(n=40, d=3, k=4, seed=9)
    for seed in range(5):
        c = np.asarray(init_centroids(jax.random.key(seed), x, 10, "random"))
        rows = [np.flatnonzero((x == ci).all(axis=1)) for ci in c]
        assert all(len(r) == 1 for r in rows)  # each centroid is exactly one row of x
        assert len({int(r[0]) for r in rows}) == 10  # distinct rows


def test_init_kmeanspp_one_per_cluster():
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    x, labels = blobs(25, centers, 1.0, seed=10)
    good = 0
    for seed in range(20):
        c = np.asarray(init_centroids(jax.random.key(seed), x, 4, "k-means++"))
        picked = [labels[np.flatnonzero((x == ci).all(axis=1))[0]] for ci in c]
        good += len(set(picked)) == 4
    # D^2 sampling: a second pick from an already-hit cluster has probability ~1e-4 per draw,
    # whereas uniform picks would hit all 4 clusters only 4!/4^4 ~ 9% of the time.
    assert good >= 19


def test_init_kmeanspp_samples_proportional_to_squared_distance():
    # Points 0, 1, 10 on a line; the huge weight on 0 makes it the first centroid. The second is
    # drawn with probability w * D^2: P(1) = 1 / (1 + 100) ~ 1% (D instead of D^2: 1/11 ~ 9%).
    x = np.array([[0.0], [1.0], [10.0]], np.float32)
    w = np.array([1e6, 1.0, 1.0], np.float32)
    picks = []
    for seed in range(200):
        c = np.asarray(init_centroids(jax.random.key(seed), x, 2, "k-means++", weights=w))
        assert c[0, 0] == 0.0 and c[1, 0] in (1.0, 10.0)  # never the chosen point again (D = 0)
        picks.append(c[1, 0])
    # Expected count of 1.0: 2 for D^2, 18 for D; <= 7 separates them (each tail ~1e-3).
    assert picks.count(1.0) <= 7


def test_init_randn_scale():
    x = np.zeros((50, 40), np.float32) + 5.0  # randn ignores the data
    c = np.asarray(init_centroids(KEY, x, 20, "randn"))
    # 800 draws of 0.1 * N(0, 1): sample std within 15% of 0.1 (about 4 standard errors).
    assert 0.085 < c.std() < 0.115 and abs(c.mean()) < 0.02


# ---------------------------------------------------------------- spherical


def test_spherical_unit_norm_and_abs_projection_assignment():
    # Shapes and options as in test_objective_non_increasing: shares its compilations.
    x = np.random.default_rng(11).normal(size=(120, 3)).astype(np.float32)
    res = kmeans(KEY, x, 7, spherical=True, tol=None, max_iter=25)
    c = np.asarray(res.centroids, np.float64)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)  # float32 normalize
    index, sq = assign(x, res.centroids, spherical=True)
    proj = x.astype(np.float64) @ c.T
    want = np.abs(proj).argmax(axis=1)
    part = np.sort(np.abs(proj), axis=1)
    assert (part[:, -1] - part[:, -2]).min() > 1e-5  # no near-ties that float32 could flip
    np.testing.assert_array_equal(np.asarray(index), want)
    resid = (x.astype(np.float64) ** 2).sum(axis=1) - proj[np.arange(len(x)), want] ** 2
    # Residuals of O(1-10) values from float32 products: 1e-4 relative, 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(sq), resid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(res.inertia), resid.sum(), rtol=1e-4)


def test_spherical_matches_numpy_reference():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    c0 = rng.normal(size=(5, 4))
    c0 = (c0 / np.linalg.norm(c0, axis=1, keepdims=True)).astype(np.float32)
    res = kmeans(KEY, x, 5, init=c0, spherical=True, tol=None, max_iter=5, empty="zero")
    # Unit vectors from float32 sums of ~20 unit-scale terms: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(res.centroids), spherical_ref(x, c0, 5), atol=1e-5)


# ---------------------------------------------------------------- assign


def test_assign_matches_numpy_argmin():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    c = rng.normal(size=(7, 4)).astype(np.float32)
    index, sq = assign(x, c)
    assert index.shape == (100,) and index.dtype == np.int32 and sq.dtype == np.float32
    d = sqdist_ref(x, c)
    part = np.sort(d, axis=1)
    assert (part[:, 1] - part[:, 0]).min() > 1e-4  # no near-ties in this data
    np.testing.assert_array_equal(np.asarray(index), d.argmin(axis=1))
    # Expanded ||x||^2 - 2 x.c + ||c||^2 in float32 cancels ~1e-7 * ||x||^2 (~1e-6 here)
    # absolutely; 1e-4 relative plus 1e-5 absolute for the few tiny distances.
    np.testing.assert_allclose(np.asarray(sq), d.min(axis=1), rtol=1e-4, atol=1e-5)


def test_assign_lowest_index_on_exact_tie():
    x = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
    c = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], np.float32)  # point 0 equidistant from all
    index, _ = assign(x, c)
    np.testing.assert_array_equal(np.asarray(index), [0, 0])


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
    return np.random.default_rng(14).normal(size=(10, 3)).astype(np.float32)


def test_error_k_too_large(small):
    with pytest.raises(ValueError, match=r"k=11 is larger than the number of points \(10\)"):
        kmeans(KEY, small, 11)
    with pytest.raises(ValueError, match=r"k=11 is larger"):
        init_centroids(KEY, small, 11)


@pytest.mark.parametrize("k", [0, -1])
def test_error_k_not_positive(small, k):
    with pytest.raises(ValueError, match=r"k must be a positive integer"):
        kmeans(KEY, small, k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_non_finite_x(small, bad):
    x = small.copy()
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf"):
        kmeans(KEY, x, 2)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        assign(x, small[:2])


def test_error_init_shape(small):
    with pytest.raises(ValueError, match=r"init array must have shape \(k, D\) = \(2, 3\)"):
        kmeans(KEY, small, 2, init=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"init array must have shape"):
        kmeans(KEY, small, 2, init=np.zeros((2, 4), np.float32))


def test_error_init_non_finite(small):
    c0 = small[:2].copy()
    c0[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"init contains 1 NaN or Inf"):
        kmeans(KEY, small, 2, init=c0)


def test_error_unknown_init(small):
    with pytest.raises(ValueError, match=r"unknown init 'kmeans\+\+'"):
        kmeans(KEY, small, 2, init="kmeans++")
    with pytest.raises(ValueError, match=r"unknown init"):
        init_centroids(KEY, small, 2, "uniform")


def test_error_unknown_empty_policy(small):
    with pytest.raises(ValueError, match=r"unknown empty-cluster policy 'drop'"):
        kmeans(KEY, small, 2, empty="drop")


@pytest.mark.parametrize("max_iter", [-3, 1.5, True])
def test_error_max_iter(small, max_iter):
    with pytest.raises(ValueError, match=r"max_iter must be an integer >= 0"):
        kmeans(KEY, small, 2, max_iter=max_iter)


def test_error_chunk_size(small):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        kmeans(KEY, small, 2, chunk_size=0)


def test_error_weights(small):
    with pytest.raises(ValueError, match=r"weights must have shape \(10,\)"):
        kmeans(KEY, small, 2, weights=np.ones(9))
    with pytest.raises(ValueError, match=r"weights must be finite, >= 0 and not all zero"):
        kmeans(KEY, small, 2, weights=-np.ones(10))
    with pytest.raises(ValueError, match=r"not all zero"):
        kmeans(KEY, small, 2, weights=np.zeros(10))


def test_error_assign_dimension_mismatch(small):
    with pytest.raises(ValueError, match=r"centroids have dimension 4 but x has 3"):
        assign(small, np.zeros((2, 4), np.float32))


def test_error_x_not_matrix(small):
    with pytest.raises(ValueError, match=r"x must be a 2-D array"):
        kmeans(KEY, small[None], 2)
    with pytest.raises(ValueError, match=r"x is empty"):
        kmeans(KEY, np.zeros((0, 3), np.float32), 1)


def test_list_input_accepted_like_array(small):
    want = kmeans(KEY, small, 2, init=small[:2], max_iter=3)
    got = kmeans(KEY, small.tolist(), 2, init=small[:2], max_iter=3)
    np.testing.assert_array_equal(np.asarray(got.centroids), np.asarray(want.centroids))
    index, _ = assign(small.tolist(), small[:2])
    np.testing.assert_array_equal(np.asarray(index), np.asarray(assign(small, small[:2])[0]))


def test_bfloat16_products_are_close_to_float32_but_not_equal():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    c0 = x[:8]
    f32 = kmeans(KEY, x, 8, init=c0, max_iter=5, tol=None)
    bf16 = kmeans(KEY, x, 8, init=c0, max_iter=5, tol=None, precision="bfloat16")
    # bf16 keeps 8 mantissa bits: the distances change in the 3rd digit, the objective barely
    rel = abs(float(bf16.inertia) - float(f32.inertia)) / float(f32.inertia)
    assert 0 < rel < 1e-2
    with pytest.raises(ValueError, match="unknown precision"):
        kmeans(KEY, x, 8, precision="float16")


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_matmul_update_equals_scatter_update(spherical, weighted):
    # "matmul" (one-hot^T @ points, the accelerators' default: deterministic there) sums the same
    # points per centroid as "scatter" (segment_sum), in another order: float32 rounding only
    x, c0 = unit_data(n=400, d=6, k=5, seed=3)
    w = np.random.default_rng(0).uniform(0.5, 2, len(x)).astype(np.float32) if weighted else None
    kw = dict(init=c0, tol=None, max_iter=8, spherical=spherical, weights=w, chunk_size=64, empty="zero")
    a = kmeans(KEY, x, 5, update="scatter", **kw)
    b = kmeans(KEY, x, 5, update="matmul", **kw)
    np.testing.assert_allclose(np.asarray(b.centroids), np.asarray(a.centroids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.counts), np.asarray(a.counts), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b.objective), np.asarray(a.objective), rtol=1e-5)
    again = kmeans(KEY, x, 5, update="matmul", **kw)
    np.testing.assert_array_equal(np.asarray(again.centroids), np.asarray(b.centroids))  # same bits
    with pytest.raises(ValueError, match="unknown update"):
        kmeans(KEY, x, 5, update="atomic", **kw)


@pytest.mark.parametrize("spherical", [False, True])
def test_pallas_kernel_finds_the_same_nearest_centroids(spherical):
    # the fused kernel (interpreted on the CPU) against NumPy in float64, with K and D not multiples
    # of its blocks (padded centroids must never win) and rows spanning several row blocks
    from kmjax.nearest import nearest_pallas

    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 27)).astype(np.float32)
    c = rng.standard_normal((200, 27)).astype(np.float32)
    best, index, code = map(np.asarray, nearest_pallas(x, c, spherical=spherical))
    proj = x.astype(np.float64) @ c.T.astype(np.float64)
    scores = np.abs(proj) if spherical else proj - 0.5 * np.sum(c.astype(np.float64) ** 2, axis=1)
    want = scores.argmax(axis=1)
    top2 = np.sort(scores, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # no near-tie that float32 rounding could flip
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(index[clear], want[clear])
    np.testing.assert_allclose(best, scores.max(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(code[clear], proj[np.arange(300), want][clear], rtol=1e-5, atol=1e-5)
    # ties go to the lowest index, as jnp.argmax: two copies of x[0] in different centroid blocks
    twin = np.concatenate([x[:1], c[1:150], x[:1]])
    twin_index = np.asarray(nearest_pallas(x, twin, spherical=spherical, block_k=64)[1])
    assert np.any(twin_index == 0) and not np.any(twin_index == 150)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_with_the_pallas_kernel_equals_the_xla_path(spherical):
    x, c0 = unit_data(n=400, d=6, k=5, seed=3)
    kw = dict(init=c0, tol=None, max_iter=6, spherical=spherical, chunk_size=128, empty="zero")
    a = kmeans(KEY, x, 5, **kw)
    b = kmeans(KEY, x, 5, kernel="pallas", **kw)
    np.testing.assert_allclose(np.asarray(b.centroids), np.asarray(a.centroids), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b.counts), np.asarray(a.counts))
    np.testing.assert_allclose(np.asarray(b.objective), np.asarray(a.objective), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel"):
        kmeans(KEY, x, 5, kernel="triton", **kw)


def test_progress_reports_change_nothing():
    x, c0 = unit_data(n=300, d=4, k=5, seed=5)
    quiet = kmeans(KEY, x, 5, init=c0, max_iter=7, tol=None)
    seen = []
    loud = kmeans(KEY, x, 5, init=c0, max_iter=7, tol=None, progress=lambda *a: seen.append(a))
    for a, b in zip(quiet, loud):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same compiled loop, in pieces
    assert [s[:2] for s in seen] == [(i, 7) for i in range(1, 8)]
    np.testing.assert_array_equal([s[2] for s in seen], np.asarray(quiet.objective))


def test_kmeans_continues_from_a_checkpointed_loop_state():
    # the state handed to checkpoint after iteration 3, given back as state=, ends where the whole run
    # ends, bit for bit (the same compiled loop, run in pieces); a state of another call is refused
    x = np.random.default_rng(4).normal(size=(300, 5)).astype(np.float32)
    kw = dict(init="random", max_iter=7, tol=None, empty="reseed")
    whole = kmeans(KEY, x, 6, **kw)
    states = []
    kmeans(KEY, x, 6, checkpoint=lambda s: states.append(jax.tree.map(np.asarray, s)), **kw)
    assert [int(s.it) for s in states] == list(range(1, 8))
    resumed = kmeans(KEY, x, 6, state=states[2], **kw)
    for a, b in zip(whole, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="not a k-means loop state of this call"):
        kmeans(KEY, x, 5, state=states[2], **kw)
