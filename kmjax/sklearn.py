"""scikit-learn estimators over kmjax: ``KMeans`` (a clusterer/transformer) and ``CoatesFeatures``.

scikit-learn is an optional dependency: ``import kmjax`` never imports this module; use
``from kmjax.sklearn import KMeans, CoatesFeatures``.

Numerics. kmjax computes in float32 on the default JAX device, whatever the input's dtype
(scikit-learn's own ``KMeans`` keeps float64 input in float64): the k-means iterations, and the
nearest centroids and squared distances behind ``labels_``, ``inertia_``, ``predict`` and
``score``, all four from one function (``kmjax.assign``, in bounded-memory chunks; the distances
are summed in float64), so they are mutually consistent (``labels_ == predict(X_train)``,
``inertia_ == -score(X_train)``). ``transform``'s distances are computed on the host in float64,
in bounded-memory chunks. ``cluster_centers_`` and ``transform`` keep the input's float dtype
(float32 or float64; other inputs are converted to float64).

Randomness. ``random_state`` is an int in [0, 2**32) used as ``jax.random.key(random_state)``;
None means 0 (so unlike scikit-learn, None is deterministic: every fit gives the same result); a
``numpy.random.RandomState`` or ``numpy.random.Generator`` draws the seed from itself.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from kmjax._checks import choice, integer, number
from kmjax.cluster import EMPTY_POLICIES, INITS, assign, kmeans
from kmjax.encoders import ENCODERS
from kmjax.errors import InputError
from kmjax.features import FeatureSpec, extract_features, feature_dim
from kmjax.dictionary import AUTHORS, learn_dictionary
from kmjax.pooling import POOLS
from kmjax.preprocess import ZCA

__all__ = ["KMeans", "CoatesFeatures"]

_SPEC = FeatureSpec._field_defaults  # the features' defaults, defined once with FeatureSpec
_HOST_CHUNK_ELEMENTS = 1 << 22  # rows * k float64 scores per host chunk: 32 MB


def _seed(random_state) -> int:
    """``random_state`` -> a seed for ``jax.random.key`` (None -> 0, documented)."""
    if random_state is None:
        return 0
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if not 0 <= random_state < 2**32:
            raise InputError(f"random_state must be in [0, 2**32), got {random_state!r}")
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int32).max))
    raise InputError(
        f"random_state must be None, an int or a numpy RandomState/Generator, got {random_state!r}"
    )


def _errors(X, centers, spherical: bool):
    """(rows, k) float64 squared errors of every row against every centroid's model.

    Lloyd: ||x - c||^2. Spherical: ||x||^2 - (c.x)^2, the squared distance from x to its best
    one-atom reconstruction (c.x) c (c unit-norm, or zero). Nearest = argmin, lowest on ties.
    """
    X = np.asarray(X, np.float64)
    proj = X @ centers.T
    sq = np.einsum("ij,ij->i", X, X)[:, None]
    if spherical:
        err = sq - proj * proj
    else:
        err = sq - 2.0 * proj + np.einsum("ij,ij->i", centers, centers)[None, :]
    return np.maximum(err, 0.0)


def _host_chunks(n: int, k: int):
    step = max(1, _HOST_CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _labels_errors(X, centers, spherical: bool):
    """Nearest centroid (int32) and its squared error (float64) for each row (``kmjax.assign``)."""
    labels, err = assign(np.asarray(X, np.float32), np.asarray(centers, np.float32), spherical=spherical)
    return np.asarray(labels), np.asarray(err, np.float64)


class KMeans(ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin, BaseEstimator):
    """k-means clustering by ``kmjax.cluster.kmeans`` with the scikit-learn estimator API.

    kmjax works in float32: the fit, and the labels and inertia (``kmjax.assign``), whatever the
    input dtype (scikit-learn's own ``KMeans`` keeps float64 input in float64); ``transform``
    returns the input's dtype.

    Parameters
    ----------
    n_clusters : int, default=8
    init : {"k-means++", "random", "randn"} or array of shape (n_clusters, n_features),
        default="k-means++". "randn" is the Coates-Ng 0.1 * standard normal (data-independent).
    max_iter : int, default=300
        Maximum number of Lloyd iterations.
    tol : float or None, default=1e-4
        Stop when the k-means objective decreased by at most ``tol`` times its previous value in
        an iteration (kmjax's rule; scikit-learn's ``tol`` is on the centre shift instead);
        0 stops at a fixed point, None always runs ``max_iter`` iterations.
    empty : {"reseed", "zero"}, default="reseed"
        Empty clusters move onto the worst-served points ("reseed") or to the origin ("zero").
    spherical : bool, default=False
        Gain-shape (OMP-1) k-means: unit-norm centroids, assignment by the largest |c.x|. Then
        ``transform`` gives the distance to the best one-atom reconstruction,
        sqrt(||x||^2 - (c.x)^2), and ``inertia_`` the sum of its squares.
    chunk_size : int or None, default=None
        Points per distance product inside kmjax (memory O(chunk_size * n_clusters)).
    random_state : None, int, RandomState or Generator, default=None
        Seed of the init; None means 0 (deterministic; see the module docstring).

    Attributes
    ----------
    cluster_centers_ : ndarray (n_clusters, n_features), the input's float dtype.
    labels_ : ndarray (n_samples,) int32, nearest final centroid of each training sample.
    inertia_ : float, sum of (weighted) squared distances to the final centroids, consistent
        with ``labels_`` (float32 distances, summed in float64).
    n_iter_ : int, Lloyd iterations run.
    n_features_in_, feature_names_in_ : as in scikit-learn.
    """

    def __init__(self, n_clusters=8, *, init="k-means++", max_iter=300, tol=1e-4, empty="reseed",
                 spherical=False, chunk_size=None, random_state=None):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.empty = empty
        self.spherical = spherical
        self.chunk_size = chunk_size
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _check_params(self, X):
        n, d = X.shape
        k = integer(self.n_clusters, "n_clusters", minimum=1)
        if k > n:
            raise InputError(f"n_samples={n} should be >= n_clusters={k}.")
        integer(self.max_iter, "max_iter", minimum=1)
        if self.tol is not None:
            number(self.tol, "tol (or None)", at_least=0)
        choice(self.empty, EMPTY_POLICIES, "empty")
        if self.chunk_size is not None:
            integer(self.chunk_size, "chunk_size", minimum=1)
        if isinstance(self.init, str):
            choice(self.init, INITS, "init")
            return self.init
        init = check_array(self.init, dtype=[np.float64, np.float32], input_name="init")
        if init.shape != (k, d):
            raise InputError(f"init array must have shape (n_clusters, n_features) = ({k}, {d}), "
                             f"got {init.shape}")
        return init.astype(np.float32)

    def _check_sample_weight(self, sample_weight, X):
        if sample_weight is None:
            return None
        if isinstance(sample_weight, numbers.Number):
            sample_weight = np.full(X.shape[0], sample_weight, np.float64)
        sw = check_array(sample_weight, ensure_2d=False, dtype=np.float64, input_name="sample_weight")
        if sw.shape != (X.shape[0],):
            raise InputError(f"sample_weight.shape == {sw.shape}, expected {(X.shape[0],)}!")
        if np.any(sw < 0):
            raise InputError("sample_weight must be non-negative")
        if not sw.sum() > 0:
            raise InputError("Sample weights must contain at least one non-zero number.")
        return sw

    def fit(self, X, y=None, sample_weight=None):
        """Cluster X (n_samples, n_features); ``sample_weight`` optional non-negative weights."""
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C")
        sw = self._check_sample_weight(sample_weight, X)
        init = self._check_params(X)
        x32 = X.astype(np.float32)
        if not np.all(np.isfinite(x32)):
            raise InputError("X has values too large for float32, the precision kmjax computes in")
        result = kmeans(
            jax.random.key(_seed(self.random_state)), x32, self.n_clusters, init=init,
            max_iter=self.max_iter, tol=self.tol, chunk_size=self.chunk_size, empty=self.empty,
            spherical=bool(self.spherical), weights=None if sw is None else sw.astype(np.float32),
        )
        centers = np.asarray(result.centroids)
        self.labels_, err = _labels_errors(X, centers, self.spherical)
        self.inertia_ = float(err @ sw if sw is not None else err.sum())
        self.cluster_centers_ = centers.astype(X.dtype)
        self.n_iter_ = int(result.n_iter)
        self._n_features_out = self.cluster_centers_.shape[0]
        return self

    def _validate_test(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)

    def predict(self, X):
        """Index of the nearest centroid of each sample (int32; lowest index on ties)."""
        X = self._validate_test(X)
        return _labels_errors(X, self.cluster_centers_, self.spherical)[0]

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit and return ``labels_``."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X):
        """Distances (n_samples, n_clusters) to each centroid (spherical: to c's reconstruction)."""
        X = self._validate_test(X)
        centers = np.asarray(self.cluster_centers_, np.float64)
        out = np.empty((X.shape[0], centers.shape[0]), X.dtype)
        for s in _host_chunks(X.shape[0], centers.shape[0]):
            out[s] = np.sqrt(_errors(X[s], centers, self.spherical))
        return out

    def fit_transform(self, X, y=None, sample_weight=None):
        """Fit and return ``transform(X)``."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X, y=None, sample_weight=None):
        """Opposite of the (weighted) inertia of X against the fitted centroids."""
        X = self._validate_test(X)
        err = _labels_errors(X, self.cluster_centers_, self.spherical)[1]
        sw = self._check_sample_weight(sample_weight, X)
        return -float(err @ sw if sw is not None else err.sum())


class CoatesFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Images -> Coates-Lee-Ng single-layer features: a learned dictionary plus dense encoding.

    ``fit`` is ``kmjax.learn_dictionary`` (``n_patches`` random patches -> per-patch normalization ->
    ZCA whitening -> k-means, seeded with ``jax.random.key(seed)``); ``transform`` is
    ``kmjax.extract_features``.

    Input: (N, H, W, C) images on the scale the eps constants assume (0-255 for the defaults), or
    (N, H*W*C) rows in (row, column, channel) order when ``image_shape=(H, W, C)`` is given.
    ``transform`` accepts other heights and widths than ``fit`` saw (pooling gives a fixed-length
    vector) but the same channels.

    Parameters
    ----------
    n_centroids, patch_size, n_patches : dictionary size, receptive field, patches to learn from.
    eps_norm : per-patch normalization eps (None: no normalization).
    whiten, eps_zca : ZCA whitening and its eigenvalue eps.
    init, max_iter, tol, empty : k-means options (see ``kmjax.kmeans``); tol=None always runs
        ``max_iter`` iterations, as the authors did.
    encoder, alpha, stride, grid, pool, pool_size, pool_stride, q : the ``FeatureSpec`` of
        ``transform`` (pool_size 15, pool_stride 6: 3 x 3 overlapping windows; q: "nearest_q").
    image_shape : None or (H, W, C) (or (H, W) for one channel), for 2-D input.
    random_state : None (means 0), int, RandomState or Generator.

    Attributes
    ----------
    centroids_ : (n_centroids, patch_size**2 * C) float32 dictionary, in whitened space.
    zca_ : ``kmjax.ZCA`` of NumPy arrays, or None when ``whiten=False``.
    image_shape_ : (H, W, C) of the training images.
    n_features_in_ : H*W*C, only when fitted on 2-D input (with ``feature_names_in_`` for
        DataFrames); 4-D image input has no scikit-learn "features" axis.
    """

    def __init__(self, n_centroids=AUTHORS["k"], *, patch_size=AUTHORS["patch_size"], n_patches=AUTHORS["n_patches"],
                 eps_norm=AUTHORS["eps_norm"], whiten=AUTHORS["whiten"], eps_zca=AUTHORS["eps_zca"],
                 init=AUTHORS["init"], max_iter=AUTHORS["max_iter"], tol=AUTHORS["tol"], empty=AUTHORS["empty"],
                 encoder=_SPEC["encoder"], alpha=_SPEC["alpha"], stride=_SPEC["stride"], grid=_SPEC["grid"],
                 pool=_SPEC["pool"], pool_size=_SPEC["pool_size"], pool_stride=_SPEC["pool_stride"], q=_SPEC["q"],
                 image_shape=None, random_state=None):
        self.n_centroids = n_centroids
        self.patch_size = patch_size
        self.n_patches = n_patches
        self.eps_norm = eps_norm
        self.whiten = whiten
        self.eps_zca = eps_zca
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.empty = empty
        self.encoder = encoder
        self.alpha = alpha
        self.stride = stride
        self.grid = grid
        self.pool = pool
        self.pool_size = pool_size
        self.pool_stride = pool_stride
        self.q = q
        self.image_shape = image_shape
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []  # always float32 features
        return tags

    def _spec(self) -> FeatureSpec:
        choice(self.encoder, ENCODERS, "encoder")
        choice(self.pool, POOLS, "pool")
        return FeatureSpec(
            patch_size=integer(self.patch_size, "patch_size", minimum=1),
            stride=integer(self.stride, "stride", minimum=1),
            eps_norm=None if self.eps_norm is None else float(self.eps_norm),
            encoder=self.encoder, alpha=float(self.alpha), grid=integer(self.grid, "grid", minimum=1),
            pool=self.pool, pool_size=integer(self.pool_size, "pool_size", minimum=0),
            pool_stride=integer(self.pool_stride, "pool_stride", minimum=0), q=integer(self.q, "q", minimum=0),
        )

    def _images(self, X, reset: bool):
        """X -> (N, H, W, C) NumPy images (numeric dtype kept: uint8 stays uint8)."""
        ndim = np.ndim(X) if not hasattr(X, "iloc") else 2
        if ndim == 2:
            if self.image_shape is None:
                raise InputError(
                    "X is 2-D (n_samples, n_values) but image_shape is None: pass images of shape "
                    "(N, H, W, C), or set image_shape=(H, W, C) so rows can be reshaped "
                    "(each row in (row, column, channel) order)"
                )
            shape = tuple(int(s) for s in self.image_shape)
            if len(shape) == 2:
                shape = shape + (1,)
            if len(shape) != 3 or min(shape) < 1:
                raise InputError(f"image_shape must be (H, W, C) or (H, W), got {self.image_shape!r}")
            X = validate_data(self, X, dtype="numeric", reset=reset)
            if X.shape[1] != np.prod(shape):
                raise InputError(f"X has {X.shape[1]} values per row but image_shape {shape} needs "
                                 f"{int(np.prod(shape))}")
            return X.reshape((X.shape[0],) + shape)
        X = check_array(X, dtype="numeric", allow_nd=True, ensure_2d=False, input_name="X")
        if X.ndim != 4:
            raise InputError(f"X must be images of shape (N, H, W, C), or 2-D rows with image_shape "
                             f"set; got shape {X.shape}")
        if reset:
            for attr in ("n_features_in_", "feature_names_in_"):
                if hasattr(self, attr):
                    delattr(self, attr)
        return X

    def fit(self, X, y=None):
        """Learn the whitening and the dictionary from random patches of the images X."""
        images = self._images(X, reset=True)
        spec = self._spec()
        k = integer(self.n_centroids, "n_centroids", minimum=1)
        n_patches = integer(self.n_patches, "n_patches", minimum=1)
        if not self.eps_zca >= 0:
            raise InputError(f"eps_zca must be >= 0, got {self.eps_zca!r}")
        dictionary = learn_dictionary(
            jax.random.key(_seed(self.random_state)), images, k, patch_size=spec.patch_size, n_patches=n_patches,
            normalize="none" if spec.eps_norm is None else "patch", eps_norm=spec.eps_norm or 0.0,
            whiten=bool(self.whiten), eps_zca=float(self.eps_zca), init=self.init, max_iter=self.max_iter,
            tol=self.tol, empty=self.empty)
        zca = dictionary.zca
        self.zca_ = None if zca is None else ZCA(np.asarray(zca.mean), np.asarray(zca.matrix))
        self.centroids_ = np.asarray(dictionary.centroids)
        self.n_iter_ = int(dictionary.kmeans.n_iter)
        self.image_shape_ = tuple(int(s) for s in images.shape[1:])
        self._n_features_out = feature_dim(spec, k, images.shape[1:])
        return self

    def transform(self, X):
        """Pooled features, (N, grid * grid * F) float32 (F = n_centroids, 2x for soft_threshold)."""
        check_is_fitted(self, "centroids_")
        images = self._images(X, reset=False)
        if images.shape[3] != self.image_shape_[2]:
            raise InputError(f"X has {images.shape[3]} channels; fit saw {self.image_shape_[2]}")
        return extract_features(images, self.centroids_, self.zca_, self._spec())
