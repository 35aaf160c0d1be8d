"""Ridge in the dual, for features that outnumber the rows: the N x N kernel instead of the F x F
Gram matrix.

The objective is ``fit_ridge``'s: 1/2 ||W||^2 + C mean_i sum_k (y_ik - z_i.w_k - b_k)^2 over the
standardized features z = (x - mean) / sqrt(var + eps) (the bias not regularized). With the fitted
rows' features Z_F centred on their mean, Z_c = Z_F - 1 m_F^T, and centred targets Y_c, the
solution is W = Z_c^T alpha with

    (Z_c Z_c^T + lam I) alpha = Y_c,   lam = n / (2C),   b = mean(Y) - m_F^T W,

(push-through identity: (Z^T Z + lam I)^-1 Z^T = Z^T (Z Z^T + lam I)^-1). Z_c Z_c^T = H K H is the
kernel K = Z Z^T centred on the fitted rows (H = I - 1 1^T / n), computed from K by row and column
means, so one kernel serves every subset of its rows: the C search fits on some rows and scores
others (their cross-kernel, centred the same way), the final fit takes all.

Costs, N rows and F features: the kernel is N x N float32 (10 GB at N = 50,000), accumulated over
blocks of columns of the features (``accumulate_kernel``: N^2 F multiply-adds, the features read
once; F never limits memory); each C is one float32 Cholesky factorization of the fitted rows'
block (n^3 / 3) polished by iterative refinement against the float32 kernel in float64, and the
primal weights W = Z_c^T alpha are one more pass over the features (``primal_model``), so the
result is an ordinary ``(Standardizer, LinearModel)``.

Standardization: the kernel's features are standardized by the mean and scale of all the rows
given to ``accumulate_kernel`` (the runner: every training image), which the final fit on all
rows uses anyway; a C search on a subset of them then shares that scale (an unsupervised statistic
of the held-out images' features; their labels are never used), where the primal solver would
rescale to the subset. Precision: products and the kernel are float32 (relative rounding ~1e-7 of
entries of size ~F), sums of the statistics float64, and the refinement makes each solve exact for
that float32 kernel; ``tests/test_dual.py`` checks the final model against the primal solver.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kmjax._checks import host_only, number
from kmjax.errors import InputError
from kmjax.classify.linear import LinearModel, Standardizer
from kmjax.classify.tiled import add_gram, cholesky, cholesky_solve, mirror_tiles

__all__ = ["KernelStats", "empty_kernel_stats", "accumulate_kernel", "kernel_memory", "DualFit", "fit_dual",
           "dual_scores", "primal_model"]

_COLUMNS = 4096  # feature columns per block: 0.8 GB of float32 at N = 50,000
_TILE_ROWS = 512  # kernel rows per float64 product (185 MB at N = 45,000)


class KernelStats(NamedTuple):
    """The dual solver's state as it grows over column blocks: a pytree of host arrays made by
    ``empty_kernel_stats`` and advanced by ``accumulate_kernel`` (the caller persists it).

    columns: () int64, the features read so far (columns [0, columns)). mean, scale: (F,) float64,
    the standardization of each feature read (over the kernel's rows). kernel: (N, N) float32,
    sum over the columns read of z_i z_j.
    """

    columns: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    kernel: np.ndarray


def kernel_memory(n_rows: int) -> int:
    """Bytes of the kernel of ``n_rows`` rows, and as much again for a factorization."""
    return 2 * 4 * n_rows * n_rows


def empty_kernel_stats(n_rows: int, n_features: int) -> KernelStats:
    """Statistics of no columns yet, for ``n_rows`` rows of ``n_features`` features."""
    return KernelStats(np.zeros((), np.int64), np.zeros(n_features), np.ones(n_features),
                       np.zeros((n_rows, n_rows), np.float32))


def accumulate_kernel(stats: KernelStats, features, *, rows=None, until: int | None = None, eps: float = 0.01,
                      block: int = _COLUMNS, progress=None) -> KernelStats:
    """The statistics of ``stats`` with the columns [stats.columns, until) of (N_all, F) features added.

    ``stats`` is consumed: its arrays are written in place and reused for the result (a 10 GB
    kernel is never copied), so use the returned statistics, never ``stats`` again.

    Each block of ``block`` columns is read once (a ``np.memmap`` works: only those columns of the
    rows are read), its mean and scale sqrt(var + eps) taken over ``rows`` in float64 (the
    unbiased variance, as ``fit_standardizer``), and z z^T of the standardized block added to the
    kernel (float32 products by tiles, ``kmjax.classify.tiled``).

    Args:
      stats: from ``empty_kernel_stats`` (N = len(rows)) or an earlier call; writeable arrays.
      features: (N_all, F) array-like.
      rows: sorted distinct indices of the kernel's rows (default: all N_all rows).
      until: stop after this column (default: F); the caller can persist the statistics between calls.
      progress: optional ``progress(columns done, F, None)`` after each block.
    """
    host_only("accumulate_kernel", "nothing: the kernel is accumulated on the host", features)
    n_all, f = np.shape(features)
    rows = np.arange(n_all) if rows is None else np.asarray(rows, np.int64)
    if stats.kernel.shape != (rows.size, rows.size) or stats.mean.shape != (f,):
        raise InputError(f"`stats` holds a {stats.kernel.shape[0]}-row kernel of {stats.mean.shape[0]} features; "
                         f"these are {rows.size} rows of {f} features")
    until = f if until is None else min(int(until), f)
    contiguous = rows.size == 0 or rows[-1] - rows[0] + 1 == rows.size
    columns = int(stats.columns)
    for start in range(columns, until, block):
        stop = min(start + block, until)
        part = features[:, start:stop]
        x = np.asarray(part[rows[0] : rows[-1] + 1] if contiguous else part[rows], np.float64)
        mean = x.mean(axis=0)
        x -= mean
        scale = np.sqrt(np.square(x).sum(axis=0) / (rows.size - 1) + eps)
        z = (x / scale).astype(np.float32)
        del x
        add_gram(stats.kernel, np.ascontiguousarray(z.T))
        stats.mean[start:stop], stats.scale[start:stop] = mean, scale
        columns = stop
        if progress is not None:
            progress(stop, f, None)
    mirror_tiles(stats.kernel)
    return stats._replace(columns=np.asarray(columns, np.int64))


class DualFit(NamedTuple):
    """A dual solution: rows (sorted positions in the kernel) fitted, alpha (n, classes) float64,
    y_mean (classes,), and the kernel rows' mean over the fitted rows (the centring)."""

    rows: np.ndarray
    alpha: np.ndarray
    y_mean: np.ndarray
    row_mean: np.ndarray  # (N,): mean over the fitted rows of K[i, fitted] for every kernel row i
    grand_mean: float


def _centred(kernel, rows, cols, fit: DualFit):
    """float64 block of the kernel centred on the fitted rows: K[rows][:, cols] - mean terms."""
    block = np.asarray(kernel[np.ix_(rows, cols)], np.float64)
    return block - fit.row_mean[rows, None] - fit.row_mean[None, cols] + fit.grand_mean


def fit_dual(stats: KernelStats, labels, C: float, *, num_classes: int, rows=None, refine: int = 3) -> DualFit:
    """Ridge at ``C`` on ``rows`` of the kernel (positions 0..N-1; default all), by a float32
    Cholesky factorization of their centred kernel block plus ``lam`` = n / (2C), and ``refine``
    steps of iterative refinement whose residuals are float64 products with the float32 kernel.

    Memory: the n x n float32 block, factored in place (beside the kernel itself).
    labels: (N,) class indices of the kernel's rows.
    """
    host_only("fit_dual", "nothing: the dual ridge is solved on the host", C)
    C = number(C, "C", above=0)
    kernel = stats.kernel
    n_all = kernel.shape[0]
    rows = np.arange(n_all) if rows is None else np.sort(np.asarray(rows, np.int64))
    labels = np.asarray(labels)
    if labels.shape != (n_all,):
        raise InputError(f"labels must have one entry per kernel row ({n_all}), got shape {labels.shape}")
    n = rows.size
    if n < 2:
        raise InputError(f"fit_dual needs at least 2 rows, got {n}")
    y = 2.0 * np.eye(num_classes)[labels[rows]] - 1.0
    y_mean = y.mean(axis=0)
    row_mean = np.zeros(n_all)
    for i in range(0, n_all, _TILE_ROWS):
        row_mean[i : i + _TILE_ROWS] = kernel[i : i + _TILE_ROWS][:, rows].mean(axis=1, dtype=np.float64)
    fit = DualFit(rows, np.zeros((n, num_classes)), y_mean, row_mean, float(row_mean[rows].mean()))
    lam = n / (2.0 * C)
    a = np.empty((n, n), np.float32)
    for i in range(0, n, _TILE_ROWS):
        a[i : i + _TILE_ROWS] = _centred(kernel, rows[i : i + _TILE_ROWS], rows, fit)
    a[np.diag_indices_from(a)] += np.float32(lam)
    factor = cholesky(a)

    def product(alpha):  # (K_c + lam I) alpha in float64, by row tiles of the float32 kernel
        out = np.empty_like(alpha)
        for i in range(0, n, _TILE_ROWS):
            out[i : i + _TILE_ROWS] = _centred(kernel, rows[i : i + _TILE_ROWS], rows, fit) @ alpha
        return out + lam * alpha

    target = y - y_mean
    alpha = cholesky_solve(factor, target).astype(np.float64)
    for _ in range(refine):
        alpha += cholesky_solve(factor, target - product(alpha)).astype(np.float64)
    if not np.all(np.isfinite(alpha)):
        raise InputError(f"the dual ridge system at C = {C:g} is too ill-conditioned for a float32 factorization; "
                         "use a smaller C (stronger regularization)")
    return fit._replace(alpha=alpha)


def dual_scores(stats: KernelStats, fit: DualFit, rows) -> np.ndarray:
    """(len(rows), classes) scores of kernel rows ``rows`` (e.g. held-out ones) under ``fit``."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((rows.size, fit.alpha.shape[1]))
    for i in range(0, rows.size, _TILE_ROWS):
        out[i : i + _TILE_ROWS] = _centred(stats.kernel, rows[i : i + _TILE_ROWS], fit.rows, fit) @ fit.alpha
    return out + fit.y_mean


def primal_model(stats: KernelStats, fit: DualFit, features, *, rows=None,
                 block: int = _COLUMNS) -> tuple[Standardizer, LinearModel]:
    """The (Standardizer, LinearModel) of a dual fit: W = Z_c^T alpha, one pass over the columns.

    features, rows: as given to ``accumulate_kernel`` (``fit.rows`` index into ``rows``).
    """
    host_only("primal_model", "nothing: the weights are formed on the host", features)
    n_all, f = np.shape(features)
    rows = np.arange(n_all) if rows is None else np.asarray(rows, np.int64)
    fitted = rows[fit.rows]
    if int(stats.columns) != f:
        raise InputError(f"the kernel holds {int(stats.columns)} of the {f} features: accumulate them all first")
    weights = np.empty((f + 1, fit.alpha.shape[1]))
    bias = fit.y_mean.copy()
    alpha_sum = fit.alpha.sum(axis=0)  # zero in exact arithmetic (1^T H = 0)
    for start in range(0, f, block):
        stop = min(start + block, f)
        z = (np.asarray(features[:, start:stop][fitted], np.float64) - stats.mean[start:stop]) / stats.scale[start:stop]
        m = z.mean(axis=0)
        w = z.T @ fit.alpha - np.outer(m, alpha_sum)  # Z_c^T alpha, Z_c = Z - 1 m^T
        weights[start:stop] = w
        bias -= m @ w
    weights[f] = bias
    return (Standardizer(jnp.asarray(stats.mean, jnp.float32), jnp.asarray(stats.scale, jnp.float32)),
            LinearModel(jnp.asarray(weights, jnp.float32)))
