"""Tests for kmjax.patches against loop-based NumPy references."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kmjax.patches import extract_patches, grid_size, sample_patches


def naive_patches(images, size, stride):
    """Reference: an explicit loop over images and window positions."""
    n, h, w, c = images.shape
    rows = list(range(0, h - size + 1, stride))
    cols = list(range(0, w - size + 1, stride))
    out = np.empty((n, len(rows), len(cols), size * size * c), images.dtype)
    for i in range(n):
        for a, r in enumerate(rows):
            for b, col in enumerate(cols):
                out[i, a, b] = images[i, r : r + size, col : col + size, :].reshape(-1)
    return out


def random_images(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.normal(size=shape).astype(dtype)


# (N, H, W, C, size, stride): H != W throughout except the size == H == W case.
CASES = [
    (2, 7, 9, 3, 3, 1),  # plain
    (2, 7, 9, 3, 3, 2),  # stride that does not divide H - size
    (1, 8, 6, 1, 2, 3),  # stride > size, C = 1
    (2, 5, 8, 4, 5, 1),  # size == H, C = 4
    (1, 6, 11, 4, 2, 4),  # stride > size, C = 4
    (1, 5, 5, 3, 5, 2),  # size == H == W: a single window
]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("n,h,w,c,size,stride", CASES)
def test_extract_matches_naive_loop(n, h, w, c, size, stride, dtype):
    images = random_images((n, h, w, c), dtype, seed=n * 1000 + h * 100 + w + c + size + stride)
    got = extract_patches(images, size, stride)
    want = naive_patches(images, size, stride)
    gh, gw = grid_size(h, w, size, stride)
    assert got.shape == (n, gh, gw, size * size * c) == want.shape
    assert got.dtype == dtype  # pixels keep their dtype (uint8 stays uint8)
    # Pure data movement: exact equality.
    np.testing.assert_array_equal(np.asarray(got), want)


def test_patch_reshapes_back_to_window():
    images = random_images((1, 6, 7, 3), np.uint8, seed=1)
    p = np.asarray(extract_patches(images, 4, 1))
    # Row-column-channel order: patch (r, c) reshaped is images[r:r+4, c:c+4, :].
    np.testing.assert_array_equal(p[0, 2, 3].reshape(4, 4, 3), images[0, 2:6, 3:7, :])


def test_grid_size():
    assert grid_size(32, 32, 6, 1) == (27, 27)
    assert grid_size(7, 9, 3, 2) == (3, 4)
    assert grid_size(8, 6, 2, 3) == (3, 2)
    assert grid_size(5, 8, 5, 1) == (1, 4)


# ---------------------------------------------------------------- sample_patches

SAMPLE_N, SAMPLE_H, SAMPLE_W, SAMPLE_C, SAMPLE_SIZE = 3, 6, 8, 2, 3
SAMPLE_NUM = 600  # 200 per image; 4 row offsets x 6 column offsets each


@pytest.fixture(scope="module")
def sample_images():
    return random_images((SAMPLE_N, SAMPLE_H, SAMPLE_W, SAMPLE_C), np.uint8, seed=7)


def locate(patch, image, size):
    """All (row, col) offsets whose window of ``image`` equals ``patch``."""
    h, w, _ = image.shape
    return [
        (r, c)
        for r in range(h - size + 1)
        for c in range(w - size + 1)
        if np.array_equal(image[r : r + size, c : c + size, :].reshape(-1), patch)
    ]


def test_sample_patches_are_windows_of_image_i_mod_n(sample_images):
    got = sample_patches(jax.random.key(0), sample_images, SAMPLE_NUM, SAMPLE_SIZE)
    assert got.shape == (SAMPLE_NUM, SAMPLE_SIZE * SAMPLE_SIZE * SAMPLE_C)
    assert got.dtype == np.uint8
    got = np.asarray(got)
    rows, cols = set(), set()
    for i, patch in enumerate(got):
        where = locate(patch, sample_images[i % SAMPLE_N], SAMPLE_SIZE)
        # Random 18-byte windows are all distinct, so exactly one position matches.
        assert len(where) == 1, f"patch {i} is not a window of image {i % SAMPLE_N}"
        rows.add(where[0][0])
        cols.add(where[0][1])
    # 600 uniform draws over 4 x 6 offsets: every offset, incl. the last (H - size, W - size).
    assert rows == set(range(SAMPLE_H - SAMPLE_SIZE + 1))
    assert cols == set(range(SAMPLE_W - SAMPLE_SIZE + 1))


def test_sample_patches_reproducible(sample_images):
    a = sample_patches(jax.random.key(3), sample_images, SAMPLE_NUM, SAMPLE_SIZE)
    b = sample_patches(jax.random.key(3), sample_images, SAMPLE_NUM, SAMPLE_SIZE)
    c = sample_patches(jax.random.key(4), sample_images, SAMPLE_NUM, SAMPLE_SIZE)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_sample_patches_float_and_full_window():
    images = random_images((2, 4, 5, 1), np.float32, seed=2)
    got = np.asarray(sample_patches(jax.random.key(1), images, 5, 4))
    assert got.shape == (5, 16) and got.dtype == np.float32
    for i, patch in enumerate(got):
        assert len(locate(patch, images[i % 2], 4)) == 1


# ---------------------------------------------------------------- errors


def test_error_window_larger_than_image():
    images = np.zeros((1, 4, 6, 1), np.uint8)
    with pytest.raises(ValueError, match=r"patch size 5 is larger than the 4x6 images"):
        extract_patches(images, 5)
    with pytest.raises(ValueError, match=r"larger than the 4x6 images.*at most 4"):
        sample_patches(jax.random.key(0), images, 10, 5)


@pytest.mark.parametrize("stride", [0, -1])
def test_error_stride_not_positive(stride):
    with pytest.raises(ValueError, match=r"stride must be a positive integer"):
        extract_patches(np.zeros((1, 4, 4, 1)), 2, stride)


@pytest.mark.parametrize("size", [0, -2])
def test_error_size_not_positive(size):
    with pytest.raises(ValueError, match=r"patch size must be a positive integer"):
        extract_patches(np.zeros((1, 4, 4, 1)), size)
    with pytest.raises(ValueError, match=r"patch size must be a positive integer"):
        sample_patches(jax.random.key(0), np.zeros((1, 4, 4, 1)), 3, size)


def test_error_rank3_images():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*channel axis"):
        extract_patches(np.zeros((2, 8, 8)), 3)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        sample_patches(jax.random.key(0), np.zeros((2, 8, 8)), 4, 3)


def test_error_empty_images():
    with pytest.raises(ValueError, match=r"empty"):
        extract_patches(np.zeros((0, 8, 8, 3)), 3)
    with pytest.raises(ValueError, match=r"empty"):
        sample_patches(jax.random.key(0), np.zeros((0, 8, 8, 3)), 4, 3)


@pytest.mark.parametrize("num", [0, -5])
def test_error_num_not_positive(num):
    with pytest.raises(ValueError, match=r"num must be a positive integer"):
        sample_patches(jax.random.key(0), np.zeros((1, 8, 8, 3)), num, 3)


def test_host_images_are_padded_to_a_bucket_with_the_same_patches(monkeypatch):
    """(As on an accelerator: a CPU does not pad by default, see ``kmjax._ops.bucket``.) sample_patches pads host images to a bucket of image counts (kmjax._ops.bucket: 70, 76 and 77
    images all go to 80) and passes the real count traced: the patches of the unpadded images, bit
    for bit (device images are sampled unpadded), and one program for the whole bucket."""
    from kmjax.experiment.compile_cache import CompileCounter
    from kmjax.patches import _sample

    monkeypatch.setenv("KMJAX_BUCKET_ROWS", "1")
    images = np.random.default_rng(8).integers(0, 256, (80, 16, 16, 3), dtype=np.uint8)
    key = jax.random.key(5)
    for n in (80, 76, 70, 17):
        got = np.asarray(sample_patches(key, images[:n], 500, 6))
        np.testing.assert_array_equal(got, np.asarray(_sample(key, jax.device_put(images[:n]), 500, 6)))
        assert np.all(got.max(axis=1) > 0)  # none cut from a blank padding image
    before = len(CompileCounter.compiled)
    sample_patches(key, images[:77], 500, 6)
    assert CompileCounter.compiled[before:] == []
