"""Data augmentation: mirror images and random crops, as pure functions of (N, H, W, C) images.

Each returns images of the input's shape and dtype, so an augmented copy of a data set goes
through ``extract_features`` like any other images. Both accept NumPy arrays (and return NumPy,
on the host: a training set's copies need not visit an accelerator) or JAX arrays (and return
JAX arrays, also inside ``jax.jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import integer, is_tracer
from kmjax.errors import InputError

__all__ = ["mirror", "random_crops"]


def _check_rank(images, name: str) -> None:
    shape = np.shape(images)
    if len(shape) != 4:
        raise InputError(f"{name} needs images of shape (N, H, W, C), got shape {shape}")


def mirror(images):
    """Left-right mirror images: column j of each image becomes column W - 1 - j.

    Args:
      images: (N, H, W, C), any dtype and scale.

    Returns:
      (N, H, W, C), same dtype. A NumPy input gives a NumPy view (no copy).
    """
    _check_rank(images, "mirror")
    return images[:, :, ::-1, :]


def random_crops(key, images, pad: int = 4, *, among=None):
    """One random crop per image of the image padded with zeros: torchvision's
    ``RandomCrop(H, padding=pad)`` (the crops of Thiry et al.; of standard CIFAR-10 training).

    Each image is padded with ``pad`` zero pixels on every side, and an H x W window of the padded
    image is kept, its corner (dy, dx) drawn uniformly from {0, ..., 2 pad}^2, independently for
    each image: the image shifted by (pad - dy, pad - dx) pixels, zeros filling in.

    Args:
      key: a ``jax.random`` key; the same key gives the same crops.
      images: (N, H, W, C), any dtype (zero is black on both the 0-255 and the 0-1 scale).
      pad: zero pixels added on each side, an integer >= 0 (0: the images unchanged).
      among: (index, n): the images are rows ``index`` of a set of n images, and get the crops those
        rows get in it (a run on several processes crops its share as one process crops them all).

    Returns:
      (N, H, W, C), same dtype; NumPy for a NumPy input, else a JAX array.
    """
    _check_rank(images, "random_crops")
    pad = integer(pad, "pad", minimum=0)
    n, h, w, _ = np.shape(images)
    index, total = (None, n) if among is None else among
    corners = jax.random.randint(key, (total, 2), 0, 2 * pad + 1)
    if index is not None:
        if np.shape(index) != (n,):
            raise InputError(f"among = (index, n) needs one index per image: {n} images, index of shape "
                             f"{np.shape(index)}")
        if not is_tracer(index) and n and not 0 <= int(np.min(index)) <= int(np.max(index)) < total:
            raise InputError(f"among = (index, n): the indices must lie in [0, {total}), got "
                             f"{int(np.min(index))}..{int(np.max(index))}")
        corners = corners[jnp.asarray(index)]
    host = isinstance(images, np.ndarray) and not is_tracer(corners)
    xp = np if host else jnp
    if host:
        corners = np.asarray(corners)
    padded = xp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = corners[:, 0, None] + xp.arange(h)  # (N, H): padded rows kept for each image
    cols = corners[:, 1, None] + xp.arange(w)
    return padded[xp.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
