"""Figures for a run folder: dictionary filters, k-means objective, confusion matrix (shell).

Figures are built as ``matplotlib.figure.Figure`` objects and written straight to files: no pyplot,
no global backend change, so importing kmjax in a notebook leaves its plotting as it was.
"""

from __future__ import annotations

import math

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

__all__ = ["filter_grid", "save_filters", "save_objective", "save_confusion", "save_sweep"]


def filter_grid(centroids, size: int, channels: int = 3, pad: int = 1) -> np.ndarray:
    """Tile (K, size*size*C) centroids into one image, each filter rescaled to [0, 1].

    Returns an (rows*(size+pad)+pad, cols*(size+pad)+pad, C) float array in [0, 1], the
    background white; cols = ceil(sqrt(K)).
    """
    c = np.asarray(centroids, np.float64)
    k = c.shape[0]
    lo = c.min(axis=1, keepdims=True)
    span = c.max(axis=1, keepdims=True) - lo
    c = (c - lo) / np.where(span > 0, span, 1.0)  # a constant (e.g. zeroed) filter shows black
    tiles = c.reshape(k, size, size, channels)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    step = size + pad
    grid = np.ones((rows * step + pad, cols * step + pad, channels))
    for i in range(k):
        r, col = divmod(i, cols)
        grid[pad + r * step : pad + r * step + size, pad + col * step : pad + col * step + size] = tiles[i]
    return grid


def save_filters(path, centroids, size: int, channels: int = 3, title: str | None = None) -> None:
    """Write the dictionary as a grid of colour (or grey) filters."""
    grid = filter_grid(centroids, size, channels)
    side = min(12.0, max(3.0, grid.shape[0] / 12))
    fig = Figure(figsize=(side, side * grid.shape[0] / grid.shape[1]))
    ax = fig.subplots()
    ax.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray", interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def save_objective(path, objective) -> None:
    """Plot the k-means objective against the iteration."""
    obj = np.asarray(objective, np.float64)
    obj = obj[np.isfinite(obj)]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(np.arange(1, len(obj) + 1), obj, marker=".")
    ax.set_xlabel("iteration")
    ax.set_ylabel("sum of squared distances")
    ax.set_title("k-means objective")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def save_confusion(path, confusion, class_names) -> None:
    """Plot a (C, C) confusion matrix of counts (rows: true class, columns: predicted)."""
    m = np.asarray(confusion)
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > 0.5 * m[i].sum() else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def save_sweep(path, keys, rows) -> None:
    """Test accuracy against the first grid key, one line per combination of the other keys."""
    from kmjax.experiment.provenance import test_accuracy_of

    x_key, rest = keys[0], keys[1:]
    lines: dict = {}
    kinds = set()
    for r in rows:
        if (tested := test_accuracy_of(r)) is None:
            continue
        kinds.add(tested[0])
        label = ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in rest) or "test accuracy"
        lines.setdefault(label, []).append((r[x_key], 100 * tested[1]))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for pts in lines.values() for x, _ in pts)
    for label, pts in lines.items():
        xs, ys = zip(*pts) if numeric else zip(*[(str(x), y) for x, y in pts])
        ax.plot(xs, ys, marker="o", label=label)
    if numeric and len({x for pts in lines.values() for x, _ in pts}) > 2:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for pts in lines.values() for x, _ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(x_key)
    ax.set_ylabel("test accuracy (%)" + ("" if kinds <= {"full"} else f" ({' / '.join(sorted(kinds))} test set)"))
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
