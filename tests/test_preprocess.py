"""Tests for kmjax.preprocess against float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from kmjax.preprocess import ZCA, apply_zca, fit_zca, normalize_patches, standardize_dimensions


def normalize_ref(x, eps):
    """Reference: loop over patches, float64."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for i, p in enumerate(flat):
        out[i] = (p - p.mean()) / np.sqrt(p.var(ddof=1) + eps)
    return out.reshape(x.shape)


def standardize_ref(x):
    """Reference: loop over dimensions, float64; std is the population one (ddof=0)."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        col = x[:, j]
        out[:, j] = (col - col.mean()) / (col.std() + (col.max() - col.min()) / 20.0)
    return out


# ---------------------------------------------------------------- normalize_patches


@pytest.mark.parametrize("eps", [10.0, 0.0])
def test_normalize_matches_numpy_with_leading_dims(eps):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(3, 4, 27)).astype(np.float32)  # (..., D) with two leading dims
    got = normalize_patches(x, eps)
    assert got.shape == x.shape and got.dtype == np.float32
    # float32 mean/var over 27 values of the 0-255 scale: ~1e-6 relative rounding; outputs are
    # O(1) so 1e-5 relative plus 1e-5 absolute (for entries near 0) is generous but meaningful.
    np.testing.assert_allclose(np.asarray(got), normalize_ref(x, eps), rtol=1e-5, atol=1e-5)


def test_normalize_uint8_input():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(50, 27), dtype=np.uint8)
    got = normalize_patches(x)
    assert got.dtype == np.float32
    # Same float32 rounding argument as above.
    np.testing.assert_allclose(np.asarray(got), normalize_ref(x, 10.0), rtol=1e-5, atol=1e-5)
    # Uses the float value of the pixels, not uint8 wrap-around: agrees with float input exactly.
    np.testing.assert_array_equal(np.asarray(got), np.asarray(normalize_patches(x.astype(np.float32))))


def test_normalize_eps_zero_gives_unit_sample_variance():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, size=(20, 16)).astype(np.float32)
    got = np.asarray(normalize_patches(x, 0.0), np.float64)
    # float32 rounding of O(1) values: 1e-5 absolute.
    np.testing.assert_allclose(got.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(got.var(axis=1, ddof=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- standardize_dimensions


def test_standardize_matches_numpy():
    rng = np.random.default_rng(3)
    scales = np.array([1e-2, 1.0, 10.0, 255.0, 3.0])
    x = ((rng.normal(size=(200, 5)) + 5.0) * scales).astype(np.float32)  # offset = 5 std each
    got = standardize_dimensions(x)
    assert got.shape == x.shape and got.dtype == np.float32
    # Outputs are O(1); float32 mean/std of 200 values ~5 std from 0 round at ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(got), standardize_ref(x), rtol=1e-5, atol=1e-5)


def test_standardize_uint8_input():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(100, 8), dtype=np.uint8)
    # Same rounding argument as above; unit-scale outputs.
    np.testing.assert_allclose(np.asarray(standardize_dimensions(x)), standardize_ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ZCA

D = 12


@pytest.fixture(scope="module")
def correlated():
    """5000 x 12 gaussian data mixed by a random rotation with variances 1..1000 (so the
    covariance is far from diagonal and its condition number is 1e3), on a 0-255-like scale
    with mean 128."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    mix = np.sqrt(np.logspace(0, 3, D))[:, None] * q
    x = (rng.normal(size=(5000, D)) @ mix + 128.0).astype(np.float32)
    lam, vecs = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
    return x, lam, vecs


def test_zca_matrix_symmetric(correlated):
    x, _, _ = correlated
    zca = fit_zca(x)
    assert isinstance(zca, ZCA)
    m = np.asarray(zca.matrix)
    assert m.shape == (D, D) and m.dtype == np.float32
    assert zca.mean.shape == (D,)
    np.testing.assert_array_equal(m, m.T)  # symmetrized explicitly: exact


@pytest.mark.parametrize("eps", [0.1, 10.0])
def test_zca_matches_numpy_eigh_route(correlated, eps):
    x, lam, vecs = correlated
    zca = fit_zca(x, eps)
    ref = (vecs / np.sqrt(lam + eps)) @ vecs.T
    m = np.asarray(zca.matrix, np.float64)
    # float32 covariance + eigh; observed ~1e-5, the brief's 1e-4 relative (Frobenius).
    assert np.linalg.norm(m - ref) / np.linalg.norm(ref) < 1e-4
    # mean of values ~128 in float32: ~1e-7 relative.
    np.testing.assert_allclose(np.asarray(zca.mean), x.astype(np.float64).mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("eps", [10.0, 0.1])
def test_zca_whitened_covariance_is_shrunk_identity(correlated, eps):
    x, lam, vecs = correlated
    w = np.asarray(apply_zca(fit_zca(x, eps), x), np.float64)
    want = (vecs * (lam / (lam + eps))) @ vecs.T
    # Entries are O(1); float32 whitening of a condition-1e3 covariance: observed ~1e-5.
    np.testing.assert_allclose(np.cov(w, rowvar=False), want, atol=1e-4)
    np.testing.assert_allclose(w.mean(axis=0), 0.0, atol=1e-4)  # centred with the fitted mean
    if eps == 10.0:  # and the shrinkage is visible: not the identity
        assert np.abs(np.cov(w, rowvar=False) - np.eye(D)).max() > 0.1


def test_zca_tiny_eps_whitens_to_identity(correlated):
    x, lam, _ = correlated
    eps = 1e-6 * lam.min()
    w = np.asarray(apply_zca(fit_zca(x, eps), x), np.float64)
    # Condition number 1e3 times float32 rounding ~1e-7: 1e-4 absolute on unit-variance entries.
    np.testing.assert_allclose(np.cov(w, rowvar=False), np.eye(D), atol=1e-4)


def test_apply_zca_leading_dims(correlated):
    x, _, _ = correlated
    zca = fit_zca(x)
    batch = x[:60].reshape(3, 4, 5, D)
    got = apply_zca(zca, batch)
    assert got.shape == (3, 4, 5, D) and got.dtype == np.float32
    want = (x[:60].astype(np.float64) - np.asarray(zca.mean, np.float64)) @ np.asarray(zca.matrix, np.float64)
    # Whitened values are O(1-10); float32 centring of ~128 and a 12-term product: 1e-4 abs.
    np.testing.assert_allclose(np.asarray(got).reshape(60, D), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got).reshape(60, D), np.asarray(apply_zca(zca, x[:60])), rtol=1e-6, atol=1e-6)


def test_fit_zca_errors():
    x = np.random.default_rng(5).normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"at least 2 patches"):
        fit_zca(x[:1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or Inf"):
        fit_zca(bad)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        fit_zca(bad)
    with pytest.raises(ValueError, match=r"eps must be a number >= 0"):
        fit_zca(x, -0.1)
    with pytest.raises(ValueError, match=r"eps must be a number >= 0"):
        fit_zca(x, float("nan"))
    with pytest.raises(ValueError, match=r"2-D array"):
        fit_zca(x[None])


def test_fit_zca_list_input():
    x = np.random.default_rng(6).normal(size=(10, 3)).astype(np.float32)
    got = fit_zca(x.tolist())
    np.testing.assert_array_equal(np.asarray(got.matrix), np.asarray(fit_zca(x).matrix))


def test_standardize_dimensions_constant_dimension_is_zero_not_nan():
    x = np.random.default_rng(7).normal(size=(50, 4)).astype(np.float32)
    x[:, 2] = 3.0  # std = ptp = 0: would be 0 / 0
    out = np.asarray(standardize_dimensions(x))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 2], 0.0)
