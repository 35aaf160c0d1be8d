"""Patch extraction: every window of an image (dense) or random windows (sampled).

A patch is flattened in (row, column, channel) order, so ``patch.reshape(size, size, C)`` gives
the image window back. Pixels keep the dtype they come in (uint8 stays uint8: 400,000 6x6x3
patches are 43 MB as uint8, 173 MB as float32), except float64, which JAX keeps as float32
unless ``jax_enable_x64`` is set.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import check_images, positive_int
from kmjax._ops import bucket
from kmjax.errors import InputError

__all__ = ["extract_patches", "sample_patches", "sample_positions", "windows", "grid_size"]


def grid_size(height: int, width: int, size: int, stride: int = 1) -> tuple[int, int]:
    """Number of window positions (rows, columns) for a ``size`` window at ``stride``."""
    return (height - size) // stride + 1, (width - size) // stride + 1


def _check_window(images, size, stride) -> tuple[int, int]:
    check_images(images)
    size, stride = positive_int(size, "patch size"), positive_int(stride, "stride")
    _, h, w, _ = np.shape(images)
    if size > h or size > w:
        raise InputError(
            f"patch size {size} is larger than the {h}x{w} images; use a size of at most {min(h, w)}"
        )
    return size, stride


@partial(jax.jit, static_argnames=("size", "stride"))
def patch_grid(images, size, stride):
    """``extract_patches`` without the argument checks, for use inside ``jax.jit``."""
    n, h, w, c = images.shape
    gh, gw = grid_size(h, w, size, stride)
    # One strided slice per offset inside the window (size*size of them, a static Python loop):
    # pure data movement, no loop over images and no identity convolution.
    views = [
        images[:, i : i + stride * (gh - 1) + 1 : stride, j : j + stride * (gw - 1) + 1 : stride, :]
        for i in range(size)
        for j in range(size)
    ]
    return jnp.stack(views, axis=3).reshape(n, gh, gw, size * size * c)


def extract_patches(images, size: int, stride: int = 1):
    """Every ``size`` x ``size`` window of each image.

    Args:
      images: (N, H, W, C) array, any dtype (pixels keep their dtype and scale).
      size: window side in pixels.
      stride: step between window positions.

    Returns:
      (N, H', W', size*size*C) with H' = (H - size) // stride + 1 (likewise W'); each patch in
      (row, column, channel) order.
    """
    size, stride = _check_window(images, size, stride)
    # host images sent explicitly (jnp.asarray would be an implicit transfer); device ones stay put
    return patch_grid(images if isinstance(images, jax.Array) else jax.device_put(np.asarray(images)), size, stride)


def sample_positions(key, num: int, n_images: int, height: int, width: int, size: int):
    """Where ``sample_patches`` cuts its ``num`` windows from ``n_images`` images of height x width:
    (image, row, column) of each, three (num,) int32 arrays (JAX arrays; also inside ``jax.jit``).

    As the authors' code does, patch i comes from image i mod N, so every image contributes num/N
    patches (8 per image for 400,000 patches of the 50,000 training images); rows and columns are
    uniform. A run on several processes draws the positions of the whole sample in each process
    and cuts the windows of its own images (``windows``)."""
    key_r, key_c = jax.random.split(key)
    rows = jax.random.randint(key_r, (num,), 0, height - size + 1)
    cols = jax.random.randint(key_c, (num,), 0, width - size + 1)
    return jnp.arange(num, dtype=jnp.int32) % n_images, rows, cols


@partial(jax.jit, static_argnames=("size",))
def windows(images, which, rows, cols, size: int):
    """The ``size`` x ``size`` windows of ``images`` at (image, row, column) positions (equal-length
    int arrays, e.g. from ``sample_positions``), flattened in (row, column, channel) order."""
    c = images.shape[-1]

    def one(i, r, col):
        return jax.lax.dynamic_slice(images, (i, r, col, 0), (1, size, size, c)).reshape(-1)

    return jax.vmap(one)(which, rows, cols)


@partial(jax.jit, static_argnames=("num", "size"))
def _sample(key, images, num, size):
    n, h, w, _ = images.shape
    return windows(images, *sample_positions(key, num, n, h, w, size), size)


@partial(jax.jit, static_argnames=("num", "size"))
def _sample_padded(key, images, n_images, num, size):
    """``_sample`` of the first ``n_images`` (traced) of ``images``, the rest padding: the same
    positions and patches (patch i from image i mod n_images), one program per bucket of image counts."""
    _, h, w, _ = images.shape
    return windows(images, *sample_positions(key, num, n_images, h, w, size), size)


def sample_patches(key, images, num: int, size: int):
    """``num`` random windows at uniform positions, cycling through the images.

    Args:
      key: a ``jax.random`` key.
      images: (N, H, W, C) array, any dtype.
      num: number of patches.
      size: window side in pixels.

    Returns:
      (num, size*size*C) patches in (row, column, channel) order, the dtype of ``images``.

    Host images are padded with blank images to a bucket of image counts (``kmjax._ops.bucket``) and
    sent with their real count, which the sampler takes as a traced value: training sets of nearby
    sizes share its program, and the patches are those of the unpadded images, bit for bit. (Device
    images are sampled as they are: padding them would itself be a program per image count.)
    """
    size, _ = _check_window(images, size, 1)
    num = positive_int(num, "num")
    if isinstance(images, jax.Array):
        return _sample(key, images, num, size)
    images = np.asarray(images)
    n = images.shape[0]
    if bucket(n) > n:
        images = np.concatenate([images, np.zeros((bucket(n) - n, *images.shape[1:]), images.dtype)])
    # sent explicitly, the images and their count in one transfer
    images, n_images = jax.device_put((images, np.int32(n)))
    return _sample_padded(key, images, n_images, num, size)
