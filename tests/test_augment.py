"""Tests for kmjax.augment: mirror images and random crops, against direct NumPy constructions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kmjax.augment import mirror, random_crops

RNG = np.random.default_rng(0)
# pixel values 1..255: a zero in a crop can only be padding
IMAGES = RNG.integers(1, 256, size=(64, 7, 5, 3), dtype=np.uint8)


def crop_corner(crop, image, pad):
    """The corners (dy, dx) of the padded image at which ``crop`` is the H x W window."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            if np.array_equal(padded[dy:dy + h, dx:dx + w], crop)]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_mirror_reverses_columns(dtype):
    images = IMAGES.astype(dtype)
    got = mirror(images)
    assert got.shape == images.shape and got.dtype == dtype and isinstance(got, np.ndarray)
    for n in range(3):
        for col in range(5):
            np.testing.assert_array_equal(got[n, :, col], images[n, :, 4 - col])
    np.testing.assert_array_equal(mirror(got), images)  # an involution


def test_mirror_of_jax_arrays_and_under_jit():
    images = jnp.asarray(IMAGES)
    np.testing.assert_array_equal(np.asarray(mirror(images)), IMAGES[:, :, ::-1])
    np.testing.assert_array_equal(np.asarray(jax.jit(mirror)(images)), IMAGES[:, :, ::-1])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("pad", [1, 2])
def test_random_crops_are_shifted_copies_of_the_padded_image(dtype, pad):
    images = IMAGES.astype(dtype)
    got = random_crops(jax.random.key(1), images, pad)
    assert got.shape == images.shape and got.dtype == dtype and isinstance(got, np.ndarray)
    corners = []
    for crop, image in zip(got, images):
        found = crop_corner(crop, image, pad)
        assert len(found) == 1  # nonzero random pixels: exactly one window matches
        corners.append(found[0])
    # each image draws its own corner: several distinct ones among 64 images
    assert len(set(corners)) > 3


def test_random_crops_corners_cover_all_offsets_uniformly():
    # 1800 tiny images, pad 1: the 9 corners each drawn ~200 times
    images = RNG.integers(1, 256, size=(1800, 3, 3, 1), dtype=np.uint8)
    got = random_crops(jax.random.key(2), images, 1)
    counts = {}
    for crop, image in zip(got, images):
        (corner,) = crop_corner(crop, image, 1)
        counts[corner] = counts.get(corner, 0) + 1
    assert len(counts) == 9
    # binomial(1800, 1/9): mean 200, sd 13; 5 sd either side
    assert all(135 < c < 265 for c in counts.values()), counts


def test_random_crops_deterministic_for_a_key():
    a = random_crops(jax.random.key(3), IMAGES)
    np.testing.assert_array_equal(a, random_crops(jax.random.key(3), IMAGES))
    assert not np.array_equal(a, random_crops(jax.random.key(4), IMAGES))


def test_random_crops_numpy_and_jax_agree_and_jit():
    key = jax.random.key(5)
    host = random_crops(key, IMAGES, 2)
    device = random_crops(key, jnp.asarray(IMAGES), 2)
    assert isinstance(device, jax.Array) and device.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(device), host)
    jitted = jax.jit(random_crops, static_argnames="pad")(key, jnp.asarray(IMAGES), pad=2)
    np.testing.assert_array_equal(np.asarray(jitted), host)


def test_random_crops_pad_zero_is_identity():
    np.testing.assert_array_equal(random_crops(jax.random.key(6), IMAGES, 0), IMAGES)


def test_random_crops_default_pad_is_four():
    images = RNG.integers(1, 256, size=(200, 12, 12, 3), dtype=np.uint8)
    got = random_crops(jax.random.key(7), images)
    corners = {crop_corner(c, i, 4)[0] for c, i in zip(got, images)}
    assert max(max(c) for c in corners) == 8 and min(min(c) for c in corners) == 0


@pytest.mark.parametrize("pad", [-1, 1.5, True, None])
def test_random_crops_bad_pad(pad):
    with pytest.raises(ValueError, match="pad"):
        random_crops(jax.random.key(0), IMAGES, pad)


@pytest.mark.parametrize("fn", [mirror, lambda x: random_crops(jax.random.key(0), x)])
def test_rank_errors(fn):
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        fn(IMAGES[0])
