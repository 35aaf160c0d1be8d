"""Property-based tests (hypothesis) over shapes, dtypes and sizes of the pure functions."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kmjax
from kmjax.pooling import pool

# Every new shape compiles anew: few examples, no deadline.
FEW = settings(max_examples=8, deadline=None)
DTYPES = st.sampled_from([np.uint8, np.int16, np.float32, np.float64])


@FEW
@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 4),
       size=st.integers(1, 9), stride=st.integers(1, 4), dtype=DTYPES)
def test_extract_patches_shape_dtype_and_values(n, h, w, c, size, stride, dtype):
    images = np.random.default_rng(0).integers(0, 200, (n, h, w, c)).astype(dtype)
    if size > min(h, w):
        with pytest.raises(ValueError, match="larger than"):
            kmjax.extract_patches(images, size, stride)
        return
    out = np.asarray(kmjax.extract_patches(images, size, stride))
    gh, gw = (h - size) // stride + 1, (w - size) // stride + 1
    # pixels keep their dtype, except float64, which JAX (without jax_enable_x64) keeps as float32
    assert out.shape == (n, gh, gw, size * size * c) and out.dtype == (np.float32 if dtype == np.float64 else dtype)
    r, q = gh - 1, gw - 1  # the last window equals the image's corner
    np.testing.assert_array_equal(out[:, r, q], images[:, r * stride:r * stride + size,
                                                       q * stride:q * stride + size].reshape(n, -1))


@FEW
@given(m=st.integers(1, 20), d=st.integers(2, 30), dtype=DTYPES, scale=st.sampled_from([1.0, 255.0]))
def test_normalized_patches_have_zero_mean_and_bounded_spread(m, d, dtype, scale):
    x = (np.random.default_rng(1).random((m, d)) * scale).astype(dtype)
    out = np.asarray(kmjax.normalize_patches(x, 10.0))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-4 * max(1.0, np.abs(out).max()))
    assert (out.var(axis=1, ddof=1) < 1.0 + 1e-5).all()  # var / (var + eps) < 1


@FEW
@given(n=st.integers(2, 60), d=st.integers(1, 6), k=st.integers(1, 8), seed=st.integers(0, 100),
       spherical=st.booleans(), empty=st.sampled_from(["zero", "reseed"]))
def test_kmeans_invariants(n, d, k, seed, spherical, empty):
    k = min(k, n)
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    r = kmjax.kmeans(jax.random.key(seed), x, k, max_iter=8, tol=None, spherical=spherical, empty=empty)
    assert r.centroids.shape == (k, d) and np.isfinite(np.asarray(r.centroids)).all()
    assert float(np.asarray(r.counts).sum()) == n  # every point counted once
    obj = np.asarray(r.objective)[: int(r.n_iter)]
    scale = float((x * x).sum())
    assert np.all(np.diff(obj) <= 1e-5 * scale)  # never increases (float32 rounding aside)
    assert 0 <= float(r.inertia) <= obj[-1] + 1e-5 * scale
    index, dist = kmjax.assign(x, r.centroids, spherical=spherical)
    assert np.asarray(index).min() >= 0 and np.asarray(index).max() < k
    assert (np.asarray(dist) >= 0).all()


@FEW
@given(n=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8), f=st.integers(1, 5), grid=st.integers(1, 4))
def test_sum_pooling_preserves_the_total(n, h, w, f, grid):
    fmap = np.random.default_rng(2).random((n, h, w, f)).astype(np.float32)
    if grid > min(h, w):
        with pytest.raises(ValueError, match="grid"):
            pool(fmap, grid)
        return
    out = np.asarray(pool(fmap, grid, "sum")).reshape(n, grid * grid, f)
    np.testing.assert_allclose(out.sum(axis=1), fmap.sum(axis=(1, 2)), rtol=1e-5)
    mx = np.asarray(pool(fmap, grid, "max")).reshape(n, grid * grid, f)
    np.testing.assert_allclose(mx.max(axis=1), fmap.max(axis=(1, 2)))


@FEW
@given(m=st.integers(1, 30), d=st.integers(1, 10), k=st.integers(1, 10), alpha=st.floats(0, 1))
def test_encoders_code_what_they_promise(m, d, k, alpha):
    """hard marks the nearest centroid, triangle is positive exactly for the centroids nearer than
    the mean distance, and the soft threshold shrinks c.x towards 0 by alpha, one sign per pair;
    each checked against float64 distances where no near-tie makes float32 ambiguous."""
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(m, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)
    tri, hard, soft = (np.asarray(f) for f in (kmjax.triangle(x, c), kmjax.hard(x, c), kmjax.soft_threshold(x, c, alpha)))
    assert tri.shape == hard.shape == (m, k) and soft.shape == (m, 2 * k)
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    dist = np.sqrt(((x64[:, None, :] - c64[None]) ** 2).sum(-1))
    gap = np.sort(dist, axis=1)[:, 1] - dist.min(axis=1) if k > 1 else np.inf + 0 * dist[:, 0]
    clear = gap > 1e-4
    np.testing.assert_array_equal(hard.argmax(axis=1)[clear], dist.argmin(axis=1)[clear])
    np.testing.assert_array_equal(hard.sum(axis=1), 1.0)
    margin = dist.mean(axis=1, keepdims=True) - dist
    decided = np.abs(margin) > 1e-4
    np.testing.assert_array_equal((tri > 0)[decided], (margin > 0)[decided])
    proj = x64 @ c64.T
    shrunk = np.sign(proj) * np.maximum(np.abs(proj) - alpha, 0.0)
    np.testing.assert_allclose(soft[:, :k] - soft[:, k:], shrunk, atol=1e-4)
    assert not np.any((soft[:, :k] > 0) & (soft[:, k:] > 0))
