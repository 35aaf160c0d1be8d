"""kmjax.sklearn: scikit-learn's estimator checks, agreement with sklearn.cluster.KMeans, and
CoatesFeatures in Pipeline / GridSearchCV. Skipped when scikit-learn is not installed."""

import pickle

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

import jax  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.cluster import KMeans as SkKMeans  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import kmjax  # noqa: E402
from kmjax.sklearn import CoatesFeatures, KMeans  # noqa: E402


# --- scikit-learn's own estimator checks --------------------------------------------------------
# Two configurations; both cover every API check. The default init ("k-means++") behaves the same
# as "random" for these checks but compiles about 4x slower per data shape, which would double
# this file's runtime; k-means++ is exercised by the tests further down.
_CHECKED = [
    KMeans(n_clusters=3, max_iter=20, init="random"),
    KMeans(n_clusters=3, max_iter=20, init="randn"),
]


def _expected_failed_checks(estimator):
    if isinstance(estimator.init, str) and estimator.init in ("k-means++", "random"):
        # Same entry as scikit-learn's own KMeans: the init's random draws depend on the number
        # of rows, so fitting on repeated rows and fitting with integer weights start from
        # different centroids. The data-independent "randn" init passes this check.
        return {"check_sample_weight_equivalence_on_dense_data":
                "the k-means++/random init draws depend on the number of rows, so repeating rows "
                "is not equivalent to integer sample weights (as for sklearn.cluster.KMeans)"}
    return {}


@parametrize_with_checks(_CHECKED, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


# --- KMeans against sklearn.cluster.KMeans and NumPy -------------------------------------------


def _blobs(n=300, d=5, k=4, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.normal(0, 4, (k, d))
    return centers[rng.randint(k, size=n)] + rng.normal(size=(n, d))


def _sq_dist(X, C):
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1)


def _assert_labels_agree_up_to_ties(a, b, X, C):
    diff = np.flatnonzero(a != b)
    d = _sq_dist(X[diff], C)
    rows = np.arange(diff.size)
    np.testing.assert_allclose(d[rows, a[diff]], d[rows, b[diff]], rtol=1e-5)


@pytest.mark.parametrize("max_iter", [3, 50])  # not converged / converged
def test_kmeans_matches_sklearn_lloyd(max_iter):
    X = _blobs()
    init = X[[0, 1, 2, 3]]  # likely several starts in one blob: Lloyd needs many steps
    sk = SkKMeans(4, init=init, n_init=1, max_iter=max_iter, tol=0, algorithm="lloyd").fit(X)
    ours = KMeans(4, init=init, max_iter=max_iter, tol=0).fit(X)
    assert ours.cluster_centers_.dtype == np.float64
    np.testing.assert_allclose(ours.inertia_, sk.inertia_, rtol=1e-4)
    np.testing.assert_allclose(ours.cluster_centers_, sk.cluster_centers_, rtol=1e-4, atol=1e-4)
    _assert_labels_agree_up_to_ties(ours.labels_, sk.labels_, X, sk.cluster_centers_)
    np.testing.assert_array_equal(ours.predict(X), ours.labels_)
    np.testing.assert_allclose(-ours.score(X), ours.inertia_, rtol=1e-12)
    dist = np.sqrt(_sq_dist(X, ours.cluster_centers_))
    np.testing.assert_allclose(ours.transform(X), dist, rtol=1e-4)
    np.testing.assert_allclose(ours.fit_transform(X), dist, rtol=1e-4)
    np.testing.assert_array_equal(ours.fit_predict(X), ours.labels_)


def test_kmeans_equals_kmjax_and_is_deterministic():
    X = _blobs(n=200, seed=1).astype(np.float32)
    est = KMeans(4, random_state=7).fit(X)  # default init: k-means++
    ref = kmjax.kmeans(jax.random.key(7), X, 4, max_iter=300, tol=1e-4)
    np.testing.assert_array_equal(est.cluster_centers_, np.asarray(ref.centroids))
    assert est.cluster_centers_.dtype == np.float32 and est.transform(X).dtype == np.float32
    assert est.n_iter_ == int(ref.n_iter)
    np.testing.assert_allclose(est.inertia_, float(ref.inertia), rtol=1e-4)
    np.testing.assert_array_equal(est.labels_, np.asarray(kmjax.assign(X, ref.centroids)[0]))
    # random_state=None is seed 0, so refits agree; a RandomState is turned into a seed
    a, b = KMeans(4).fit(X), KMeans(4).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    drawn = np.random.RandomState(0).randint(np.iinfo(np.int32).max)  # the seed a RandomState gives
    np.testing.assert_array_equal(KMeans(4, random_state=np.random.RandomState(0)).fit(X).cluster_centers_,
                                  KMeans(4, random_state=int(drawn)).fit(X).cluster_centers_)
    # weights and pickling
    w = np.random.RandomState(0).rand(X.shape[0])
    est_w = KMeans(4, random_state=7).fit(X, sample_weight=w)
    np.testing.assert_allclose(est_w.inertia_, -est_w.score(X, sample_weight=w), rtol=1e-12)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).predict(X), est.labels_)


def test_kmeans_spherical():
    X = _blobs(n=100, seed=2).astype(np.float32)
    est = KMeans(3, spherical=True, init="random").fit(X)
    np.testing.assert_allclose(np.linalg.norm(est.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    index, err = kmjax.assign(X, est.cluster_centers_, spherical=True)
    np.testing.assert_array_equal(est.predict(X), np.asarray(index))
    t = est.transform(X).astype(np.float64)
    np.testing.assert_array_equal(np.argmin(t, axis=1), est.labels_)
    np.testing.assert_allclose((t.min(axis=1) ** 2).sum(), est.inertia_, rtol=1e-6)
    np.testing.assert_allclose(est.inertia_, float(np.asarray(err).sum()), rtol=1e-3)


def test_kmeans_errors():
    X = _blobs(n=5)
    with pytest.raises(ValueError, match="n_clusters=6"):
        KMeans(6).fit(X)
    with pytest.raises(ValueError, match="init array must have shape"):
        KMeans(2, init=X[:3]).fit(X)
    with pytest.raises(ValueError, match="unknown init"):
        KMeans(2, init="kmeans").fit(X)
    with pytest.raises(ValueError, match="random_state"):
        KMeans(2, random_state=-1).fit(X)
    with pytest.raises(NotFittedError):
        KMeans(2).predict(X)


# --- CoatesFeatures ------------------------------------------------------------------------------

_SMALL = dict(n_centroids=8, patch_size=4, n_patches=500, max_iter=10, random_state=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(20, 12, 12, 3)).astype(np.uint8)


def test_coates_params_and_clone():
    est = CoatesFeatures(**_SMALL, encoder="soft_threshold")
    params = est.get_params()
    assert params["n_centroids"] == 8 and params["encoder"] == "soft_threshold"
    assert params["image_shape"] is None
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert clone(CoatesFeatures()).get_params() == CoatesFeatures().get_params()
    est.set_params(n_centroids=16, grid=3)
    assert est.get_params()["n_centroids"] == 16 and est.grid == 3
    assert CoatesFeatures(n_centroids="bogus").n_centroids == "bogus"  # no validation in __init__


def test_coates_equals_kmjax_by_hand(images):
    est = CoatesFeatures(**_SMALL)
    assert est.fit(images) is est
    feats = est.transform(images)
    assert feats.shape == (20, 4 * 8) and feats.dtype == np.float32
    assert est.get_feature_names_out().shape == (32,)

    key_patches, key_kmeans = jax.random.split(jax.random.key(0))
    x = kmjax.normalize_patches(kmjax.sample_patches(key_patches, images, 500, 4), 10.0)
    zca = kmjax.fit_zca(x, 0.1)
    result = kmjax.kmeans(key_kmeans, kmjax.apply_zca(zca, x), 8, init="randn", max_iter=10,
                          tol=None, empty="zero")
    np.testing.assert_array_equal(est.centroids_, np.asarray(result.centroids))
    np.testing.assert_array_equal(est.zca_.matrix, np.asarray(zca.matrix))
    expected = kmjax.extract_features(images, result.centroids, zca, kmjax.FeatureSpec(patch_size=4))
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(clone(est).fit_transform(images), feats, rtol=1e-6, atol=1e-6)

    # flat rows with image_shape give the same features
    flat = CoatesFeatures(**_SMALL, image_shape=(12, 12, 3)).fit(images.reshape(20, -1))
    assert flat.n_features_in_ == 12 * 12 * 3
    np.testing.assert_allclose(flat.transform(images.reshape(20, -1)), feats, rtol=1e-6, atol=1e-6)


def test_coates_input_errors(images):
    with pytest.raises(ValueError, match="image_shape"):
        CoatesFeatures(**_SMALL).fit(images.reshape(20, -1))
    with pytest.raises(NotFittedError):
        CoatesFeatures(**_SMALL).transform(images)
    with pytest.raises(ValueError, match="image_shape"):
        CoatesFeatures(**_SMALL, image_shape=(12, 12, 2)).fit(images.reshape(20, -1))
    with pytest.raises(ValueError, match="n_centroids"):
        CoatesFeatures(**{**_SMALL, "n_centroids": 0}).fit(images)


def test_coates_in_pipeline_and_grid_search(images):
    y = np.arange(images.shape[0]) % 2
    images = np.where(y[:, None, None, None] == 1, images // 2 + 128, images // 2)  # bright vs dark: learnable
    pipe = Pipeline([
        ("features", CoatesFeatures(**_SMALL)),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(max_iter=200)),
    ])
    search = GridSearchCV(pipe, {"features__n_centroids": [8, 16]}, cv=2).fit(images, y)
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert search.best_score_ == max(search.cv_results_["mean_test_score"])
    assert (search.predict(images) == y).mean() > 0.9  # the features carry the brightness


def test_coates_pooling_windows_and_nearest_q(images):
    est = CoatesFeatures(**_SMALL, encoder="nearest_q", q=3, pool_size=5, pool_stride=2).fit(images)
    feats = est.transform(images)
    spec = kmjax.FeatureSpec(patch_size=4, encoder="nearest_q", q=3, pool_size=5, pool_stride=2)
    assert feats.shape == (20, kmjax.feature_dim(spec, 8, images.shape[1:])) == (20, 9 * 2 * 8)  # 3x3 windows on 9x9
    np.testing.assert_array_equal(feats, kmjax.extract_features(images, est.centroids_, est.zca_, spec))
    with pytest.raises(ValueError, match="pool_size"):
        CoatesFeatures(**_SMALL, pool_size=-1).fit(images)
