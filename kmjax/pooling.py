"""Spatial pooling of a dense feature map over a grid of regions."""

from __future__ import annotations

import math

import jax.numpy as jnp

__all__ = ["POOLS", "grid_edges", "pool"]

POOLS = {"sum": jnp.sum, "max": jnp.max}  # the vocabulary of pooling operations, defined once


def grid_edges(n: int, grid: int) -> list[int]:
    """Region boundaries along one axis of length n, as the authors' code splits it.

    MATLAB's round (halves away from zero), so a 27-long axis splits 14 / 13 for grid = 2.
    """
    return [int(math.floor(i * n / grid + 0.5)) for i in range(grid + 1)]


def pool(feature_map, grid: int = 2, op: str = "sum"):
    """Pool an (N, H, W, F) map over a grid x grid partition of its positions.

    Args:
      feature_map: (N, H, W, F).
      grid: regions per side; 2 gives the paper's four quadrants.
      op: "sum" (the paper) or "max".

    Returns:
      (N, grid * grid * F), region-major: top-left, top-right, ..., bottom-right.
    """
    if op not in POOLS:
        raise ValueError(f"unknown pooling {op!r}; choose one of {tuple(POOLS)}")
    _, h, w, _ = feature_map.shape
    if not isinstance(grid, int) or grid < 1 or grid > min(h, w):
        raise ValueError(f"grid must be an integer from 1 to {min(h, w)} for a {h}x{w} map, got {grid!r}")
    reduce = POOLS[op]
    rows, cols = grid_edges(h, grid), grid_edges(w, grid)
    regions = [
        reduce(feature_map[:, r0:r1, c0:c1, :], axis=(1, 2))
        for r0, r1 in zip(rows[:-1], rows[1:])
        for c0, c1 in zip(cols[:-1], cols[1:])
    ]
    return jnp.concatenate(regions, axis=1)
