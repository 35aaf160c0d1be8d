"""The held-out split of the training rows and the search for C on it (``fit_classifier``'s
model selection, shared by its host and device paths)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from kmjax._checks import host_only, number, positive_int
from kmjax.errors import InputError

__all__ = ["validation_split", "check_grid", "search_C"]


def validation_split(n_rows: int, key, *, val_fraction: float = 0.1, copies: int = 1):
    """(fit rows, held-out rows, held-out rows to score): sorted int indices into ``n_rows`` rows.

    With ``copies`` = 2, rows i and i + n (n = n_rows // 2) hold one image and its mirror: the
    split is by image, so that no image's mirror is fitted while the image itself is validated,
    and only the originals are scored. ``round(val_fraction * n)`` images (at least one) are held
    out, the first of ``jax.random.permutation(key, n)``.
    """
    host_only("validation_split", "jax.random.permutation", key)
    n_rows, copies = positive_int(n_rows, "n_rows"), positive_int(copies, "copies")
    if n_rows % copies:
        raise InputError(f"{n_rows} rows are not {copies} copies of the same images: copies must divide the rows")
    n = n_rows // copies
    number(val_fraction, "val_fraction", above=0, below=1)
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise InputError(f"holding out {n_val} of {n} images leaves none to fit; use more rows or a smaller "
                         "val_fraction")
    perm = np.asarray(jax.random.permutation(key, n))
    val, fit = (np.sort(np.concatenate([idx + j * n for j in range(copies)])) for idx in (perm[:n_val], perm[n_val:]))
    return fit, val, np.sort(perm[:n_val])


def check_grid(grid) -> list[float]:
    grid = list(() if grid is None else grid)
    for C in grid:
        number(C, f"every C of C_grid {grid!r}", above=0)
    return grid


def search_C(grid, score: Callable[[float], float], log: Callable[[str], None] | None = None):
    """(best C, {C: score(C)}) over ``grid``, each C as a float; ties go to the stronger
    regularization (the smaller C). ``log``: optional callable given one line per C."""
    grid = check_grid(grid)
    if not grid:
        raise InputError("search_C needs at least one C in the grid")
    scores = {}
    for C in grid:
        scores[float(C)] = score(float(C))
        if log is not None:
            log(f"  C = {C:g}: validation accuracy {scores[float(C)]:.4f}")
    return max(scores, key=lambda C: (scores[C], -C)), scores
