"""Any image size end to end (issue 29, item 2): 96 x 96 (STL-10's size) and a non-square size,
on synthetic images. Features against a NumPy reference, their length, the mirror symmetry, a
model saved, loaded and predicting at 96 x 96, and the refusals of pooling that does not fit."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

import kmjax
from kmjax.cli import main
from kmjax.features import FeatureSpec, check_pooling, extract_features, feature_dim
from kmjax.model import Model, load, predict_images, save
from kmjax.pooling import fitting_windows
from kmjax.symmetry import check_mirror_symmetric, feature_mirror_permutation, mirror_pairs, pair_sums

K = 8  # a flip-closed dictionary: 4 learned atoms and their mirror images
STL = (96, 96)
NON_SQUARE = (40, 57)  # 35 x 52 positions with 6 x 6 patches: an even row, so grid = 2 is symmetric there
QUADRANTS = FeatureSpec()  # the paper's: triangle, 6 x 6 patches, stride 1, sum over a 2 x 2 grid
WINDOWS_96 = FeatureSpec(pool_size=51, pool_stride=20)  # 3 x 3 overlapping windows on the 91 x 91 map


@pytest.fixture(scope="module", params=[STL, NON_SQUARE], ids=["96x96", "40x57"])
def system(request):
    """(images, dictionary) at one size: 3 random uint8 images, K = 8 atoms learned from 600 patches."""
    h, w = request.param
    images = np.random.default_rng(h).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    d = kmjax.learn_dictionary(jax.random.key(0), images, K, n_patches=600, max_iter=3, flip_closed=True)
    return images, d


def _edges(n, grid):
    """The authors' MATLAB round(i * n / grid), halves away from zero, in exact integer arithmetic."""
    return [(2 * i * n + grid) // (2 * grid) for i in range(grid + 1)]


def _reference(image, d, spec: FeatureSpec) -> np.ndarray:
    """One image's features in float64 NumPy, written out from the method's definition: every
    patch, normalized, whitened, triangle-coded, summed over the regions in region-major order."""
    p = spec.patch_size
    x = np.lib.stride_tricks.sliding_window_view(image.astype(np.float64), (p, p, 3))[:, :, 0]
    gh, gw = x.shape[:2]
    x = x.reshape(gh, gw, -1)  # each patch in (row, column, channel) order
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + spec.eps_norm)
    x = (x - np.asarray(d.zca.mean, np.float64)) @ np.asarray(d.zca.matrix, np.float64)
    c = np.asarray(d.centroids, np.float64)
    z = np.sqrt(((x[:, :, None, :] - c) ** 2).sum(-1))
    codes = np.maximum(z.mean(-1, keepdims=True) - z, 0.0)  # (gh, gw, K)
    if spec.pool_size:
        size, stride = spec.pool_size, spec.pool_stride or spec.pool_size
        rows = [(r, r + size) for r in range(0, gh - size + 1, stride)]
        cols = [(q, q + size) for q in range(0, gw - size + 1, stride)]
    else:
        rows, cols = [list(zip(e[:-1], e[1:])) for e in (_edges(gh, spec.grid), _edges(gw, spec.grid))]
    return np.concatenate([codes[r0:r1, c0:c1].sum((0, 1)) for r0, r1 in rows for c0, c1 in cols])


def _specs(image_shape):
    """The quadrants and 3 windows across a row (the 3 x 3 windows at 96 x 96) at this size."""
    gw = image_shape[1] - 5
    return [QUADRANTS, FeatureSpec(pool_size=fitting_windows(gw)[0], pool_stride=fitting_windows(gw)[1])]


def test_windows_that_fit_are_recht_et_als_in_proportion():
    assert fitting_windows(27) == (15, 6)  # Recht et al. at 32 x 32
    assert fitting_windows(91) == (WINDOWS_96.pool_size, WINDOWS_96.pool_stride)
    assert _specs(STL)[1] == WINDOWS_96
    for n in range(1, 200):
        size, stride = fitting_windows(n)
        assert 1 <= size <= n and (n - size) % stride == 0  # the last window ends on the last position
        assert len(range(0, n - size + 1, stride)) == min(3, n)


def test_features_equal_a_numpy_reference_and_feature_dim(system):
    """float32 features within 2e-5 of the largest feature (sums of up to 2,600 codes; 2e-6 measured) of the
    float64 reference; the features of two images at once are those of each alone."""
    images, d = system
    for spec in _specs(images.shape[1:]):
        f = extract_features(images, d.centroids, d.zca, spec)
        assert f.shape == (3, feature_dim(spec, K, images.shape[1:]))
        gh, gw = images.shape[1] - 5, images.shape[2] - 5
        regions = 4 if not spec.pool_size else (
            len(range(0, gh - spec.pool_size + 1, spec.pool_stride)) * len(range(0, gw - spec.pool_size + 1,
                                                                                 spec.pool_stride)))
        assert f.shape[1] == regions * K
        for i in range(1 if images.shape[1:3] == STL else 2):
            ref = _reference(images[i], d, spec)
            np.testing.assert_allclose(f[i], ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    if images.shape[1:3] == STL:
        assert feature_dim(WINDOWS_96, K, images.shape[1:]) == 9 * K  # 3 x 3 windows
    else:
        # 1 row x 3 columns of windows of 28 positions on the 35 x 52 map
        assert feature_dim(_specs(images.shape[1:])[1], K, images.shape[1:]) == 3 * K


@pytest.mark.parametrize("which", ["grid3", "windows", "quadrants"])
def test_features_of_the_mirror_image_are_the_permutation(system, which):
    """phi(mirror x) = phi(x)[perm] with a flip-closed dictionary, and mirror_sums gives the pair
    sums; the quadrants are symmetric on the 52 positions of a 57-pixel row and refused on the 91
    of a 96-pixel one (46 / 45), with a message naming settings that are."""
    images, d = system
    shape = images.shape[1:]
    spec = {"grid3": FeatureSpec(grid=3), "windows": _specs(shape)[1], "quadrants": QUADRANTS}[which]
    if which == "quadrants" and shape[:2] == STL:
        with pytest.raises(kmjax.InputError, match="not mirror-symmetric.*grid = 3.*pool_size = 51, pool_stride = 20"):
            check_mirror_symmetric(spec, shape)
        with pytest.raises(kmjax.InputError, match=r"\(0, 46\), \(46, 91\).*96x96 images"):
            extract_features(images, d.centroids, d.zca, spec._replace(mirror_sums=True))
        return
    f = extract_features(images, d.centroids, d.zca, spec)
    fm = extract_features(np.ascontiguousarray(images[:, :, ::-1]), d.centroids, d.zca, spec)
    perm = feature_mirror_permutation(spec, K, shape)
    assert sorted(perm) == list(range(f.shape[1])) and np.all(perm[perm] == np.arange(perm.size))
    np.testing.assert_allclose(fm, f[:, perm], rtol=0, atol=1e-5 * np.abs(f).max())
    reduced = extract_features(images, d.centroids, d.zca, spec._replace(mirror_sums=True))
    assert reduced.shape[1] == feature_dim(spec._replace(mirror_sums=True), K, shape) == f.shape[1] // 2
    np.testing.assert_allclose(reduced, pair_sums(f, mirror_pairs(spec, K, shape)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,spec", [
    ((32, 32), FeatureSpec()),  # the paper's 14 / 13 quadrants on 27 positions, as before
    ((96, 96), FeatureSpec(pool_size=15, pool_stride=6)),  # Recht et al.'s numbers, 13 windows on 91 positions
    ((40, 56), FeatureSpec(grid=4)),
])
def test_asymmetric_pooling_names_settings_that_are_symmetric(shape, spec):
    with pytest.raises(kmjax.InputError, match="not mirror-symmetric") as info:
        check_mirror_symmetric(spec, shape)
    suggested = str(info.value).split("use e.g. ")[1].split("; ")
    assert suggested
    for change in suggested:  # each one named is symmetric at this size
        fields = dict(kv.split(" = ") for part in change.split(" with ") for kv in part.split(", "))
        check_mirror_symmetric(spec._replace(**{k: int(v) for k, v in fields.items()}), shape)


@pytest.mark.parametrize("shape,spec,match,fits", [
    ((20, 20), FeatureSpec(pool_size=16), "pool_size = 16 positions do not fit the 15x15 map of positions "
     r"\(20x20 images, patch_size 6, stride 1\): use pool_size <= 15, e.g. pool_size = 9, pool_stride = 3",
     dict(pool_size=9, pool_stride=3)),
    ((20, 30), FeatureSpec(grid=16), r"grid of 16 regions per side is finer than the 15x25 map .*use grid <= 15",
     dict(grid=15)),
    ((96, 64), FeatureSpec(pool_size=61, pool_stride=20), "do not fit the 91x59 map.*pool_size = 33, "
     "pool_stride = 13", dict(pool_size=33, pool_stride=13)),
    ((8, 8), FeatureSpec(patch_size=9), "use a patch_size of at most 8", dict(patch_size=7)),
])
def test_pooling_that_does_not_fit_is_refused_with_a_choice_that_fits(shape, spec, match, fits):
    for call in (lambda s: check_pooling(s, shape), lambda s: feature_dim(s, K, shape + (3,))):
        with pytest.raises(kmjax.InputError, match=match):
            call(spec)
        call(spec._replace(**fits))  # the choice named fits
    with pytest.raises(kmjax.InputError, match="do not fit the 4x7 map of positions: use size <= 4, e.g. size = 2, "
                       "stride = 1"):
        kmjax.pool(np.zeros((1, 4, 7, 2), np.float32), size=5, stride=1)


@pytest.fixture(scope="module")
def model96(tmp_path_factory):
    """A model trained on 24 random 96 x 96 images, bright against dark, saved and loaded."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 24)
    images = (rng.integers(0, 120, (24, 96, 96, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    spec = FeatureSpec(eps_norm=None, grid=3)  # keep brightness: it is the signal here
    d = kmjax.learn_dictionary(jax.random.key(0), images, K, n_patches=800, max_iter=3, normalize="none")
    feats = extract_features(images, d.centroids, d.zca, spec)
    std = kmjax.fit_standardizer(feats)
    clf, _ = kmjax.train_linear(kmjax.standardize(std, feats), labels, num_classes=2, C=1.0)
    model = Model(spec, d.zca, d.centroids, std, clf, ("dark", "bright"), tuple(images.shape[1:]))
    path = save(tmp_path_factory.mktemp("model96") / "model.npz", model)
    return model, path, images, labels


def test_a_96x96_model_round_trips_and_predicts(model96):
    model, path, images, labels = model96
    loaded = load(path)
    assert loaded.image_shape == (96, 96, 3) and loaded.spec == model.spec
    predicted = predict_images(loaded, images)
    np.testing.assert_array_equal(predicted, predict_images(model, images))
    assert (predicted == labels).mean() > 0.9  # the toy task is learned
    assert predict_images(loaded, images[0]).tolist() == [predicted[0]]  # one (H, W, C) image
    with pytest.raises(kmjax.InputError, match=r"\(N, 96, 96, 3\).*resize them to 96x96"):
        predict_images(loaded, images[:, :32, :32])


def test_predict_resize_uses_the_models_size(model96, tmp_path, capsys):
    _, path, images, labels = model96
    files = []
    for i in range(4):  # other sizes, non-square: resized to the 96 x 96 of training
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i]).resize((70, 50)).save(files[-1])
    assert main(["predict", str(path), *map(str, files), "--resize", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in out] == labels[:4].tolist()
    assert main(["predict", str(path), str(files[0])]) == 2  # without --resize: refused, naming the size
    assert "must be 96x96" in capsys.readouterr().err


def test_filters_plot_of_a_96x96_model(model96, tmp_path):
    _, path, _, _ = model96
    out = tmp_path / "filters.png"
    assert main(["filters", str(path), "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 0 and im.size[1] > 0
