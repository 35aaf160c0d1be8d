"""Ridge regression (one-vs-all least squares on +-1 targets) from streamed sufficient statistics.

The features never need to be in memory at once: ``gram_stats`` reads them in row blocks (a
``np.memmap`` works) and keeps only their F x F Gram matrix, ``accumulate_gram`` adds more rows
to such statistics (``stats = accumulate_gram(stats, ...)``, reusing their arrays), and
``fit_ridge`` solves from them, for any C, with the SVM's standardization and C scaling.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kmjax._checks import check_labels, host_only, number
from kmjax.errors import InputError

from kmjax.classify.linear import LinearModel, Standardizer
from kmjax.classify.tiled import add_gram, cholesky, cholesky_solve, mirror_tiles, row_tiles_matmul

__all__ = ["GramStats", "empty_gram_stats", "accumulate_gram", "gram_stats", "fit_ridge"]


class GramStats(NamedTuple):
    """Sufficient statistics of a least-squares fit over rows (x_i, y_i): float64 NumPy arrays, a
    pytree made by ``empty_gram_stats`` (or ``gram_stats``) and advanced by ``accumulate_gram``.

    count: () the number of rows. shift: (F,) subtracted from every x first (the mean of the first block read),
    so that the centred Gram matrix below does not lose its digits to large feature means.
    x_sum: (F,) sum of x - shift. gram: (F, F) sum of (x - shift)(x - shift)^T.
    cross: (F, C) sum of (x - shift) y^T. y_sum: (C,) sum of y. y: +1 for the true class, -1 else.
    """

    count: np.ndarray
    shift: np.ndarray
    x_sum: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    y_sum: np.ndarray


def empty_gram_stats(shift, num_classes: int) -> GramStats:
    """Statistics of no rows yet, for (F,) ``shift`` and ``num_classes`` classes."""
    shift = np.array(shift, np.float64)  # a copy: the statistics own every array
    if shift.ndim != 1:
        raise InputError(f"shift must be (F,), got shape {shift.shape}")
    f = shift.shape[0]
    return GramStats(np.zeros(()), shift, np.zeros(f), np.zeros((f, f)), np.zeros((f, num_classes)),
                     np.zeros(num_classes))


def _rows(features, labels, num_classes: int, rows):
    """The rows to read, sorted (so that contiguous runs are read as slices), after the checks."""
    n = np.shape(features)[0]
    rows = np.arange(n) if rows is None else np.sort(np.asarray(rows, np.int64))
    if rows.size == 0:
        raise InputError("gram_stats got no rows")
    if rows[0] < 0 or rows[-1] >= n:
        raise InputError(f"rows must be indices in [0, {n}), got {rows[0]}..{rows[-1]}")
    if np.any(rows[1:] == rows[:-1]):
        raise InputError("rows must be distinct: a repeated row would be read as its neighbour")
    check_labels(labels, n, num_classes, rows)
    return rows


def _read(features, idx):
    """Rows ``idx`` (sorted) of the features as a float32 copy: a slice when they are contiguous."""
    # a copy (np.array): the block is shifted in place, and a slice of an in-memory array is a view
    return np.array(features[idx[0] : idx[-1] + 1] if idx[-1] - idx[0] + 1 == idx.size else features[idx],
                    np.float32)


def accumulate_gram(stats: GramStats, features, labels, *, rows=None, block: int = 8192,
                    progress=None) -> GramStats:
    """The statistics of ``stats``' rows and rows of (N, F) features, added ``block`` rows at a time.

    ``stats`` is consumed: its arrays are reused for the result (no F x F copy is made: 8 GB in
    float64 at F = 32,000), so use the returned statistics, never ``stats`` again. They hold the
    same numbers as one pass over all the rows they have seen.

    Args:
      stats: from ``gram_stats``, ``empty_gram_stats`` or an earlier call; its shift is subtracted
        from these rows. Its arrays must be writeable float64 NumPy arrays.
      features: (N, F) array-like; a ``np.memmap`` is read block by block, never whole.
      labels: (N,) int class indices in [0, C), C the classes of ``stats``.
      rows: optional distinct indices of the rows to add (e.g. a training split), in any order.
      block: rows per product (8192: 1 GB of float32 at 32,000 features; larger blocks amortize the
        float64 accumulation). Each block's products are float32 (BLAS ``syrk``; on an accelerator,
        on the device: ``kmjax.classify.tiled``), summed in float64.
      progress: optional ``progress(done, total, None)`` after each block (rows done).
    """
    host_only("accumulate_gram", "nothing: the ridge statistics are accumulated on the host in float64: fit outside jit, or train_linear inside it", features, labels)
    f, num_classes = stats.cross.shape
    if np.ndim(features) != 2 or np.shape(features)[1] != f:
        raise InputError(f"`stats` holds statistics of {f} features and {num_classes} classes, these rows have "
                         f"shape {np.shape(features)}")
    if (not all(isinstance(a, np.ndarray) and a.dtype == np.float64 and a.flags.writeable for a in stats[1:])
            or np.shape(stats.count) != ()):
        raise InputError("`stats` must hold writeable float64 NumPy arrays (and a count), to be reused for the "
                         "result; make them with gram_stats or empty_gram_stats")
    labels = np.asarray(labels)
    return _add_rows(stats, features, labels, _rows(features, labels, num_classes, rows), block, progress)


def _add_rows(stats: GramStats, features, labels, rows, block, progress) -> GramStats:
    """``accumulate_gram`` on checked, sorted rows."""
    eye = np.eye(stats.cross.shape[1], dtype=np.float32)
    count = np.float64(stats.count)
    for start in range(0, rows.size, block):
        idx = rows[start : start + block]
        x = _read(features, idx)
        x -= stats.shift.astype(np.float32)
        y = 2.0 * eye[labels[idx]] - 1.0
        add_gram(stats.gram, x)
        sums = ((stats.cross, x.T @ y), (stats.x_sum, x.sum(axis=0, dtype=np.float64)),
                (stats.y_sum, y.sum(axis=0, dtype=np.float64)))
        for total, part in sums:
            total += part  # in place: the arrays of ``stats``, consumed
        count += idx.size
        if progress is not None:
            progress(min(start + block, rows.size), rows.size, None)
    mirror_tiles(stats.gram)
    return stats._replace(count=np.asarray(count))


def gram_stats(features, labels, num_classes: int, *, rows=None, shift=None, block: int = 8192,
               progress=None) -> GramStats:
    """``GramStats`` of rows of (N, F) features: ``accumulate_gram`` into ``empty_gram_stats``.

    Args:
      features, labels, rows, block, progress: as for ``accumulate_gram``.
      num_classes: labels lie in [0, num_classes).
      shift: (F,) to subtract first; default the mean of the first block of rows (read once more,
        to make the empty statistics).
    """
    host_only("gram_stats", "nothing: the ridge statistics are accumulated on the host in float64: fit outside jit, or train_linear inside it", features, labels)
    labels = np.asarray(labels)
    if np.ndim(features) != 2:
        raise InputError(f"features must be (N, F), got shape {np.shape(features)}")
    sorted_rows = _rows(features, labels, num_classes, rows)
    if shift is not None and np.shape(shift) != np.shape(features)[1:]:
        raise InputError(f"shift must be (F,) = {np.shape(features)[1:]}, got shape {np.shape(shift)}")
    if shift is None:
        shift = _read(features, sorted_rows[:block]).mean(axis=0, dtype=np.float64)
    return _add_rows(empty_gram_stats(shift, num_classes), features, labels, sorted_rows, block, progress)


def fit_ridge(stats: GramStats, C: float, eps: float = 0.01, refine: int = 3) -> tuple[Standardizer, LinearModel]:
    """One-vs-all ridge regression on standardized features, from their ``GramStats``.

    Minimizes 1/2 ||W||^2 + C * mean_i sum_k (y_ik - z_i.w_k - b_k)^2 over the standardized
    features z = (x - mean) / sqrt(var + eps) (the SVM's standardization and C scaling; the bias b
    is not regularized), i.e. solves A W = Z^T (Y - mean(Y)) with A = Z^T Z + n / (2C) I.

    A is factored by a float32 Cholesky decomposition (a third of the work of a float64 LU solve,
    half its memory; by tiles, see ``cholesky``), and the solution is polished by ``refine``
    steps of iterative refinement whose residuals are computed in float64 from the statistics
    themselves, which brings it to float64 accuracy while A's condition number times float32's
    rounding (6e-8) is well below 1 (C up to ~1e4 on standardized pooled features).
    Memory: the statistics' F x F float64 matrix plus one F x F float32 one.

    Returns:
      (Standardizer, LinearModel) usable exactly like those of the L-BFGS classifiers.
    """
    host_only("fit_ridge", "nothing: the ridge statistics are accumulated on the host in float64: fit outside jit, or train_linear inside it", C, *stats)
    C = number(C, "C", above=0)
    # a Python float: with a NumPy float64 scalar, ``a[diag] += lam`` below would add in float64
    # instead of float32 (NumPy 2's promotion), which can round differently
    n = float(stats.count)
    if n < 2:
        raise InputError(f"fit_ridge needs statistics of at least 2 rows, got {n:g}")
    m = stats.x_sum / n  # mean of x - shift
    scale = np.sqrt(np.maximum(np.diag(stats.gram) - n * m * m, 0.0) / (n - 1) + eps)
    lam = n / (2.0 * C)
    # A in float32, centred and scaled by row blocks: no F x F float64 temporaries
    f = m.shape[0]
    a = np.empty((f, f), np.float32)
    for i in range(0, f, 1024):
        rows = slice(i, i + 1024)
        a[rows] = (stats.gram[rows] - n * np.outer(m[rows], m)) / np.outer(scale[rows], scale)
    a[np.diag_indices_from(a)] += lam
    factor = cholesky(a)

    def solve(r):
        return cholesky_solve(factor, r).astype(np.float64)

    def product(w):  # A @ w in float64, from the uncentred Gram matrix: Z^T Z w = D^-1 (G - n m m^T) D^-1 w
        v = w / scale[:, None]
        return (row_tiles_matmul(stats.gram, v) - n * np.outer(m, m @ v)) / scale[:, None] + lam * w

    rhs = (stats.cross - np.outer(m, stats.y_sum)) / scale[:, None]
    w = solve(rhs)
    for _ in range(refine):
        w += solve(rhs - product(w))
    if not np.all(np.isfinite(w)):
        raise InputError(f"the ridge system at C = {C:g} is too ill-conditioned for a float32 factorization; "
                         "use a smaller C (stronger regularization)")
    weights = np.vstack([w, stats.y_sum[None, :] / n])  # centred z: the bias is the mean target
    std = Standardizer(jnp.asarray(stats.shift + m, jnp.float32), jnp.asarray(scale, jnp.float32))
    return std, LinearModel(jnp.asarray(weights, jnp.float32))
