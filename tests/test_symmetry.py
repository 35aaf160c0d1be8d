"""Mirror symmetry (kmjax.symmetry): phi(mirror x) = phi(x)[perm] for every encoder, the conditions
refused when they fail, and the reduction of mirrored ridge to pair sums against the explicit
mirrored ridge in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kmjax
from kmjax.classify.ridge import GramStats, fit_ridge
from kmjax.features import FeatureSpec, batch_features, extract_features, feature_dim
from kmjax.symmetry import (check_flip_closed, close_dictionary, feature_mirror_permutation, mirror_pairs,
                            pair_sums, patch_mirror_index, symmetrize_zca)

K = 16  # atoms of the flip-closed dictionary (8 learned)


@pytest.fixture(scope="module")
def closed():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    d = kmjax.learn_dictionary(jax.random.key(0), images, K, n_patches=3000, max_iter=3, flip_closed=True)
    return images, d


def test_patch_mirror_index_is_the_image_flip():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(1, 6, 6, 3)).astype(np.float32)
    patch = kmjax.extract_patches(img, 6)[0, 0, 0]
    flipped = kmjax.extract_patches(img[:, :, ::-1], 6)[0, 0, 0]
    np.testing.assert_array_equal(np.asarray(patch)[patch_mirror_index(6, 3)], np.asarray(flipped))


def test_flip_closed_dictionary_and_commuting_whitening(closed):
    _, d = closed
    c = np.asarray(d.centroids)
    idx = patch_mirror_index(6, 3)
    assert c.shape == (K, 108)
    np.testing.assert_array_equal(c[K // 2:], c[: K // 2][:, idx])
    m = np.asarray(d.zca.matrix)
    np.testing.assert_array_equal(m[idx][:, idx], m)  # exactly, not to rounding
    np.testing.assert_array_equal(np.asarray(d.zca.mean)[idx], np.asarray(d.zca.mean))
    # the symmetrization only removes rounding: the ZCA of patches plus mirrors commutes already
    x = np.asarray(kmjax.normalize_patches(kmjax.sample_patches(jax.random.key(2), closed[0], 2000, 6)))
    z = kmjax.fit_zca(np.concatenate([x, x[:, idx]]))
    assert np.abs(np.asarray(symmetrize_zca(z, 6).matrix) - np.asarray(z.matrix)).max() < 1e-4 * np.abs(z.matrix).max()
    check_flip_closed(c, 6)
    with pytest.raises(ValueError, match="not flip-closed"):
        check_flip_closed(np.asarray(d.centroids)[[1, 0, *range(2, K)]], 6)
    with pytest.raises(ValueError, match="even"):
        kmjax.learn_dictionary(jax.random.key(0), closed[0], 15, n_patches=500, max_iter=1, flip_closed=True)


SPECS = [FeatureSpec(encoder=e, pool_size=15, pool_stride=6, q=5) for e in ("triangle", "hard", "soft_threshold",
                                                                          "nearest_q")]
SPECS += [FeatureSpec(encoder="soft_threshold", grid=3), FeatureSpec(encoder="triangle", stride=2, grid=1)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.encoder}-grid{s.grid}-pool{s.pool_size}-stride{s.stride}")
def test_features_of_the_mirror_are_a_permutation(closed, spec):
    """phi(mirror x) = phi(x)[perm] on random images: to float rounding for the triangle and soft
    threshold; the binary codes (hard, nearest_q) exactly, since random data has no ties. The
    identity fails (the test would catch it) without the closed dictionary: see the next test."""
    images, d = closed
    f = np.asarray(batch_features(jnp.asarray(images), d.zca, d.centroids, spec=spec))
    fm = np.asarray(batch_features(jnp.asarray(images[:, :, ::-1]), d.zca, d.centroids, spec=spec))
    perm = feature_mirror_permutation(spec, K, images.shape[1:])
    assert sorted(perm) == list(range(f.shape[1])) and np.all(perm[perm] == np.arange(perm.size))
    assert np.all(perm != np.arange(perm.size))  # no feature is its own mirror in kmjax's layout
    if spec.encoder in ("hard", "nearest_q"):
        np.testing.assert_array_equal(fm, f[:, perm])
    else:
        np.testing.assert_allclose(fm, f[:, perm], rtol=0, atol=1e-5 * np.abs(f).max())
    reduced = np.asarray(batch_features(jnp.asarray(images), d.zca, d.centroids, spec=spec._replace(mirror_sums=True)))
    assert reduced.shape[1] == feature_dim(spec._replace(mirror_sums=True), K, images.shape[1:]) == f.shape[1] // 2
    np.testing.assert_allclose(reduced, pair_sums(f, mirror_pairs(spec, K, images.shape[1:])), rtol=1e-6, atol=1e-6)


def test_the_identity_needs_the_closed_dictionary(closed):
    images, d = closed
    spec = SPECS[2]
    shuffled = np.asarray(d.centroids)[np.random.default_rng(3).permutation(K)]
    f = np.asarray(batch_features(jnp.asarray(images), d.zca, shuffled, spec=spec))
    fm = np.asarray(batch_features(jnp.asarray(images[:, :, ::-1]), d.zca, shuffled, spec=spec))
    assert np.abs(fm - f[:, feature_mirror_permutation(spec, K, images.shape[1:])]).max() > 1e-2 * np.abs(f).max()


def test_asymmetric_settings_are_refused(closed):
    images, d = closed
    cases = [(FeatureSpec(mirror_sums=True), "not mirror-symmetric"),  # the paper's 14 / 13 quadrants
             (FeatureSpec(stride=4, grid=1, mirror_sums=True), "right edge"),  # 26 % 4 != 0
             ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            extract_features(images, d.centroids, d.zca, spec)
    with pytest.raises(ValueError, match="not flip-closed"):
        extract_features(images, np.asarray(d.centroids)[[1, 0, *range(2, K)]], d.zca, SPECS[2]._replace(mirror_sums=True))
    np.testing.assert_array_equal(close_dictionary(np.eye(2, 108), 6)[2:], np.eye(2, 108)[:, patch_mirror_index(6, 3)])


def _stats64(x, labels, num_classes):
    """GramStats of float64 rows, summed in float64 (no float32 products)."""
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    shift = x.mean(axis=0)
    xs = x - shift
    return GramStats(np.array(float(len(x))), shift, xs.sum(0), xs.T @ xs, xs.T @ y, y.sum(0))


def test_reduction_equals_the_explicit_mirrored_ridge():
    """Ridge on the N images and their mirrors (rows x and x[perm], one label) against ridge on the
    N pair sums, in float64: the same weights (w_a = w_b = v_j / sqrt 2) and scores to 1e-6.

    The mirrored problem is solved directly (normal equations of the 2N rows, NumPy), with the
    P-invariant standardization of the reduction: mean over the 2N rows, each feature of pair j
    scaled by sqrt(var(r_j) + eps), r_j the pair sum."""
    rng = np.random.default_rng(4)
    n, f, classes, C, eps = 300, 40, 3, 30.0, 0.01
    perm = np.arange(f).reshape(2, -1)[::-1].reshape(-1)  # pairs (j, j + f/2), as kmjax's layout
    pairs = (np.arange(f // 2), np.arange(f // 2) + f // 2)
    x = rng.gamma(2.0, 1.0, (n, f)) + rng.normal(size=(n, 1))
    labels = rng.integers(0, classes, n)
    x_test = rng.gamma(2.0, 1.0, (50, f))

    r = pair_sums(x, pairs)
    std, model = fit_ridge(_stats64(r, labels, classes), C, eps=eps)
    v = np.asarray(model.weights, np.float64)
    scores = (pair_sums(x_test, pairs) - np.asarray(std.mean, np.float64)) / np.asarray(std.scale, np.float64) @ v[:-1] + v[-1]

    rows, y = np.concatenate([x, x[:, perm]]), np.concatenate([labels, labels])
    mu = rows.mean(axis=0)
    s = np.sqrt(r.var(axis=0, ddof=1) + eps)
    s = np.concatenate([s, s])  # the two features of a pair share their pair sum's scale
    z = (rows - mu) / s
    t = 2.0 * np.eye(classes)[y] - 1.0
    lam = len(rows) / (2 * C)  # 1/2 ||W||^2 + C mean over the 2N rows
    w = np.linalg.solve(z.T @ z + lam * np.eye(f), z.T @ (t - t.mean(0)))
    ref_scores = (x_test - mu) / s @ w + t.mean(0)

    np.testing.assert_allclose(w[: f // 2], w[f // 2:], rtol=1e-9)  # the optimum is P-invariant
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6 * np.abs(ref_scores).max())
    # weights: pair j's reduced weight is sqrt(2) w_a, in units of the same scale
    np.testing.assert_allclose(v[:-1] / np.sqrt(2), w[: f // 2], rtol=1e-6, atol=1e-6 * np.abs(w).max())
    # and predictions of the mirrored model are mirror-invariant
    np.testing.assert_allclose((x_test[:, perm] - mu) / s @ w, (x_test - mu) / s @ w, rtol=1e-9)
