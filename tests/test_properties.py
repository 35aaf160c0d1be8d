"""Property-based tests (hypothesis) of the pure functions: each property is one a wrong
implementation breaks (a loop reference, an invariance, a fixed point, an identity the output must
satisfy), checked on shapes, dtypes and sizes drawn at random."""

import jax
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kmjax
from kmjax.pooling import pool as _pool

# Every new shape compiles anew: few examples, no deadline. The functions that are not jitted
# themselves (pool, the encoders) are jitted here: one compilation per shape, not one per operation.
FEW = settings(max_examples=8, deadline=None)
pool = jax.jit(_pool, static_argnames=("grid", "op"))
TRIANGLE, HARD, SOFT = jax.jit(kmjax.triangle), jax.jit(kmjax.hard), jax.jit(kmjax.soft_threshold)
DTYPES = st.sampled_from([np.uint8, np.int16, np.float32, np.float64])


@FEW
@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 4),
       size=st.integers(1, 9), stride=st.integers(1, 4), dtype=DTYPES)
@example(n=2, h=7, w=7, c=2, size=3, stride=2, dtype=np.uint8)  # a square map of windows, and a wide one
@example(n=1, h=5, w=9, c=3, size=2, stride=1, dtype=np.float32)
def test_extract_patches_match_a_loop_over_windows(n, h, w, c, size, stride, dtype):
    images = np.random.default_rng(0).integers(0, 200, (n, h, w, c)).astype(dtype)
    if size > min(h, w):
        with pytest.raises(ValueError, match="larger than"):
            kmjax.extract_patches(images, size, stride)
        return
    out = np.asarray(kmjax.extract_patches(images, size, stride))
    gh, gw = (h - size) // stride + 1, (w - size) // stride + 1
    # pixels keep their dtype, except float64, which JAX (without jax_enable_x64) keeps as float32
    assert out.shape == (n, gh, gw, size * size * c) and out.dtype == (np.float32 if dtype == np.float64 else dtype)
    # every window, at its own grid position, in (row, column, channel) order (the values are
    # integers below 200: exact in every dtype)
    for i in range(gh):
        for j in range(gw):
            window = images[:, i * stride:i * stride + size, j * stride:j * stride + size, :]
            np.testing.assert_array_equal(out[:, i, j], window.reshape(n, -1))


@FEW
@given(m=st.integers(1, 20), d=st.integers(2, 30), dtype=DTYPES, eps=st.sampled_from([1e-3, 10.0]),
       gain=st.floats(0.25, 4.0), offset=st.floats(-255.0, 255.0))
@example(m=6, d=27, dtype=np.uint8, eps=10.0, gain=2.0, offset=-30.0)
def test_patch_normalization_removes_brightness_and_contrast(m, d, dtype, eps, gain, offset):
    """normalize(a x + b, a^2 eps) = normalize(x, eps) for a > 0 (the mean and the scale are the
    patch's own, eps is added to a variance), and the output's sample variance is v / (v + eps),
    v the patch's sample variance (divided by D - 1), with zero mean."""
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        x = rng.integers(0, 256, (m, d)).astype(dtype)
    else:
        x = (rng.random((m, d)) * 255.0).astype(dtype)
    x64 = x.astype(np.float64)
    out = np.asarray(kmjax.normalize_patches(x, eps))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    shifted = (gain * x64 + offset).astype(np.float32)
    np.testing.assert_allclose(np.asarray(kmjax.normalize_patches(shifted, eps * gain**2)), out, rtol=0, atol=1e-4)
    v = x64.var(axis=1, ddof=1)
    np.testing.assert_allclose(out.astype(np.float64).var(axis=1, ddof=1), v / (v + eps), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-5)


@FEW
@given(d=st.integers(1, 8), extra=st.integers(2, 40), seed=st.integers(0, 100),
       eps=st.sampled_from([1e-4, 0.1, 10.0]))
@example(d=5, extra=4, seed=0, eps=0.1)
def test_zca_whitening_is_symmetric_and_shrinks_the_covariance_to_identity(d, extra, seed, eps):
    """For the sample covariance S (divided by N - 1) of the fitting points, the ZCA matrix is the
    symmetric (S + eps I)^(-1/2), so the whitened points have zero mean and covariance
    S_w = S (S + eps I)^(-1): S_w (S + eps I) = S, and S_w ~ I when eps is far below S's spectrum."""
    rng = np.random.default_rng(seed)
    n = d + extra
    # correlated, off-centre points: the whitening has something to undo
    mix = rng.normal(size=(d, d)) + 2.0 * np.eye(d)
    x = (rng.normal(size=(n, d)) @ mix + rng.normal(0, 5, size=d)).astype(np.float32)
    zca = kmjax.fit_zca(x, eps)
    matrix = np.asarray(zca.matrix, np.float64)
    np.testing.assert_allclose(matrix, matrix.T, rtol=0, atol=1e-6 * np.abs(matrix).max())
    white = np.asarray(kmjax.apply_zca(zca, x), np.float64)
    x64 = x.astype(np.float64)
    s = np.cov(x64, rowvar=False, ddof=1).reshape(d, d)
    s_w = np.cov(white, rowvar=False, ddof=1).reshape(d, d)
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-4 * max(1.0, np.abs(white).max()))
    np.testing.assert_allclose(s_w @ (s + eps * np.eye(d)), s, rtol=0, atol=1e-4 * np.abs(s).max())
    if eps < 1e-3 * np.linalg.eigvalsh(s).min():
        np.testing.assert_allclose(s_w, np.eye(d), rtol=0, atol=1e-2)


def _nearest(x, c, spherical):
    """float64 nearest centroid, its error, and the gap to the runner-up (inf with one centroid)."""
    if spherical:  # the largest |c.x|; error ||x||^2 - (c.x)^2
        proj = x @ c.T
        score = -np.abs(proj)
        index = np.argmin(score, axis=1)
        err = (x * x).sum(axis=1) - proj[np.arange(len(x)), index] ** 2
    else:
        score = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        index = np.argmin(score, axis=1)
        err = score[np.arange(len(x)), index]
    gap = np.diff(np.sort(score, axis=1)[:, :2], axis=1)[:, 0] if c.shape[0] > 1 else np.full(len(x), np.inf)
    return index, err, gap


@settings(max_examples=4, deadline=None)
@given(n=st.integers(2, 60), d=st.integers(1, 6), k=st.integers(1, 8), seed=st.integers(0, 100),
       spherical=st.booleans(), empty=st.sampled_from(["zero", "reseed"]))
@example(n=40, d=3, k=4, seed=7, spherical=False, empty="zero")
@example(n=40, d=3, k=4, seed=7, spherical=True, empty="reseed")
def test_kmeans_stops_at_a_lloyd_fixed_point(n, d, k, seed, spherical, empty):
    """Run to convergence (tol = 0): the centroids are then a fixed point of Lloyd's step, checked
    in float64 against the points nearest to each: their mean (spherical: the normalized
    sum_i (c.x_i) x_i); counts and inertia are those of the final centroids; the objective never
    increases; ``assign`` finds the float64 nearest centroid and its error, and follows a
    permutation of the centroids."""
    k = min(k, n)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    # k distinct points to start from (unit-norm for the spherical variant): no init to compile
    init = x[rng.choice(n, k, replace=False)]
    if spherical:
        init = init / np.linalg.norm(init, axis=1, keepdims=True)
    r = kmjax.kmeans(jax.random.key(seed), x, k, init=init, max_iter=100, tol=0.0, spherical=spherical, empty=empty)
    c32 = np.asarray(r.centroids)
    assert c32.shape == (k, d) and np.isfinite(c32).all()
    x64, c = x.astype(np.float64), c32.astype(np.float64)
    index, err, gap = _nearest(x64, c, spherical)
    scale = float((x64 * x64).sum())
    obj = np.asarray(r.objective)[: int(r.n_iter)]
    assert np.all(np.diff(obj) <= 1e-5 * scale)  # never increases (float32 rounding aside)
    np.testing.assert_allclose(float(r.inertia), err.sum(), rtol=0, atol=1e-5 * scale)
    clear = gap > 1e-3 * (1.0 + (x64 * x64).sum(axis=1))  # no near-tie float32 could decide otherwise
    if clear.all():
        np.testing.assert_array_equal(np.asarray(r.counts), np.bincount(index, minlength=k))
    if bool(r.converged) and clear.all():
        for j in range(k):
            members = x64[index == j]
            if len(members):
                want = members.mean(axis=0)
                if spherical:
                    want = (members @ c[j]) @ members
                    want = want / np.linalg.norm(want)
                # spherical: the objective stalls in float32 while the direction still creeps
                # (2e-4 at most in 60 random runs)
                np.testing.assert_allclose(c[j], want, rtol=0, atol=2e-3 if spherical else 1e-4)
            elif empty == "zero":
                np.testing.assert_array_equal(c[j], 0.0)
    got, sqdist = (np.asarray(a) for a in kmjax.assign(x, c32, spherical=spherical))
    np.testing.assert_array_equal(got[clear], index[clear])
    slack = 1e-4 * (1.0 + (x64 * x64).sum(axis=1))  # float32 expansions of squared distances
    assert np.all(np.abs(sqdist - err) <= slack)
    perm = np.random.default_rng(seed + 1).permutation(k)
    got_p, sqdist_p = (np.asarray(a) for a in kmjax.assign(x, c32[perm], spherical=spherical))
    np.testing.assert_array_equal(perm[got_p][clear], got[clear])
    assert np.all(np.abs(sqdist_p - sqdist) <= slack)


@FEW
@given(h=st.integers(1, 9), w=st.integers(1, 9), grid=st.integers(1, 4))
@example(h=7, w=5, grid=2)  # uneven splits, a wide and a tall region
@example(h=9, w=8, grid=3)
def test_pooling_regions_are_the_documented_partition(h, w, grid):
    """Pooling the map whose feature p is the indicator of position p reads off each region's
    positions: a partition of the map into grid x grid rectangles, region-major (top-left,
    top-right, ..., bottom-right), each side split as MATLAB's round splits it (lengths differing
    by at most one); max pooling uses the same regions."""
    eye = np.eye(h * w, dtype=np.float32).reshape(1, h, w, h * w)
    if grid > min(h, w):
        with pytest.raises(ValueError, match="grid"):
            pool(eye, grid)
        return
    member = np.asarray(pool(eye, grid, "sum")).reshape(grid * grid, h * w)
    assert set(np.unique(member)) <= {0.0, 1.0}
    np.testing.assert_array_equal(member.sum(axis=0), 1.0)  # every position in exactly one region
    np.testing.assert_array_equal(np.asarray(pool(eye, grid, "max")).reshape(grid * grid, h * w), member)
    masks = member.reshape(grid, grid, h, w).astype(bool)
    edges = lambda n: [int(np.floor(t * n / grid + 0.5)) for t in range(grid + 1)]
    rows, cols = edges(h), edges(w)
    for a in range(grid):
        for b in range(grid):
            want = np.zeros((h, w), bool)
            want[rows[a]:rows[a + 1], cols[b]:cols[b + 1]] = True
            np.testing.assert_array_equal(masks[a, b], want)
    for n, e in ((h, rows), (w, cols)):
        assert e[0] == 0 and e[-1] == n and set(np.diff(e)) <= {n // grid, -(-n // grid)}
    # and a random map pools to its region sums / maxima
    fmap = np.random.default_rng(2).random((2, h, w, 3)).astype(np.float32)
    flat = fmap.reshape(2, h * w, 3)
    want_sum = np.stack([flat[:, m].sum(axis=1) for m in member.astype(bool)], axis=1).reshape(2, -1)
    want_max = np.stack([flat[:, m].max(axis=1) for m in member.astype(bool)], axis=1).reshape(2, -1)
    np.testing.assert_allclose(np.asarray(pool(fmap, grid, "sum")), want_sum, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pool(fmap, grid, "max")), want_max)


@FEW
@given(m=st.integers(1, 30), d=st.integers(1, 10), k=st.integers(1, 10), alpha=st.floats(0, 1))
@example(m=20, d=4, k=6, alpha=0.3)
def test_encoders_code_what_they_promise(m, d, k, alpha):
    """hard is the one-hot code of the nearest centroid, triangle is max(0, mean_j z_j - z_k) with
    z the distances, and the soft threshold is the two non-negative halves of c.x shrunk towards 0
    by alpha; each checked against float64 distances where no near-tie makes float32 ambiguous."""
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(m, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)
    tri, hard, soft = (np.asarray(f) for f in (TRIANGLE(x, c), HARD(x, c), SOFT(x, c, alpha)))
    assert tri.shape == hard.shape == (m, k) and soft.shape == (m, 2 * k)
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    dist = np.sqrt(((x64[:, None, :] - c64[None]) ** 2).sum(-1))
    gap = np.sort(dist, axis=1)[:, 1] - dist.min(axis=1) if k > 1 else np.inf + 0 * dist[:, 0]
    clear = gap > 1e-4
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.argmax(axis=1)[clear], dist.argmin(axis=1)[clear])
    np.testing.assert_array_equal(hard.sum(axis=1), 1.0)
    # distances ~ 5 from the float32 expansion ||x||^2 - 2 x.c + ||c||^2: ~1e-6 absolute
    np.testing.assert_allclose(tri, np.maximum(0.0, dist.mean(axis=1, keepdims=True) - dist), rtol=0, atol=1e-4)
    proj = x64 @ c64.T
    np.testing.assert_allclose(soft[:, :k], np.maximum(proj - alpha, 0.0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(soft[:, k:], np.maximum(-proj - alpha, 0.0), rtol=0, atol=1e-5)
