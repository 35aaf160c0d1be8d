"""Ridge regression for features too wide for an F x F Gram matrix: conjugate gradients over row
blocks read from disk, with a randomized Nystrom preconditioner.

The exact solver (``ridge.fit_ridge``) keeps the F x F Gram matrix: 8 GB in float64 at
F = 32,000, out of reach at F = 100,000 and beyond. Here the same objective (one-vs-all least
squares on +-1 targets, the SVM's standardization and C scaling) is reached through its normal
equations (Z^T Z + lam I) W = Z^T (Y - mean Y), lam = n / (2C), Z the standardized features, by
conjugate gradients: one iteration per pass over the (N, F) features (a ``np.memmap``), read in
contiguous row blocks, Z^T (Z P) accumulated block by block. Pooled features are strongly
correlated (the same atoms in neighbouring regions), so plain CG needs hundreds of passes; a
rank-r Nystrom approximation of Z^T Z (Frangella, Tropp and Udell, 2023: one sketch Z^T Z Omega of
r random directions, two passes) removes the top of the spectrum (docs/results.md gives the
passes it needed on real features). Memory: one row block plus F x r floats.

When to use it: when both the F x F Gram matrix (``ridge``) and the N x N kernel (``dual``) are
too large for memory, e.g. explicit mirrored rows (N = 100,000: a 40 GB kernel) at 72,000
features. It needs no tuning and converges to the ridge solution (the residual is reported), but
costs one pass over the features per iteration; wherever one of the exact solvers fits, it is
cheaper.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kmjax._checks import host_only
from kmjax._loop import run_in_pieces
from kmjax.errors import InputError
from kmjax.classify.linear import LinearModel, Standardizer
from kmjax.classify.tiled import normal_product

__all__ = ["CGRidge", "CGState", "prepare_cg_ridge", "init_cg", "cg_iterate", "solve_cg_ridge"]

_ROWS = 4096  # rows per block read: 1 GB of float32 at F = 64,000


class CGRidge(NamedTuple):
    """What the CG solver keeps between fits (host arrays).

    rows: the (sorted) rows it fits. mean, scale: (F,) their standardization. rhs: (F, classes)
    Z^T (Y - mean Y). y_mean: (classes,). basis, eigenvalues: (F, r) and (r,), the Nystrom
    approximation of Z^T Z (its top r eigenpairs).
    """

    rows: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    rhs: np.ndarray
    y_mean: np.ndarray
    basis: np.ndarray
    eigenvalues: np.ndarray


def _read_rows(features, idx):
    """Rows ``idx`` (sorted) as a float32 copy (the callers change it in place, never the caller's
    array): read as one slice when they are contiguous."""
    if idx[-1] - idx[0] + 1 == idx.size:
        return np.array(features[idx[0] : idx[-1] + 1], np.float32)
    return np.array(features[idx], np.float32)


def _passes(features, rows, mean=None, scale=None):
    """The row blocks of ``rows``, standardized when mean and scale are given."""
    m32 = None if mean is None else mean.astype(np.float32)
    s32 = None if scale is None else scale.astype(np.float32)
    for i in range(0, rows.size, _ROWS):
        idx = rows[i : i + _ROWS]
        x = _read_rows(features, idx)
        if m32 is not None:
            x -= m32
            x /= s32
        yield idx, x


def _gram_product(features, rows, mean, scale, p):
    """Z^T (Z p) in one pass over the rows: float32 products, float64 sums."""
    out = np.zeros((mean.shape[0], p.shape[1]))
    p32 = p.astype(np.float32)
    for _, z in _passes(features, rows, mean, scale):
        out += normal_product(z, p32)
    return out


def prepare_cg_ridge(features, labels, num_classes: int, *, rows=None, rank: int = 1024, eps: float = 0.01,
                     seed: int = 0, sketch=None, progress=None) -> CGRidge:
    """Four passes over the rows of ``features`` (N, F): their mean and variance (float64), the
    right-hand side, and the rank-``rank`` Nystrom sketch of Z^T Z (``progress(done, 4, None)`` after each).

    sketch: optional (basis, eigenvalues) to reuse instead of the last pass (e.g. the sketch of
    most of these rows, its eigenvalues rescaled to their number): a preconditioner need not be exact.
    """
    host_only("prepare_cg_ridge", "nothing: the CG solver reads the features on the host", features)
    n, f = np.shape(features)
    labels = np.asarray(labels)
    rows = np.arange(n) if rows is None else np.unique(np.asarray(rows, np.int64))
    if labels.shape != (n,) or labels[rows].min() < 0 or labels[rows].max() >= num_classes:
        raise InputError(f"labels must be (N,) = ({n},) class indices in [0, {num_classes})")
    if rows.size < 2:
        raise InputError(f"the CG solver needs at least 2 rows, got {rows.size}")
    rank = max(1, min(int(rank), f))

    def report(done):
        if progress is not None:
            progress(done, 4, None)

    mean = sum(x.sum(axis=0, dtype=np.float64) for _, x in _passes(features, rows)) / rows.size
    report(1)
    sq = sum(np.square(x.astype(np.float64) - mean).sum(axis=0) for _, x in _passes(features, rows))
    scale = np.sqrt(sq / (rows.size - 1) + eps)
    report(2)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    y_mean = y[rows].mean(axis=0)
    rhs = np.zeros((f, num_classes))
    for idx, z in _passes(features, rows, mean, scale):
        rhs += z.T @ (y[idx] - y_mean).astype(np.float32)
    report(3)
    if sketch is not None:
        report(4)
        return CGRidge(rows, mean, scale, rhs, y_mean, *sketch)
    # the randomized Nystrom approximation of A = Z^T Z: Y = A Omega, A ~ Y (Omega^T Y)^-1 Y^T,
    # computed stably with a small shift nu (Frangella, Tropp and Udell, algorithm 2.1)
    omega, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((f, rank)))
    sketch = _gram_product(features, rows, mean, scale, omega)
    nu = np.sqrt(f) * np.finfo(np.float32).eps * np.linalg.norm(sketch)
    sketch += nu * omega
    chol = np.linalg.cholesky(0.5 * (omega.T @ sketch + sketch.T @ omega))
    basis, sigma, _ = np.linalg.svd(np.linalg.solve(chol, sketch.T).T, full_matrices=False)
    report(4)
    return CGRidge(rows, mean, scale, rhs, y_mean, basis, np.maximum(sigma**2 - nu, 0.0))


class CGState(NamedTuple):
    """Where a CG solve stands (host arrays, a pytree to persist and resume from; made by
    ``init_cg``, advanced by ``cg_iterate``): the weights w,
    residual r, search direction p (F, classes), rz = <r, M r> per class, the relative residual
    per class, and the iterations run."""

    weights: np.ndarray
    residual: np.ndarray
    direction: np.ndarray
    rz: np.ndarray
    relative: np.ndarray
    iterations: np.ndarray


def _operators(prep: CGRidge, features, C: float):
    lam = prep.rows.size / (2.0 * C)
    u, lam_hat = prep.basis, prep.eigenvalues

    def precondition(v):  # (lam_r + lam) U (Lam + lam)^-1 U^T v + (I - U U^T) v
        uv = u.T @ v
        return (lam_hat[-1] + lam) * (u @ (uv / (lam_hat + lam)[:, None])) + v - u @ uv

    def product(p):
        return _gram_product(features, prep.rows, prep.mean, prep.scale, p) + lam * p

    return precondition, product


def init_cg(prep: CGRidge, features, C: float, init=None) -> CGState:
    """The state before the first CG iteration at ``C``, from zero or from ``init`` (F, classes)
    weights (a neighbouring C's solution: fewer iterations; one pass over the features)."""
    precondition, product = _operators(prep, features, C)
    w = np.zeros_like(prep.rhs) if init is None else np.array(init, np.float64)
    r = prep.rhs - product(w) if init is not None else prep.rhs.copy()
    z = precondition(r)
    return CGState(w, r, z.copy(), np.sum(r * z, axis=0), np.linalg.norm(r, axis=0) / np.linalg.norm(prep.rhs, axis=0),
                   np.int64(0))


def cg_iterate(prep: CGRidge, features, C: float, state: CGState, until: int, tol: float = 1e-6) -> CGState:
    """CG iterations (one pass over the features each) from ``state`` until iteration ``until`` or
    every class's relative residual is at most ``tol``."""
    precondition, product = _operators(prep, features, C)
    w, r, p, rz, rel, it = (np.array(a) for a in state)
    norm_b = np.linalg.norm(prep.rhs, axis=0)
    while rel.max() > tol and it < until:
        it += 1
        q = product(p)
        alpha = rz / np.sum(p * q, axis=0)
        w += alpha * p
        r -= alpha * q
        rel = np.linalg.norm(r, axis=0) / norm_b
        z = precondition(r)
        rz, rz_old = np.sum(r * z, axis=0), rz
        p = z + (rz / rz_old) * p
    return CGState(w, r, p, rz, rel, np.int64(it))


def solve_cg_ridge(prep: CGRidge, features, C: float, *, init=None, tol: float = 1e-6, max_iter: int = 300,
                   state: CGState | None = None, progress=None, checkpoint=None) -> tuple[Standardizer, LinearModel, dict]:
    """Ridge weights at ``C`` for the rows of ``prep``, by preconditioned conjugate gradients (one
    pass over the features per iteration) until every class's residual norm is below ``tol`` times
    its right-hand side's.

    init: optional (F, classes) starting weights (a neighbouring C's solution: fewer iterations).
    state: a ``CGState`` that ``checkpoint`` was given by an interrupted solve at the same C: it
      continues from there (default: ``init_cg``, from ``init``).
    progress: optional ``progress(iteration, max_iter, relative residual)`` after each iteration.
    checkpoint: optional ``checkpoint(state) -> CGState | None``, given the ``CGState`` after each
      iteration, to persist it; what it returns (when not None: the same values) is the state the
      solve goes on with.

    Returns (Standardizer, LinearModel, {"iterations", "residual", "converged", "seconds"}), the first
    two usable like those of ``fit_ridge``.
    """
    if not C > 0:
        raise InputError(f"C must be > 0, got {C!r}")
    t0 = time.perf_counter()
    state = init_cg(prep, features, C, init) if state is None else state

    state = run_in_pieces(lambda s, until: cg_iterate(prep, features, C, s, until, tol), state, max_iter,
                          done=lambda s: int(s.iterations), stopped=lambda s: bool(s.relative.max() <= tol),
                          value=lambda s: float(s.relative.max()), progress=progress, checkpoint=checkpoint)
    weights = np.vstack([state.weights, prep.y_mean[None, :]])  # centred z: the bias is the mean target
    std = Standardizer(jnp.asarray(prep.mean, jnp.float32), jnp.asarray(prep.scale, jnp.float32))
    rel = float(state.relative.max())
    info = {"iterations": int(state.iterations), "residual": rel, "converged": rel <= tol,
            "seconds": round(time.perf_counter() - t0, 3)}
    return std, LinearModel(jnp.asarray(weights, jnp.float32)), info
