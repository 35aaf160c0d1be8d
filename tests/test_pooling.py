"""Tests for kmjax.pooling against a loop-based NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from kmjax.pooling import POOLS, grid_edges, num_regions, pool, window_starts


def matlab_round(v):
    """Round half away from zero (MATLAB's round), for v >= 0."""
    return int(np.floor(v + 0.5))


def pool_ref(fmap, grid, op):
    """Loop reference: region r = (row block, col block) in row-major order, each region's
    values reduced over its positions; output (N, grid*grid*F) region-major."""
    fmap = np.asarray(fmap, np.float64)
    n, h, w, f = fmap.shape
    re = [matlab_round(i * h / grid) for i in range(grid + 1)]
    ce = [matlab_round(i * w / grid) for i in range(grid + 1)]
    out = np.zeros((n, grid * grid * f))
    for b in range(n):
        r = 0
        for gi in range(grid):
            for gj in range(grid):
                for ch in range(f):
                    vals = [fmap[b, y, x, ch] for y in range(re[gi], re[gi + 1])
                            for x in range(ce[gj], ce[gj + 1])]
                    out[b, r * f + ch] = sum(vals) if op == "sum" else max(vals)
                r += 1
    return out


@pytest.mark.parametrize("op", POOLS)
@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("hw", [(5, 5), (6, 6), (7, 4)])
def test_pool_matches_reference(op, grid, hw):
    rng = np.random.default_rng(grid * 10 + hw[0])
    fmap = rng.normal(size=(2, hw[0], hw[1], 3)).astype(np.float32)
    got = np.asarray(pool(fmap, grid, op))
    assert got.shape == (2, grid * grid * 3)
    # float32 sums of at most 49 values ~N(0,1): rounding ~1e-6; max is exact
    np.testing.assert_allclose(got, pool_ref(fmap, grid, op), rtol=1e-5, atol=1e-5)


def test_grid_edges_values():
    assert grid_edges(27, 2) == [0, 14, 27]  # the paper's quadrants: 14 / 13
    assert grid_edges(5, 2) == [0, 3, 5]  # 2.5 rounds up (away from zero), not to even
    assert grid_edges(3, 2) == [0, 2, 3]  # 1.5 -> 2
    assert grid_edges(9, 2) == [0, 5, 9]  # 4.5 -> 5 (banker's rounding would give 4)
    assert grid_edges(6, 2) == [0, 3, 6]
    assert grid_edges(6, 4) == [0, 2, 3, 5, 6]  # 1.5 -> 2, 4.5 -> 5
    assert grid_edges(10, 3) == [0, 3, 7, 10]  # 3.33 -> 3, 6.67 -> 7
    assert grid_edges(4, 1) == [0, 4]
    assert grid_edges(4, 4) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,grid", [(n, g) for n in (1, 2, 5, 13, 27, 32) for g in (1, 2, 3, 4) if g <= n])
def test_grid_edges_partition(n, grid):
    e = grid_edges(n, grid)
    assert e[0] == 0 and e[-1] == n and len(e) == grid + 1
    sizes = np.diff(e)
    assert (sizes >= 1).all() and sizes.max() - sizes.min() <= 1


def test_quadrants_of_27x27_split_14_13():
    fmap = np.ones((1, 27, 27, 1), np.float32)
    # counts of positions per quadrant: exact integers
    np.testing.assert_array_equal(np.asarray(pool(fmap, 2, "sum"))[0], [14 * 14, 14 * 13, 13 * 14, 13 * 13])


def test_region_major_order():
    # 4x4 map, 2 channels; channel 0 = region index, channel 1 = -region index
    region = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], np.float32)
    fmap = np.stack([region, -region], axis=-1)[None]
    got = np.asarray(pool(fmap, 2, "max"))[0]
    # region-major: [r0c0, r0c1, r1c0, r1c1, ...] -> top-left, top-right, bottom-left, bottom-right
    np.testing.assert_array_equal(got, [0, 0, 1, -1, 2, -2, 3, -3])


def test_pool_unknown_op():
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(np.zeros((1, 4, 4, 1), np.float32), 2, "mean")


@pytest.mark.parametrize("grid", [0, -1, 5, 2.0])
def test_pool_bad_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        pool(np.zeros((1, 4, 6, 1), np.float32), grid, "sum")  # grid 5 > min(4, 6)


def pool_windows_ref(fmap, size, stride, op):
    """Loop reference for window pooling: windows with top-left corner (i, j) for every i, j in
    0, stride, 2 stride, ... whose size x size square lies inside the map, row-major over the
    corners; output (N, n_windows * F) region-major."""
    fmap = np.asarray(fmap, np.float64)
    n, h, w, f = fmap.shape
    corners = [(i, j) for i in range(0, h, stride) for j in range(0, w, stride) if i + size <= h and j + size <= w]
    out = np.zeros((n, len(corners) * f))
    for b in range(n):
        for r, (i, j) in enumerate(corners):
            for ch in range(f):
                vals = [fmap[b, y, x, ch] for y in range(i, i + size) for x in range(j, j + size)]
                out[b, r * f + ch] = sum(vals) if op == "sum" else max(vals)
    return out


@pytest.mark.parametrize("op", POOLS)
@pytest.mark.parametrize("hw,size,stride", [
    ((27, 27), 15, 6),  # Recht et al.: 3 x 3 overlapping windows at 0, 6, 12
    ((27, 27), 5, 3),  # 8 x 8 whole windows (the last position of each axis is in none)
    ((7, 4), 3, 2),  # 3 x 1 windows on a non-square map
    ((6, 6), 2, 3),  # stride > size: gaps between windows
    ((5, 5), 5, 1),  # one window, the whole map
    ((9, 6), 1, 1),  # every position alone
])
def test_pool_windows_match_reference(op, hw, size, stride):
    rng = np.random.default_rng(size * 10 + stride)
    fmap = rng.normal(size=(2, hw[0], hw[1], 3)).astype(np.float32)
    got = np.asarray(pool(fmap, 2, op, size=size, stride=stride))
    ref = pool_windows_ref(fmap, size, stride, op)
    assert got.shape == ref.shape == (2, num_regions(hw[0], hw[1], 2, size, stride) * 3)
    # float32 sums of at most 225 values ~N(0,1): rounding ~1e-5 at worst; max is exact
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_window_starts_and_counts():
    assert window_starts(27, 15, 6) == [0, 6, 12]
    assert window_starts(27, 5, 3) == [0, 3, 6, 9, 12, 15, 18, 21]  # whole windows only: 21 + 5 = 26 <= 27
    assert window_starts(27, 3, 3) == list(range(0, 27, 3))  # 9 windows side by side
    assert window_starts(5, 5, 2) == [0]
    assert num_regions(27, 27, 2, 15, 6) == 9
    assert num_regions(27, 27, 2) == 4  # the grid partition: grid * grid
    assert num_regions(27, 20, 7, 15, 6) == 3 * 1  # grid is not used with windows


def test_window_pooling_counts_positions():
    fmap = np.ones((1, 27, 27, 1), np.float32)
    # every 15 x 15 window of a map of ones sums to 225: exact integers
    np.testing.assert_array_equal(np.asarray(pool(fmap, size=15, stride=6))[0], [225.0] * 9)


def test_windows_side_by_side_equal_the_grid_partition():
    # size = stride = n / grid tiles the map exactly as the grid does: the same slices, the same bits
    fmap = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype(np.float32)
    for op in POOLS:
        np.testing.assert_array_equal(np.asarray(pool(fmap, 3, op)), np.asarray(pool(fmap, 1, op, size=2)))
        np.testing.assert_array_equal(np.asarray(pool(fmap, 2, op)), np.asarray(pool(fmap, 2, op, size=3, stride=3)))


def test_window_region_major_order():
    # 5x5 map, windows of 3 at stride 2: corners (0,0), (0,2), (2,0), (2,2). The map's four corner
    # positions each lie in one window only; marking them shows the order of the windows.
    fmap = np.zeros((1, 5, 5, 1), np.float32)
    for r, (y, x) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        fmap[0, y, x, 0] = r + 10
    got = np.asarray(pool(fmap, op="max", size=3, stride=2))[0]
    np.testing.assert_array_equal(got, [10, 11, 12, 13])


@pytest.mark.parametrize("size,stride,match", [
    (7, 1, "do not fit"),  # larger than the 4-row map
    (0, 1, "size must be a positive integer"),
    (2, 0, "stride must be a positive integer"),
    (2.0, 1, "size must be a positive integer"),
    (True, 1, "size must be a positive integer"),
    (None, 2, "needs a window size"),
])
def test_pool_bad_windows(size, stride, match):
    with pytest.raises(ValueError, match=match):
        pool(np.zeros((1, 4, 6, 1), np.float32), 2, "sum", size=size, stride=stride)


def test_window_stride_defaults_to_size():
    fmap = np.random.default_rng(1).normal(size=(1, 6, 6, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pool(fmap, size=3)), np.asarray(pool(fmap, size=3, stride=3)))
