"""Spatial pooling of a dense feature map: over a grid of regions, or over overlapping windows."""

from __future__ import annotations

import math

import jax.numpy as jnp

from kmjax._checks import choice, integer, positive_int
from kmjax.errors import InputError

__all__ = ["POOLS", "grid_edges", "window_starts", "num_regions", "region_spans", "pool", "fitting_windows",
           "check_fit"]

POOLS = {"sum": jnp.sum, "max": jnp.max}  # the vocabulary of pooling operations, defined once


def grid_edges(n: int, grid: int) -> list[int]:
    """Region boundaries along one axis of length n, as the authors' code splits it.

    MATLAB's round (halves away from zero), so a 27-long axis splits 14 / 13 for grid = 2.
    """
    return [int(math.floor(i * n / grid + 0.5)) for i in range(grid + 1)]


def fitting_windows(n: int, count: int = 3) -> tuple[int, int]:
    """(size, stride) of ``count`` overlapping windows that cover an n-long axis end to end, in Recht et
    al.'s proportion (15 / 6 on 27 positions: stride = 6 / 27 of the axis for 3 windows), so the
    last window ends on the last position (mirror-symmetric). 27 -> (15, 6), 91 -> (51, 20), the map
    of 96 x 96 images with 6 x 6 patches; fewer windows if the axis has fewer than ``count`` positions."""
    n = positive_int(n, "positions")
    count = min(positive_int(count, "windows"), n)
    stride = max(1, int(math.floor(n * 6 / (15 + 6 * (count - 1)) + 0.5)))
    return n - (count - 1) * stride, stride


def check_fit(h: int, w: int, grid: int = 2, size: int | None = None, stride: int | None = None, *,
              context: str = "", names: tuple = ("grid", "size", "stride")) -> None:
    """``InputError`` naming a choice that fits unless the regions of ``pool`` (same arguments) fit an
    h x w map of positions: a grid of at most min(h, w) regions per side, windows of at most
    min(h, w) positions. ``context`` (e.g. " (96x96 images, patch_size 6, stride 1)") follows the map
    in the message; ``names`` are the arguments' names as the caller spells them (FeatureSpec:
    grid, pool_size, pool_stride)."""
    fits = min(h, w)
    g, s, t = names
    if size is None:
        if grid > fits:
            raise InputError(f"a pooling {g} of {grid} regions per side is finer than the {h}x{w} map of positions"
                             f"{context}: use {g} <= {fits} (e.g. {g} = {min(2, fits)})")
    elif size > fits:
        a, b = fitting_windows(fits)
        rows, cols = len(window_starts(h, a, b)), len(window_starts(w, a, b))
        raise InputError(f"pooling windows of {s} = {size} positions do not fit the {h}x{w} map of positions"
                         f"{context}: use {s} <= {fits}, e.g. {s} = {a}, {t} = {b} ({rows} x {cols} overlapping "
                         "windows, as Recht et al.'s 15 / 6 on 27 positions)")


def _window_args(size, stride) -> tuple[int, int]:
    stride = size if stride is None else stride
    for name, v in (("size", size), ("stride", stride)):
        positive_int(v, f"pooling window {name}")
    return int(size), int(stride)


def window_starts(n: int, size: int, stride: int) -> list[int]:
    """First positions of the ``size``-long windows every ``stride`` positions along an n-long axis.

    Whole windows only (PyTorch's floor mode): 15 / 6 on 27 positions gives 0, 6, 12; positions
    after the last window (none there) are not pooled. ValueError if one window does not fit.
    """
    size, stride = _window_args(size, stride)
    if size > n:
        a, b = fitting_windows(n)
        raise InputError(f"pooling windows of {size} positions do not fit an axis of {n} positions: use a size of "
                         f"at most {n}, e.g. size = {a}, stride = {b} ({len(range(0, n - a + 1, b))} overlapping "
                         "windows)")
    return list(range(0, n - size + 1, stride))


def num_regions(h: int, w: int, grid: int = 2, size: int | None = None, stride: int | None = None) -> int:
    """Regions that ``pool`` pools an (N, h, w, F) map over, with the same arguments."""
    if size is None:
        return grid * grid
    return len(window_starts(h, size, stride)) * len(window_starts(w, size, stride))


def pool(feature_map, grid: int = 2, op: str = "sum", size: int | None = None, stride: int | None = None):
    """Pool an (N, H, W, F) map over a grid x grid partition of its positions, or over windows.

    Args:
      feature_map: (N, H, W, F).
      grid: regions per side; 2 gives the paper's four quadrants. Not used when ``size`` is given.
      op: "sum" (the paper) or "max".
      size: if given, pool square windows of size x size positions instead of the partition, their
        corners every ``stride`` positions along each axis (``window_starts``): overlapping when
        stride < size, as Recht et al.'s 15 / 6 on a 27 x 27 map (3 x 3 windows at 0, 6, 12).
      stride: the windows' step (default: ``size``, windows side by side); only with ``size``.

    Returns:
      (N, R * F) with R = ``num_regions(H, W, grid, size, stride)``, region-major: top-left,
      top-right, ..., bottom-right.
    """
    choice(op, POOLS, "pooling")
    _, h, w, _ = feature_map.shape
    row_spans, col_spans = region_spans(h, w, grid, size, stride)
    reduce = POOLS[op]
    # Each band of rows is reduced first, then each span of columns in the band: XLA fuses the
    # encoder's element-wise work into the band reductions, so the codes are never written out.
    # On a CPU that beats one product with a 0/1 matrix of regions and reducing each region on its
    # own (BENCHMARKS.md, "Hot loops on a CPU, second pass": python experiments/hot_loop_parts.py).
    bands = [reduce(feature_map[:, r0:r1], axis=1) for r0, r1 in row_spans]
    return jnp.concatenate([reduce(band[:, c0:c1], axis=1) for band in bands for c0, c1 in col_spans], axis=1)


def region_spans(h: int, w: int, grid: int = 2, size: int | None = None, stride: int | None = None):
    """(row spans, column spans) [(start, stop), ...] of the regions ``pool`` pools an h x w map
    over, with the same arguments; regions are every (row span, column span), row-major."""
    if size is None:
        if stride is not None:
            raise InputError(f"a pooling stride ({stride!r}) needs a window size: pass size= too")
        check_fit(h, w, integer(grid, f"grid (for a {h}x{w} map)", minimum=1))
        rows, cols = grid_edges(h, grid), grid_edges(w, grid)
        return list(zip(rows[:-1], rows[1:])), list(zip(cols[:-1], cols[1:]))
    size, stride = _window_args(size, stride)
    check_fit(h, w, grid, size, stride)
    return ([(r, r + size) for r in window_starts(h, size, stride)],
            [(c, c + size) for c in window_starts(w, size, stride)])
