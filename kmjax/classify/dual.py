"""Ridge in the dual, for features that outnumber the rows: the N x N kernel instead of the F x F
Gram matrix.

The objective is ``fit_ridge``'s: 1/2 ||W||^2 + C mean_i sum_k (y_ik - z_i.w_k - b_k)^2 over the
standardized features z = (x - mean) / sqrt(var + eps) (the bias not regularized). With the fitted
rows' features Z_F centred on their mean, Z_c = Z_F - 1 m_F^T, and centred targets Y_c, the
solution is W = Z_c^T alpha with

    (Z_c Z_c^T + lam I) alpha = Y_c,   lam = n / (2C),   b = mean(Y) - m_F^T W,

(push-through identity: (Z^T Z + lam I)^-1 Z^T = Z^T (Z Z^T + lam I)^-1). Z_c Z_c^T is the kernel
K = Z Z^T centred on the fitted rows; rather than centring it, ``fit_dual`` solves the equivalent
saddle-point system of the uncentred kernel (the bias as a Lagrange multiplier of 1^T alpha = 0),
so that one kernel, uncopied, serves every subset of its rows: the C search fits on some rows and
scores others (their cross-kernel), the final fit takes all.

Costs, N rows and F features: the kernel is N x N float32 (10 GB at N = 50,000), accumulated over
blocks of columns of the features (``accumulate_kernel``: N^2 F multiply-adds, the features read
once; F never limits memory). One float32 Cholesky factorization (N^3 / 3, ``factor_dual``) of the
kernel shifted for one C, its rows ordered [fitted, held out], preconditions the conjugate-gradient
solves of every C of a grid and of the final fit (a few steps each, every step one float64 product
with the float32 kernel and two triangular solves: N^2 work where a factorization is N^3 / 3); the
primal weights W = Z^T alpha are one more pass over the features (``primal_model``), so the
result is an ordinary ``(Standardizer, LinearModel)``.

Standardization: the kernel's features are standardized by the mean and scale of all the rows
given to ``accumulate_kernel`` (the runner: every training image), which the final fit on all
rows uses anyway; a C search on a subset of them then shares that scale (an unsupervised statistic
of the held-out images' features; their labels are never used), where the primal solver would
rescale to the subset. Precision: products and the kernel are float32 (relative rounding ~1e-7 of
entries of size ~F), sums of the statistics float64, and each solve is carried in float64 to a
relative residual of 1e-7 against that float32 kernel; ``tests/test_dual.py`` checks the final model against the primal solver.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kmjax._checks import host_only, number
from kmjax.errors import InputError
from kmjax.classify.linear import LinearModel, Standardizer
from kmjax.classify.tiled import add_gram, block_inverses, cholesky, cholesky_solve, mirror_tiles

__all__ = ["KernelStats", "empty_kernel_stats", "accumulate_kernel", "kernel_memory", "DualFactor", "factor_dual", "DualFit", "fit_dual",
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


class DualFactor(NamedTuple):
    """The Cholesky factor of one shifted kernel block, shared by the solves at every C (see
    ``factor_dual``). rows: kernel rows in the factor's order; lam: the shift; factor: (n, n) float32,
    lower triangle, of K[rows][:, rows] + lam I."""

    rows: np.ndarray
    lam: float
    factor: np.ndarray


class DualFit(NamedTuple):
    """A dual solution: rows (positions in the kernel) fitted, in the order of alpha (n, classes)
    float64 (summing to zero over the rows), bias (classes,); iterations: those of the solve."""

    rows: np.ndarray
    alpha: np.ndarray
    bias: np.ndarray
    iterations: int


def _kernel_rows(kernel, rows, cols):
    """float64 block K[rows][:, cols] (``rows`` a short run of positions; a memmap reads only them)."""
    return np.asarray(kernel[rows][:, cols], np.float64)


def factor_dual(stats: KernelStats, lam: float, rows=None) -> DualFactor:
    """The float32 Cholesky factor of K[rows][:, rows] + lam I (default all rows, in order), by the
    tiled factorization of ``tiled``: n^3 / 3 multiply-adds, the one expensive step of a C search.

    Every leading block of a Cholesky factor is the factor of the matrix's leading block, so a
    factor over the rows ordered [fitted rows, held-out rows] serves both a C search on the fitted
    rows and the final fit on all of them; and it preconditions the solves at every other shift
    (``fit_dual``): one factorization per grid, not one per C.
    """
    host_only("factor_dual", "nothing: the dual ridge is solved on the host", lam)
    lam = number(lam, "lam", above=0)
    kernel = stats.kernel
    rows = np.arange(kernel.shape[0]) if rows is None else np.asarray(rows, np.int64)
    if rows.size < 2 or np.unique(rows).size != rows.size or rows.min() < 0 or rows.max() >= kernel.shape[0]:
        raise InputError(f"rows must be at least 2 distinct positions in [0, {kernel.shape[0]}) of the kernel")
    a = np.empty((rows.size, rows.size), np.float32)
    for i in range(0, rows.size, _TILE_ROWS):
        a[i : i + _TILE_ROWS] = kernel[rows[i : i + _TILE_ROWS]][:, rows]
    a[np.diag_indices_from(a)] += np.float32(lam)
    return DualFactor(rows, float(lam), cholesky(a))


def _pcg(matvec, precondition, b, tol: float, max_iter: int):
    """Conjugate gradients on A x = b for each column of b (n, r), preconditioned: (x, iterations,
    the largest relative residual). The preconditioner is a float32 solve, linear only to its
    rounding, so the direction update is the flexible (Polak-Ribiere) one, r.(z - z_old) / rz_old,
    which keeps converging where the classic r.z / rz_old can stall; a column already solved
    exactly takes no further step."""
    x = precondition(b)
    r = b - matvec(x)
    z = precondition(r)
    p, rz = z, np.sum(r * z, axis=0)
    norm_b = np.linalg.norm(b, axis=0)
    for it in range(max_iter + 1):
        worst = float(np.max(np.linalg.norm(r, axis=0) / norm_b))
        if worst <= tol or it == max_iter:
            return x, it, worst
        q = matvec(p)
        pq = np.sum(p * q, axis=0)
        step = np.divide(rz, pq, out=np.zeros_like(rz), where=pq > 0)
        x += step * p
        r -= step * q
        z, z_old = precondition(r), z
        rz, rz_old = np.sum(r * z, axis=0), rz
        p = z + np.divide(np.sum(r * (z - z_old), axis=0), rz_old, out=np.zeros_like(rz), where=rz_old > 0) * p


def fit_dual(stats: KernelStats, labels, C: float, *, num_classes: int, rows=None, factor: DualFactor | None = None,
             tol: float = 1e-7, max_iter: int = 100) -> DualFit:
    """Ridge at ``C`` on ``rows`` of the kernel (positions 0..N-1; default all): the bias,
    unregularized, by the saddle point of the uncentred kernel system (no centred copy of the
    kernel): alpha = U - s b^T with (K_ff + lam I) [U, s] = [Y, 1], lam = n / (2C), and b = 1^T U /
    1^T s, so that 1^T alpha = 0 (the same solution as centring the kernel on the fitted rows).

    The system is solved by conjugate gradients with float64 vectors and products with the float32
    kernel, preconditioned by ``factor`` (``factor_dual``; default: one made here at this lam), whose
    leading rows must be these rows (in any order): at the factor's own shift the first step is the
    direct solve, and each further step refines it; at another shift lam' the preconditioned
    system's condition number is at most max(lam, lam') / min(lam, lam'), so a grid is solved with
    one factorization. ``tol``: the relative residual to reach, in at most ``max_iter`` steps.

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
    lam = n / (2.0 * C)
    factor = factor_dual(stats, lam, rows) if factor is None else factor
    order = factor.rows[:n]
    if factor.rows.size < n or not np.array_equal(np.sort(order), rows):
        raise InputError("the factor's leading rows must be the rows fitted: make it with factor_dual over "
                         "[these rows, any others]")
    lower = factor.factor[:n, :n]
    inverses = block_inverses(lower)  # (its diagonal blocks': a few seconds once, for every step's two solves)

    def matvec(v):  # (K_ff + lam I) v in float64, by contiguous row tiles of the float32 kernel (v scattered
        # to the kernel's own order, zero off the fitted rows: whole rows read in order, not gathered)
        spread = np.zeros((n_all, v.shape[1]))
        spread[order] = v
        out = np.empty_like(spread)
        for i in range(0, n_all, _TILE_ROWS):
            out[i : i + _TILE_ROWS] = np.asarray(kernel[i : i + _TILE_ROWS], np.float64) @ spread
        return out[order] + lam * v

    y = 2.0 * np.eye(num_classes)[labels[order]] - 1.0
    solved, iterations, residual = _pcg(matvec, lambda r: cholesky_solve(lower, r, inverses=inverses).astype(np.float64),
                                        np.hstack([y, np.ones((n, 1))]), tol, max_iter)
    if (not np.all(np.isfinite(solved)) or residual > tol) and factor.lam != lam:
        # a factor at another C that preconditions this one too poorly: this C's own factorization instead
        return fit_dual(stats, labels, C, num_classes=num_classes, rows=rows, tol=tol, max_iter=max_iter)
    if not np.all(np.isfinite(solved)) or residual > tol:
        raise InputError(f"the dual ridge system at C = {C:g} did not converge ({iterations} steps, relative "
                         f"residual {residual:.1e}): use a smaller C (stronger regularization), or a factor "
                         "nearer this C")
    u, s = solved[:, :-1], solved[:, -1]
    bias = u.sum(axis=0) / s.sum()
    return DualFit(order, u - np.outer(s, bias), bias, iterations)


def dual_scores(stats: KernelStats, fit: DualFit, rows) -> np.ndarray:
    """(len(rows), classes) scores of kernel rows ``rows`` (e.g. held-out ones) under ``fit``."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((rows.size, fit.alpha.shape[1]))
    for i in range(0, rows.size, _TILE_ROWS):
        out[i : i + _TILE_ROWS] = _kernel_rows(stats.kernel, rows[i : i + _TILE_ROWS], fit.rows) @ fit.alpha
    return out + fit.bias


def primal_model(stats: KernelStats, fit: DualFit, features, *, rows=None,
                 block: int = _COLUMNS) -> tuple[Standardizer, LinearModel]:
    """The (Standardizer, LinearModel) of a dual fit: W = Z_f^T alpha (the fitted rows' standardized
    features; alpha sums to zero, so their mean drops out), one pass over the columns.

    features, rows: as given to ``accumulate_kernel`` (``fit.rows`` index into ``rows``).
    """
    host_only("primal_model", "nothing: the weights are formed on the host", features)
    n_all, f = np.shape(features)
    rows = np.arange(n_all) if rows is None else np.asarray(rows, np.int64)
    fitted = rows[fit.rows]
    if int(stats.columns) != f:
        raise InputError(f"the kernel holds {int(stats.columns)} of the {f} features: accumulate them all first")
    weights = np.empty((f + 1, fit.alpha.shape[1]))
    for start in range(0, f, block):
        stop = min(start + block, f)
        z = (np.asarray(features[:, start:stop][fitted], np.float64) - stats.mean[start:stop]) / stats.scale[start:stop]
        weights[start:stop] = z.T @ fit.alpha
    weights[f] = fit.bias
    return (Standardizer(jnp.asarray(stats.mean, jnp.float32), jnp.asarray(stats.scale, jnp.float32)),
            LinearModel(jnp.asarray(weights, jnp.float32)))
