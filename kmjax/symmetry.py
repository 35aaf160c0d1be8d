"""Mirror symmetry: features of a mirror image as a permutation of the image's own, and the exact
reduction of mirror-augmented training to the original images.

Write Pi for the left-right flip of one w x w x C patch (a permutation of its D coordinates,
``patch_mirror_index``). Three conditions make the single-layer features mirror-equivariant:

1. a flip-closed dictionary: the mirror image of every atom is an atom. kmjax's layout
   (``close_dictionary``): atoms K/2 + j are the mirrors of atoms j, so atom k's partner is
   (k + K/2) mod K;
2. a whitening that commutes with the flip, Pi M Pi = M and Pi mu = mu (``symmetrize_zca``; fitted
   on a flip-symmetric patch set it does up to rounding, and the symmetrization makes it exact);
3. a mirror-symmetric map of positions and pooling regions: the dense grid reaches the right edge
   ((W - w) divisible by the stride) and the mirror image of every pooling region is a region
   (``check_mirror_symmetric``, whose refusal names settings that are: ``symmetric_choices``).
   Only the columns matter, so this holds or fails by the image's width alone. Odd grids always
   are; grid = 2 is when a row has an even number of positions (46 / 45 on the 91 positions of
   96 x 96 images is not, nor the paper's 14 / 13 on 27 at 32 x 32, while 7 x 7 patches give 13 / 13);
   windows are when the last one ends on the last position (15 every 6 on 27 positions; on 91,
   e.g. 51 every 20, ``kmjax.pooling.fitting_windows``).

Per-patch normalization is a function of the patch's values as a set, so it commutes with Pi. The
patch at (i, j) of the mirrored image is Pi times the patch at (i, W' - 1 - j) of the image, and
its code for atom k is the image patch's code for atom k's partner: for the soft threshold and
``nearest_q`` (codes of c_k . x, with c_k . Pi x = (Pi c_k) . x), the triangle encoder (distances,
and their mean over a closed dictionary) exactly; for ``hard`` up to ties between an atom and
another at the same distance. Pooling then maps region r to its mirror region. So

    phi(mirror x) = phi(x)[perm]            (``feature_mirror_permutation``)

with ``perm`` an involution swapping feature (region r, output o, atom k) with (mirror(r), o,
partner(k)); in kmjax's layout it has no fixed points (partners differ), so features come in D/2
pairs (a, b).

The reduction. Train on the images and their mirrors: rows z_i and P z_i, the same label, with a
standardization whose mean and scale are P-invariant (mu_a = mu_b, s_a = s_b on each pair), e.g.
the one below. The objective 1/2 ||W||^2 + C mean_rows loss(y, W^T z + b) is strictly convex and
unchanged by W -> P W (P swaps the two rows of every image), so its unique minimizer has W = P W:
w_a = w_b = v_j / sqrt(2) on each pair j. On such W both rows of an image have the same score
W^T z = v^T u with u_j = (z_a + z_b) / sqrt(2), so the objective becomes
1/2 ||v||^2 + C mean_i loss(y_i, v^T u_i + b) over the N original rows alone: the same problem, the
same C (the mean over 2N rows of pairs of equal terms is the mean over N), over D/2 pair sums
(for ridge: lambda = N / (2C) instead of 2N / (2C), i.e. lambda / 2). ``pair_sums`` gives
r_j = (x_a + x_b) / sqrt(2) of the raw features; standardizing r by its own mean and standard
deviation is the P-invariant standardization mu_a = mu_b = mean(r_j) / sqrt(2),
s_a = s_b = std(r_j), under which u_j = (r_j - mean r_j) / std(r_j): so a classifier fitted on
standardized pair sums IS the mirror-augmented classifier with that standardization, its
predictions are mirror-invariant (test-time mirror averaging comes free: the two views score
alike), and no mirrored image is ever encoded. The Gram matrix is a quarter of the mirrored
one's size and an eighth of its arithmetic (half the rows, half the columns).

What is exact, and relative to what. A classifier fitted on the standardized pair sums is, to
rounding, the classifier of the explicit rows z_i and P z_i standardized with the pair sums'
statistics: every feature centred on its mean over the 2N rows (mean(r_j) / sqrt(2) for both
features of pair j) and scaled by its pair's sqrt(var(r_j) + eps), eps the classifier's
(``tests/test_symmetry.py`` checks weights and scores against that explicit ridge in float64).
It is not the classifier of the encoded mirrors with the usual standardization, each feature
scaled by its own sqrt(var + eps) over the 2N rows: the means agree, but with m, v the features'
means and variances over the N images (population variances), feature a's variance over the 2N
rows is (v_a + v_b) / 2 + ((m_a - m_b) / 2)^2, where var(r_j) = (v_a + v_b) / 2 + cov(x_a, x_b).
The two are different scalings, pair by pair, of the same features, both mirror-invariant: for
the same C they are different ridge (or SVM) problems, which kmjax has not compared on one
dictionary.
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp

from kmjax.encoders import ENCODERS
from kmjax.errors import InputError
from kmjax.patches import grid_size
from kmjax.pooling import fitting_windows, region_spans
from kmjax.preprocess import ZCA

__all__ = ["patch_mirror_index", "close_dictionary", "symmetrize_zca", "check_flip_closed", "check_mirror_symmetric",
           "symmetric_choices", "feature_mirror_permutation", "mirror_pairs", "pair_sums"]


def patch_mirror_index(patch_size: int, channels: int) -> np.ndarray:
    """(D,) int: ``patch[..., index]`` is the patch of the mirror image, for patches flattened in
    (row, column, channel) order (``kmjax.extract_patches``). An involution."""
    grid = np.arange(patch_size * patch_size * channels).reshape(patch_size, patch_size, channels)
    return grid[:, ::-1, :].reshape(-1)


def _patch_index(d: int, patch_size: int) -> np.ndarray:
    channels, rest = divmod(d, patch_size * patch_size)
    if rest or channels < 1:
        raise InputError(f"vectors of length {d} are not {patch_size}x{patch_size}xC patches")
    return patch_mirror_index(patch_size, channels)


def close_dictionary(centroids, patch_size: int):
    """(K, D) -> (2K, D): the atoms, then their mirror images in the same order (kmjax's layout of
    a flip-closed dictionary: atom k's partner is (k + K) mod 2K)."""
    c = jnp.asarray(centroids)
    return jnp.concatenate([c, c[:, _patch_index(c.shape[1], patch_size)]])


def symmetrize_zca(zca: ZCA, patch_size: int) -> ZCA:
    """The whitening averaged with its mirror image: (M + Pi M Pi) / 2 and (mu + Pi mu) / 2, which
    commute with the flip exactly (entry by entry the same two floats are added). Fitted on a
    flip-symmetric patch set, the transform changes only by its rounding."""
    idx = _patch_index(zca.mean.shape[0], patch_size)
    matrix = 0.5 * (zca.matrix + zca.matrix[idx][:, idx])
    return ZCA(0.5 * (zca.mean + zca.mean[idx]), 0.5 * (matrix + matrix.T))


def check_flip_closed(centroids, patch_size: int, rtol: float = 1e-6) -> None:
    """ValueError unless atoms K/2 + j are the mirror images of atoms j (``close_dictionary``)."""
    c = np.asarray(centroids, np.float32)
    k = c.shape[0]
    if k % 2:
        raise InputError(f"a flip-closed dictionary has an even number of atoms (pairs), got K = {k}")
    mirrored = c[: k // 2][:, _patch_index(c.shape[1], patch_size)]
    err = np.abs(mirrored - c[k // 2 :]).max(initial=0.0)
    scale = np.abs(c).max(initial=0.0)
    if not err <= rtol * max(scale, 1e-30):
        raise InputError(f"the dictionary is not flip-closed: atoms K/2 + j must be the mirror images of atoms j "
                         f"(largest difference {err:.3g} against atoms of size {scale:.3g}); build it with "
                         "kmjax.close_dictionary or learn_dictionary(flip_closed=True)")


def _region_spans(gh: int, gw: int, spec):
    size = spec.pool_size or None
    return region_spans(gh, gw, spec.grid, size, (spec.pool_stride or spec.pool_size) if size else None)


def _column_mirror(spec, h: int, w: int) -> list | None:
    """Index of the mirror image of each column span of the pooling regions, None if the positions
    or the regions are not mirror-symmetric (or the regions do not fit)."""
    if spec.patch_size > min(h, w) or (w - spec.patch_size) % spec.stride:
        return None
    gh, gw = grid_size(h, w, spec.patch_size, spec.stride)
    try:
        _, cols = _region_spans(gh, gw, spec)
    except InputError:
        return None
    where = {span: i for i, span in enumerate(cols)}
    mirrored = [where.get((gw - c1, gw - c0)) for c0, c1 in cols]
    return None if None in mirrored else mirrored


def _describe(spec) -> str:
    if spec.pool_size:
        return f"pool_size = {spec.pool_size}, pool_stride = {spec.pool_stride or spec.pool_size}"
    return f"grid = {spec.grid}"


def symmetric_choices(spec, image_shape, limit: int = 4) -> list[str]:
    """Settings near ``spec`` whose features are mirror-symmetric on images of ``image_shape``, as
    "name = value" strings, nearest first: another grid (odd grids always are: MATLAB's rounding of
    the edges i * n / grid is symmetric unless some i * n / grid ends in .5), windows that end on
    the last position, 3 windows per row across the map (``kmjax.pooling.fitting_windows``), or a
    patch_size that makes the number of positions even."""
    h, w = int(image_shape[0]), int(image_shape[1])
    if (w - spec.patch_size) % spec.stride:
        return []
    gh, gw = grid_size(h, w, spec.patch_size, spec.stride)
    grid = lambda g: spec._replace(grid=g, pool_size=0, pool_stride=0)  # noqa: E731
    size, stride = spec.pool_size, spec.pool_stride or spec.pool_size
    a, b = fitting_windows(gw)
    if size and size <= gw:  # the same windows ending on the last position, or the nearest stride that does
        divisors = sorted((d for d in range(1, gw - size + 1) if (gw - size) % d == 0), key=lambda d: abs(d - stride))
        candidates = [spec._replace(pool_size=size + (gw - size) % stride)]
        candidates += [spec._replace(pool_stride=d) for d in divisors[:1]]
    elif size:
        candidates = []
    else:
        candidates = [grid(spec.grid + d) for d in (1, -1, 2, -2) if spec.grid + d >= 1]
    candidates += [spec._replace(pool_size=a, pool_stride=b), grid(3), grid(1)]
    candidates += [spec._replace(patch_size=p) for p in (spec.patch_size - 1, spec.patch_size + 1) if p >= 1]
    changes = [_change(spec, c) for c in candidates if c != spec and _column_mirror(c, h, w) is not None]
    return list(dict.fromkeys(changes))[:limit]


def _change(spec, new) -> str:
    """What ``new`` changes in ``spec``, as "name = value, ...": the pooling in full (grid, or
    pool_size and pool_stride) when it changes."""
    parts = [f"patch_size = {new.patch_size}"] if new.patch_size != spec.patch_size else []
    if _describe(new) != _describe(spec):
        parts.append(_describe(new) if new.pool_size else f"grid = {new.grid}, pool_size = 0, pool_stride = 0"
                     if spec.pool_size else f"grid = {new.grid}")
    return ", ".join(parts)


def _mirror_columns(spec, image_shape) -> list[int]:
    """Index of the mirror image of each column span of the pooling regions; ValueError if the
    positions or the regions are not mirror-symmetric."""
    h, w = image_shape[0], image_shape[1]
    if (w - spec.patch_size) % spec.stride:
        raise InputError(f"the dense grid at stride {spec.stride} does not reach the right edge of {w}-pixel images "
                         f"with {spec.patch_size}-pixel patches, so it is not mirror-symmetric; use a stride that "
                         f"divides {w - spec.patch_size}")
    mirrored = _column_mirror(spec, h, w)
    if mirrored is None:
        gh, gw = grid_size(h, w, spec.patch_size, spec.stride)
        _, cols = _region_spans(gh, gw, spec)
        shown = cols if len(cols) <= 6 else cols[:3] + ["..."] + cols[-2:]
        hint = "; ".join(symmetric_choices(spec, image_shape))
        raise InputError(f"the pooling regions' columns {', '.join(map(str, shown))} ({_describe(spec)}) on the {gw} "
                         f"positions of a row ({h}x{w} images, patch_size {spec.patch_size}, stride {spec.stride}) "
                         "are not mirror-symmetric (the mirror image of a region must be a region)"
                         + (f": use e.g. {hint}" if hint else ""))
    return mirrored


def check_mirror_symmetric(spec, image_shape) -> None:
    """ValueError saying what breaks the symmetry unless the features of ``spec`` on images of
    ``image_shape`` (H, W[, C]) are mirror-equivariant for a flip-closed dictionary."""
    _mirror_columns(spec, image_shape)


def feature_mirror_permutation(spec, k: int, image_shape) -> np.ndarray:
    """(F,) int ``perm`` with phi(mirror x) = phi(x)[perm] for the features of ``spec`` (not
    reduced) with a flip-closed dictionary of ``k`` atoms in kmjax's layout. An involution."""
    if k % 2:
        raise InputError(f"a flip-closed dictionary has an even number of atoms, got K = {k}")
    mirrored = _mirror_columns(spec, image_shape)
    h, w = image_shape[0], image_shape[1]
    gh, gw = grid_size(h, w, spec.patch_size, spec.stride)
    n_rows, n_cols = len(_region_spans(gh, gw, spec)[0]), len(mirrored)
    outputs = ENCODERS[spec.encoder].outputs
    region = np.arange(n_rows * n_cols).reshape(n_rows, n_cols)[:, mirrored].reshape(-1)
    atom = (np.arange(k) + k // 2) % k
    # feature index = (region * outputs + output) * k + atom (``kmjax.pool``: region-major)
    perm = (region[:, None, None] * outputs + np.arange(outputs)[None, :, None]) * k + atom[None, None, :]
    return perm.reshape(-1)


def mirror_pairs(spec, k: int, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """(first, second): the F/2 pairs of features that the mirror swaps, first < second."""
    perm = feature_mirror_permutation(spec, k, image_shape)
    first = np.flatnonzero(np.arange(perm.size) < perm)
    return first, perm[first]


def pair_sums(features, pairs):
    """(..., F) -> (..., F/2): (x_a + x_b) / sqrt(2) over ``pairs`` = (first, second) (JAX or NumPy)."""
    first, second = pairs
    return (features[..., first] + features[..., second]) * np.float32(1 / np.sqrt(2))
