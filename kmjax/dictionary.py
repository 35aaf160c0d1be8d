"""Dictionary learning: patches -> normalization -> whitening -> k-means, as one pure function.

``learn_dictionary`` is the first half of the single-layer system (the second is
``extract_features``); the runner and ``kmjax.sklearn.CoatesFeatures`` both call it. Its defaults
are the authors' released settings (docs/design.md, "Reference settings").
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import choice
from kmjax.cluster import KMeansResult, kmeans
from kmjax.errors import InputError
from kmjax.patches import extract_patches, sample_patches
from kmjax.preprocess import ZCA, apply_zca, fit_zca, normalize_patches, standardize_dimensions
from kmjax.symmetry import close_dictionary, patch_mirror_index, symmetrize_zca

__all__ = ["Dictionary", "learn_dictionary", "patch_key", "SAMPLINGS", "NORMALIZATIONS", "AUTHORS"]

SAMPLINGS = ("random", "grid")
# How patches are normalized before whitening: "patch" per patch (brightness and contrast, the
# paper), "dimension" per dimension over the sample (the blog post's; dictionaries only, the dense
# features have no sample to take statistics over), "none".
NORMALIZATIONS = ("patch", "dimension", "none")


class Dictionary(NamedTuple):
    """A learned dictionary.

    zca: the ``ZCA`` fitted on the normalized patches, or None (raw patches).
    kmeans: the ``KMeansResult`` on the whitened patches; ``kmeans.centroids`` is (K, D).
    n_patches: () int, the number of patches it was learned from.
    """

    zca: ZCA | None
    kmeans: KMeansResult
    n_patches: jax.Array

    @property
    def centroids(self):
        return self.kmeans.centroids


def learn_dictionary(
    key,
    images,
    k: int = 1600,
    *,
    patch_size: int = 6,
    n_patches: int = 400_000,
    sampling: str = "random",
    stride: int = 1,
    normalize: str = "patch",
    eps_norm: float = 10.0,
    whiten: bool = True,
    eps_zca: float = 0.1,
    init="randn",
    max_iter: int = 50,
    tol: float | None = None,
    empty: str = "zero",
    spherical: bool = False,
    chunk_size: int | None = None,
    precision: str = "float32",
    flip_closed: bool = False,
    progress=None,
    mesh=None,
    state=None,
    checkpoint=None,
    patches=None,
) -> Dictionary:
    """Learn a K-atom dictionary from patches of ``images``.

    Args:
      key: a ``jax.random`` key; split into one for the patch positions and one for k-means.
      images: (N, H, W, C) on the scale the eps constants assume (0-255 for the defaults).
      k: number of centroids.
      patch_size: window side w; patches are w*w*C long, in (row, column, channel) order.
      n_patches: for ``sampling="random"``: windows at uniform positions, cycling through the images.
      sampling: "random" or "grid" (every window at ``stride``: the blog post's).
      normalize: one of ``NORMALIZATIONS``; eps_norm: the per-patch variance eps.
      whiten, eps_zca: ZCA whitening and its eigenvalue eps.
      init, max_iter, tol, empty, spherical, chunk_size, precision, progress: as ``kmjax.kmeans``
        (defaults: the authors' 0.1 * randn init, 50 iterations, empty clusters zeroed).
      flip_closed: a flip-closed dictionary (``kmjax.symmetry``): the whitening is fitted on the
        patches and their mirror images and made to commute with the flip exactly
        (``symmetrize_zca``), k-means learns K/2 atoms, and their mirror images are appended
        (``close_dictionary``: atoms K/2 + j mirror atoms j). ``kmeans.counts`` then repeats the
        learned atoms' counts for their mirrors; its inertia and objective are the K/2-atom run's.
      mesh: a ``jax.sharding.Mesh``: k-means runs data-parallel on its devices (axis "data"; see
        ``kmjax.kmeans``); None: one device.
      state, checkpoint: the k-means loop state to continue from, and a callable given it after each
        iteration, as ``kmjax.kmeans`` (the patches and whitening, cheap and deterministic, are
        recomputed on resumption).
      patches: the raw patch sample itself, (n, w*w*C), instead of drawing it from ``images`` (which
        then give only their channel count): a run on several processes assembles the sample one
        process would draw (for ``sampling="random"``: ``sample_positions`` with ``patch_key(key)``,
        then ``windows`` of each process's own images).

    Returns:
      ``Dictionary``.
    """
    choice(sampling, SAMPLINGS, "sampling")
    choice(normalize, NORMALIZATIONS, "normalization")
    if flip_closed and (isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2):
        raise InputError(f"a flip-closed dictionary holds pairs of atoms: k must be even and >= 2, got {k!r}")
    key_kmeans = _split(key)[1]
    if patches is not None:
        if np.ndim(patches) != 2 or np.shape(patches)[1] != patch_size * patch_size * images.shape[-1]:
            raise InputError(f"patches must be (n, {patch_size * patch_size * images.shape[-1]}) for patch_size "
                             f"{patch_size} and {images.shape[-1]} channels, got shape {np.shape(patches)}")
        if not isinstance(patches, jax.Array):  # sent explicitly, not by the jitted steps below
            patches = jax.device_put(np.asarray(patches))
    elif sampling == "random":
        patches = sample_patches(patch_key(key), images, n_patches, patch_size)
    else:
        patches = extract_patches(images, patch_size, stride)
        patches = patches.reshape(-1, patches.shape[-1])
    if normalize == "patch":
        # eps sent explicitly, as the weak-typed scalar a Python float would be: the same program for any eps
        x = normalize_patches(patches, jax.device_put(eps_norm))
    elif normalize == "dimension":
        x = standardize_dimensions(patches)
    else:
        x = jnp.asarray(patches, jnp.float32)
    zca = None
    if whiten and flip_closed:
        zca = _symmetrize_zca(fit_zca(_with_mirrors(x, patch_size, images.shape[-1]), eps_zca), patch_size)
    elif whiten:
        zca = fit_zca(x, eps_zca)
    if zca is not None:
        x = apply_zca(zca, x)
    options = dict(init=init, max_iter=max_iter, tol=tol, empty=empty, spherical=spherical, chunk_size=chunk_size,
                   precision=precision)
    result = kmeans(key_kmeans, x, k // 2 if flip_closed else k, progress=progress, mesh=mesh, state=state,
                    checkpoint=checkpoint, **options)
    if flip_closed:
        result = result._replace(centroids=_close_dictionary(result.centroids, patch_size),
                                 counts=jnp.concatenate([result.counts, result.counts]))
    return Dictionary(zca, result, jax.device_put(np.int32(x.shape[0])))


def patch_key(key):
    """The key ``learn_dictionary(key, ...)`` draws its patch positions with."""
    return _split(key)[0]


@jax.jit
def _split(key):
    # jax.random.split(key)[i], compiled: an eager index would send i to the device
    keys = jax.random.split(key)
    return keys[0], keys[1]


# The flip-closed steps, compiled: eagerly their NumPy mirror indices would be sent implicitly (and
# each operation be a program of its own)
@partial(jax.jit, static_argnums=(1, 2))
def _with_mirrors(x, patch_size: int, channels: int):
    return jnp.concatenate([x, x[:, patch_mirror_index(patch_size, channels)]])


_symmetrize_zca = jax.jit(symmetrize_zca, static_argnums=1)
_close_dictionary = jax.jit(close_dictionary, static_argnums=1)


# The authors' released settings, as ``learn_dictionary``'s defaults: the one place they are written
# (the runner's config schema and ``kmjax.sklearn.CoatesFeatures`` read them from here).
AUTHORS = {name: p.default for name, p in inspect.signature(learn_dictionary).parameters.items()
           if p.default is not inspect.Parameter.empty}
