"""Tests for kmjax.pooling against a loop-based NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from kmjax.pooling import POOLS, grid_edges, pool


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
