"""Tests for kmjax.features against a straightforward float64 NumPy pipeline."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import kmjax
from kmjax.augment import mirror
from kmjax.features import FeatureSpec, auto_batch_size, extract_features, feature_dim

N, H, W, C = 4, 10, 10, 3
P = 3
D = P * P * C
K = 5


def mround(v):
    return int(np.floor(v + 0.5))  # MATLAB round for v >= 0


def reference_features(images, centroids, zca, spec):
    """Loop reference: dense patches (row, col, channel) -> normalize -> whiten -> encode -> pool."""
    imgs = np.asarray(images, np.float64)
    cent = np.asarray(centroids, np.float64)
    n, h, w, c = imgs.shape
    p, s = spec.patch_size, spec.stride
    gh, gw = (h - p) // s + 1, (w - p) // s + 1
    k = len(cent)
    f = 2 * k if spec.encoder in ("soft_threshold", "nearest_q") else k
    fmap = np.zeros((n, gh, gw, f))
    for b in range(n):
        for i in range(gh):
            for j in range(gw):
                x = imgs[b, i * s:i * s + p, j * s:j * s + p, :].reshape(-1)  # (row, col, channel)
                if spec.eps_norm is not None:
                    x = (x - x.mean()) / np.sqrt(x.var(ddof=1) + spec.eps_norm)
                if zca is not None:
                    x = (x - np.asarray(zca.mean, np.float64)) @ np.asarray(zca.matrix, np.float64)
                dist = np.sqrt(((cent - x) ** 2).sum(axis=1))
                if spec.encoder == "triangle":
                    code = np.maximum(0.0, dist.mean() - dist)
                elif spec.encoder == "hard":
                    code = np.zeros(k)
                    code[np.argmin(dist)] = 1.0
                elif spec.encoder == "nearest_q":  # atom j coded iff at most q atoms are as near
                    d_neg = ((cent + x) ** 2).sum(axis=1)  # ||-x - c||^2
                    code = np.concatenate([[float((dist ** 2 <= dist[j] ** 2).sum() <= spec.q) for j in range(k)],
                                           [float((d_neg <= d_neg[j]).sum() <= spec.q) for j in range(k)]])
                else:
                    proj = cent @ x
                    code = np.concatenate([np.maximum(0, proj - spec.alpha), np.maximum(0, -proj - spec.alpha)])
                fmap[b, i, j] = code
    if spec.pool_size:  # windows with corners every pool_stride positions, whole windows only
        size, step = spec.pool_size, spec.pool_stride or spec.pool_size
        spans = lambda n: [(t, t + size) for t in range(0, n, step) if t + size <= n]
        rows, cols = spans(gh), spans(gw)
    else:
        g = spec.grid
        re = [mround(t * gh / g) for t in range(g + 1)]
        ce = [mround(t * gw / g) for t in range(g + 1)]
        rows, cols = list(zip(re[:-1], re[1:])), list(zip(ce[:-1], ce[1:]))
    out = []
    red = np.sum if spec.pool == "sum" else np.max
    for r0, r1 in rows:
        for c0, c1 in cols:
            out.append(red(fmap[:, r0:r1, c0:c1, :], axis=(1, 2)))
    return np.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, H, W, C), dtype=np.uint8)
    # ZCA fitted on random normalized patches (any patches will do: the test checks the pipeline)
    raw = rng.uniform(0, 255, size=(300, D)).astype(np.float32)
    zca = kmjax.fit_zca(np.asarray(kmjax.normalize_patches(raw, 10.0)), 0.1)
    centroids = rng.normal(size=(K, D)).astype(np.float32)
    return images, centroids, zca


# float32 throughout (normalization, a 27x27 whitening product, distance expansion) vs a float64
# reference; pooled sums of up to 64 codes. 1e-4 relative plus an absolute floor for near-zero
# pooled entries (triangle codes are differences of distances ~5, so ~1e-4 absolute slack).
RTOL, ATOL = 1e-4, 1e-3


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("encoder,pool", [("triangle", "sum"), ("soft_threshold", "max")])
def test_extract_features_matches_reference(setup, stride, encoder, pool):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=stride, eps_norm=10.0, encoder=encoder, grid=2, pool=pool)
    got = extract_features(images, centroids, zca, spec)
    assert got.shape == (N, feature_dim(spec, K)) and got.dtype == np.float32
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, reference_features(images, centroids, zca, spec), rtol=RTOL, atol=ATOL)


def test_extract_features_hard_matches_reference(setup):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, encoder="hard", grid=2)
    got = extract_features(images, centroids, zca, spec)
    ref = reference_features(images, centroids, zca, spec)
    # counts of nearest-centroid assignments: a float32 near-tie could move one assignment (two
    # counts change by 1), so at most one such move in the whole set, and exact row totals; an
    # encoder that picked another centroid (the farthest, the second nearest) moves dozens
    assert np.abs(got - ref).sum() <= 2.0
    np.testing.assert_array_equal(got.reshape(N, 4, K).sum(-1), ref.reshape(N, 4, K).sum(-1))


@pytest.mark.parametrize("batch_size", [1, 3, N])
def test_batching_gives_identical_results(setup, batch_size):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, grid=2)
    # step = 1: batches of any size (accelerators' default step is as wide as memory allows, and
    # batch sizes are rounded up to a multiple of it)
    full = extract_features(images, centroids, zca, spec, batch_size=N, step=1)
    calls = []
    got = extract_features(images, centroids, zca, spec, batch_size=batch_size, step=1,
                           progress=lambda done, total, _: calls.append((done, total)))
    # each image's features depend only on that image; only float32 rounding may differ between
    # compiled batch shapes (XLA may order reductions differently). Triangle codes are differences
    # of distances ~5 (ulp ~5e-7) summed over 16 positions: a few ulps, so 1e-5 absolute
    np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-5)
    assert calls[-1] == (N, N) and len(calls) == -(-N // batch_size)


def test_batch_size_larger_than_n_pads_one_call(setup):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, grid=2)
    calls = []
    a = extract_features(images, centroids, zca, spec, batch_size=100, progress=lambda d, t, _: calls.append(d))
    assert calls == [N]  # one padded call: the batch shape does not depend on the number of images
    b = extract_features(images[:3], centroids, zca, spec, batch_size=100)
    np.testing.assert_array_equal(a[:3], b)  # the same compiled call, so the same bits
    # against the call of exactly N images: rounding only (as test_batching_gives_identical_results)
    np.testing.assert_allclose(extract_features(images, centroids, zca, spec, batch_size=N), a, rtol=1e-6,
                               atol=1e-5)


def test_no_zca_and_no_normalization(setup):
    images, centroids, _ = setup
    spec = FeatureSpec(patch_size=P, stride=2, eps_norm=None, grid=2)
    # raw 0-255 pixels: distances ~800, so use scaled centroids near the data and a rtol-only check
    cent = (centroids * 20 + 128).astype(np.float32)
    got = extract_features(images, cent, None, spec)
    ref = reference_features(images, cent, None, spec)
    # distances ~100 from an expanded square ~1e4..1e6 in float32: ~1e-7 * 1e6 / 100 ~ 1e-3 abs;
    # pooled values are O(100), so 1e-4 relative + 0.05 absolute
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=5e-2)


def test_zca_without_normalization(setup):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, eps_norm=None, encoder="soft_threshold", grid=1)
    got = extract_features(images.astype(np.float32) / 255.0, centroids, zca, spec)
    ref = reference_features(images.astype(np.float64) / 255.0, centroids, zca, spec)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_soft_threshold_on_an_uneven_grid_matches_reference(setup):
    # a 4x4 map in a 3x3 grid: MATLAB's round splits each side 1 / 2 / 1, so the regions pool 1, 2
    # or 4 positions; both signs of the codes, region-major, each region's 2K codes together
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, encoder="soft_threshold", grid=3)
    assert feature_dim(spec, K) == 3 * 3 * 2 * K
    got = extract_features(images, centroids, zca, spec)
    assert got.shape == (N, 9 * 2 * K)
    np.testing.assert_allclose(got, reference_features(images, centroids, zca, spec), rtol=RTOL, atol=ATOL)
    assert feature_dim(FeatureSpec(encoder="triangle", grid=2), 1600) == 6400


def test_uint8_and_float_inputs_agree(setup):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, grid=2)
    a = extract_features(images, centroids, zca, spec)
    b = extract_features(images.astype(np.float32), centroids, zca, spec)
    # the first thing the pipeline does is cast patches to float32: same values, same result
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("changes", [{}, dict(encoder="soft_threshold"), dict(stride=2), dict(patch_size=5)])
def test_auto_batch_size(changes):
    # the largest batch whose float32 (B, H', W', F) maps fit in the budget, the map's size read off
    # the pipeline's own pieces (the grid of patches, the encoder's codes) for a 32x32x3 image
    spec = FeatureSpec(patch_size=6, stride=1, encoder="triangle")._replace(**changes)
    k = 16
    d = spec.patch_size**2 * 3
    gh, gw = jax.eval_shape(lambda im: kmjax.extract_patches(im, spec.patch_size, spec.stride),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), np.uint8)).shape[1:3]
    codes = jax.eval_shape(lambda x, c: kmjax.encode(x, c, spec.encoder), jax.ShapeDtypeStruct((1, d), np.float32),
                           jax.ShapeDtypeStruct((k, d), np.float32))
    map_bytes = gh * gw * codes.shape[1] * 4
    for mb in (1, 7.5, 512):
        b = auto_batch_size(spec, k, (32, 32, 3), memory_mb=mb)
        assert b * map_bytes <= mb * 2**20 < (b + 1) * map_bytes
    # 27*27 positions * 1600 features * 4 bytes = 4,665,600 bytes per image at the paper's settings
    assert auto_batch_size(FeatureSpec(), 1600, (32, 32, 3), memory_mb=512) == 115
    assert auto_batch_size(spec, 1600, (32, 32, 3), memory_mb=0.001) == 1  # never below 1


def test_error_centroids_wrong_dimension(setup):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match="centroids"):
        extract_features(images, centroids[:, :-1], zca, FeatureSpec(patch_size=P, stride=2))


def test_error_zca_wrong_dimension(setup):
    images, centroids, _ = setup
    zca = kmjax.ZCA(np.zeros(D + 1, np.float32), np.eye(D + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="ZCA"):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, stride=2))


def test_error_grid_finer_than_map(setup):
    images, centroids, zca = setup
    # 10x10 images, patch 3, stride 4 -> 2x2 positions; grid 3 is finer
    with pytest.raises(ValueError, match="grid"):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, stride=4, grid=3))


def test_error_unknown_encoder(setup):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match="unknown encoder"):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, encoder="sparse"))


def test_error_unknown_pool(setup):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match="unknown pooling"):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, pool="mean"))


def test_error_rank3_images(setup):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        extract_features(images[0], centroids, zca, FeatureSpec(patch_size=P))


def test_error_patch_larger_than_image(setup):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match="patch_size"):
        extract_features(images[:, :2, :2], centroids, zca, FeatureSpec(patch_size=P))


def test_error_bad_batch_size(setup):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, stride=2), batch_size=0)


# 10x10 images, patch 3: an 8x8 map at stride 1, 4x4 at stride 2
@pytest.mark.parametrize("stride,size,step,pool", [(1, 5, 3, "sum"), (1, 4, 2, "max"), (2, 3, 1, "sum"),
                                                   (2, 4, 0, "sum")])
def test_pooling_windows_match_reference(setup, stride, size, step, pool):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=stride, encoder="soft_threshold", pool=pool, pool_size=size,
                       pool_stride=step)
    got = extract_features(images, centroids, zca, spec)
    gh = (H - P) // stride + 1
    n_windows = len(range(0, gh - size + 1, step or size)) ** 2
    assert got.shape == (N, n_windows * 2 * K) == (N, feature_dim(spec, K, images.shape[1:]))
    np.testing.assert_allclose(got, reference_features(images, centroids, zca, spec), rtol=RTOL, atol=ATOL)


def test_recht_windows_on_cifar_sized_images():
    # 32x32 images, 6x6 patches: a 27x27 map; windows of 15 every 6 -> 3 x 3 = 9 regions
    spec = FeatureSpec(encoder="soft_threshold", pool_size=15, pool_stride=6)
    assert feature_dim(spec, 100, (32, 32, 3)) == 9 * 2 * 100
    assert feature_dim(spec, 100, (32, 32)) == 9 * 2 * 100
    assert feature_dim(spec._replace(pool_size=5, pool_stride=3), 100, (32, 32, 3)) == 8 * 8 * 2 * 100
    assert feature_dim(FeatureSpec(grid=3), 100, (32, 32, 3)) == feature_dim(FeatureSpec(grid=3), 100) == 900
    # and the features themselves: two CIFAR-sized images, K = 5 atoms, no whitening (patches of
    # 108 pixels); windows of 15 every 6 overlap, so a position is pooled up to 3 x 3 times
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    atoms = rng.normal(size=(K, 108)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    got = extract_features(images, atoms, None, spec)
    assert got.shape == (2, feature_dim(spec, K, images.shape[1:])) == (2, 9 * 2 * K)
    ref = reference_features(images, atoms, None, spec)
    # sums of 225 codes ~ 1 each: 1e-4 relative plus a small absolute floor
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    assert np.count_nonzero(ref) > ref.size // 2


def test_feature_dim_with_windows_needs_the_image_shape():
    with pytest.raises(ValueError, match="image_shape"):
        feature_dim(FeatureSpec(pool_size=15, pool_stride=6), 100)


@pytest.mark.parametrize("q", [1, 2, K - 1])
def test_nearest_q_features_match_reference(setup, q):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, encoder="nearest_q", q=q, grid=2)
    got = extract_features(images, centroids, zca, spec)
    assert got.shape == (N, feature_dim(spec, K)) == (N, 4 * 2 * K)
    # counts of coded atoms: integers, exact (no two of the 5 distances within float32 rounding)
    np.testing.assert_array_equal(got, reference_features(images, centroids, zca, spec))
    # q atoms per sign at each of the 4 positions of each quadrant of the 4x4 map
    np.testing.assert_array_equal(got.reshape(N, 4, 2, K).sum(-1), 4 * q)


def test_nearest_q_with_windows(setup):
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, encoder="nearest_q", q=2, pool_size=5, pool_stride=3)
    got = extract_features(images, centroids, zca, spec)
    np.testing.assert_array_equal(got, reference_features(images, centroids, zca, spec))


@pytest.mark.parametrize("q", [0, K, -1])
def test_error_nearest_q_needs_q(setup, q):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match="q"):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, encoder="nearest_q", q=q))


@pytest.mark.parametrize("changes,match", [
    (dict(pool_size=9), "do not fit the 8x8 map"),
    (dict(stride=4, pool_size=3), "do not fit the 2x2 map"),
    (dict(pool_stride=2), "needs pooling windows"),
    (dict(pool_size=-1), "pool_size must be an integer"),
    (dict(pool_size=2.5), "pool_size must be an integer"),
    (dict(pool_size=3, pool_stride=True), "pool_stride must be an integer"),
])
def test_error_pooling_windows(setup, changes, match):
    images, centroids, zca = setup
    with pytest.raises(ValueError, match=match):
        extract_features(images, centroids, zca, FeatureSpec(patch_size=P, **changes))


def test_feature_spec_fields_only_appended():
    # saved models rebuild FeatureSpec(**dict) from the dicts of older versions: the old fields keep
    # their order and defaults, the new ones default to "off"
    old = dict(patch_size=6, stride=1, eps_norm=10.0, encoder="triangle", alpha=0.25, grid=2, pool="sum")
    assert FeatureSpec._fields[:7] == tuple(old)
    spec = FeatureSpec(**old)
    assert spec == FeatureSpec() and (spec.pool_size, spec.pool_stride, spec.q) == (0, 0, 0)


def test_mirror_images_go_straight_in(setup):
    # test-time mirror averaging: the features of the mirror images are extract_features(mirror(x))
    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=2, encoder="soft_threshold")
    got = extract_features(mirror(images), centroids, zca, spec)  # a NumPy view with a negative stride
    np.testing.assert_array_equal(got, extract_features(np.ascontiguousarray(images[:, :, ::-1]), centroids, zca, spec))
    np.testing.assert_allclose(got, reference_features(images[:, :, ::-1], centroids, zca, spec), rtol=RTOL, atol=ATOL)


def test_zca_eps_scales_with_the_square_of_the_pixel_scale():
    """Without per-patch normalization, "pixels on [0, 1] with ZCA eps e" is "pixels on 0-255 with
    eps e * 255**2": no pixel-scale option is needed, only the rescaled eps.

    For patches x' = x / s (s = 255): mean' = mean / s and cov' = cov / s**2, with the same
    eigenvectors V and eigenvalues lambda / s**2, so
    P' = V diag(1 / sqrt(lambda / s**2 + e)) V^T = s V diag(1 / sqrt(lambda + s**2 e)) V^T = s P,
    P the whitening of the 0-255 patches with eps s**2 e, and (x' - mean') P' = (x - mean) P: the
    same whitened patches, hence the same dictionary and the same features. Recht et al.'s
    eps = 1e-3 on [0, 1] pixels is eps = 65.025 on the 0-255 scale. (With per-patch normalization
    it is the other way round: (x - mean(x)) / sqrt(var(x) + eps_norm) is unchanged by the pixel
    scale when eps_norm scales with s**2, so the normalized patches, and the ZCA eps that suits
    them, do not depend on the scale.) Only float32 rounding differs: the covariance, its
    eigendecomposition and the products are computed on numbers 255 or 255**2 times larger.
    """
    rng = np.random.default_rng(5)
    # smooth random images (neighbouring pixels correlated, as in natural images), 0-255
    base = rng.uniform(0, 255, size=(40, 5, 5, 3))
    images = np.clip(np.kron(base, np.ones((1, 2, 2, 1))) + rng.normal(0, 12, size=(40, 10, 10, 3)), 0, 255)
    images = images.astype(np.uint8)
    patches = kmjax.extract_patches(images, P).reshape(-1, D)
    e = 1e-3
    zca_255 = kmjax.fit_zca(np.asarray(patches, np.float32), e * 255.0**2)
    zca_01 = kmjax.fit_zca(np.asarray(patches, np.float32) / 255.0, e)
    w_255 = np.asarray(kmjax.apply_zca(zca_255, np.asarray(patches, np.float32)))
    w_01 = np.asarray(kmjax.apply_zca(zca_01, np.asarray(patches, np.float32) / 255.0))
    # whitened entries are O(1) (up to ~3); float32 covariances and eigendecompositions at the two
    # scales (eigenvalues ~500 to ~2e4 on 0-255) differ by rounding: 1.6e-5 measured, 1e-4 allowed
    assert np.abs(w_255).max() > 1.0
    np.testing.assert_allclose(w_01, w_255, rtol=0, atol=1e-4)
    # so the features agree too (soft threshold on the same whitened patches; unit-norm atoms)
    atoms = w_255[rng.choice(len(w_255), K, replace=False)]
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    spec = FeatureSpec(patch_size=P, eps_norm=None, encoder="soft_threshold", alpha=0.5)
    f_255 = extract_features(images, atoms, zca_255, spec)
    f_01 = extract_features(images.astype(np.float32) / 255.0, atoms, zca_01, spec)
    np.testing.assert_allclose(f_01, f_255, rtol=1e-4, atol=1e-3)
    # and the other scale of eps is a different whitening (the test can tell them apart)
    w_wrong = np.asarray(kmjax.apply_zca(kmjax.fit_zca(np.asarray(patches, np.float32), e), patches.astype(np.float32)))
    assert np.abs(w_wrong - w_255).max() > 0.1


def test_cpu_features_are_compiled_with_xla_fusions_and_give_the_same_numbers(setup):
    """On a CPU, extract_features compiles its loop with YNNPACK's fusions off (kmjax._ops:
    1.15-1.5x faster there); the features are those of the default compilation to float rounding.
    If this jaxlib no longer knows the option, the loop keeps the default (the same function)."""
    from kmjax._ops import _xla_fusions_known, xla_fusions
    from kmjax.features import _STATIC

    images, centroids, zca = setup
    spec = FeatureSpec(patch_size=P, stride=1)
    fast = xla_fusions(kmjax.batch_features, _STATIC, "cpu")
    assert xla_fusions(kmjax.batch_features, _STATIC, "gpu") is kmjax.batch_features
    args = (images, zca, centroids)
    if not _xla_fusions_known():
        assert fast is kmjax.batch_features
        return
    assert "__ynn_fusion" not in fast.lower(*args, spec=spec).compile().as_text()
    got = np.asarray(fast(*args, spec=spec))
    want = np.asarray(kmjax.batch_features(*args, spec=spec))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(extract_features(images, centroids, zca, spec), got, rtol=1e-6,
                               atol=1e-6 * np.abs(got).max())
