"""Linear classifiers on pooled features: standardization, one-vs-all L2-SVM, softmax regression,
and ridge regression from streamed sufficient statistics.

The SVM and softmax classifiers are trained full-batch with optax's L-BFGS inside one
jit-compiled ``lax.while_loop`` (stop at ``max_iter`` or when the gradient norm falls below
``tol``). A constant-1 column is appended to the standardized features, so the bias is one more
weight (and is regularized with the rest, as in the authors' code).

Ridge regression (one-vs-all least squares on +-1 targets, the same C scaling) never needs the
features in memory at once: ``gram_stats`` reads them in row blocks (a ``np.memmap`` works) and
keeps only their F x F Gram matrix, and ``fit_ridge`` solves from it, for any C.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "Standardizer", "fit_standardizer", "standardize",
    "LinearModel", "svm_loss", "softmax_loss", "train_linear", "predict", "accuracy", "LOSSES",
    "GramStats", "gram_stats", "fit_ridge", "predict_features",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class Standardizer(NamedTuple):
    """Feature standardization: (f - mean) / scale. mean, scale: (F,) float32."""

    mean: jax.Array
    scale: jax.Array


def fit_standardizer(features, eps: float = 0.01, block: int = 1024) -> Standardizer:
    """Training mean and sqrt(var + eps) per feature, as the authors' code (eps = 0.01; the unbiased
    variance of MATLAB's ``var``). Accumulated in float64 over row blocks: no float64 copy of the
    (N, F) features (6.4 GB at N = 50,000, K = 4000) is ever made."""
    f = features
    if np.ndim(f) != 2 or np.shape(f)[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2 to estimate a variance, got shape {np.shape(f)}")
    n = f.shape[0]
    mean = sum(np.asarray(f[i : i + block]).sum(axis=0, dtype=np.float64) for i in range(0, n, block)) / n
    ss = sum(np.square(np.asarray(f[i : i + block], np.float64) - mean).sum(axis=0) for i in range(0, n, block))
    var = ss / (n - 1)
    return Standardizer(jnp.asarray(mean, jnp.float32), jnp.asarray(np.sqrt(var + eps), jnp.float32))


@jax.jit
def standardize(standardizer: Standardizer, features):
    """(N, F) features -> (N, F + 1) float32: standardized, with a constant-1 bias column."""
    f = (jnp.asarray(features, jnp.float32) - standardizer.mean) / standardizer.scale
    return jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)


class LinearModel(NamedTuple):
    """weights: (F + 1, classes), the last row the bias; scores = standardize(f) @ weights."""

    weights: jax.Array


@jax.custom_vjp
def _scores(weights, x, xt):
    """x @ weights, whose gradient for the weights is computed as xt @ g.

    XLA's CPU product x.T @ g with the long N axis contracted runs at a third of the speed of
    the same product with x stored transposed; L-BFGS spends its time in exactly these two
    products, so training keeps a transposed copy of the features.
    """
    return jnp.matmul(x, weights, precision=_HIGHEST)


def _scores_fwd(weights, x, xt):
    return jnp.matmul(x, weights, precision=_HIGHEST), xt


def _scores_bwd(xt, g):
    return jnp.matmul(xt, g, precision=_HIGHEST), None, None


_scores.defvjp(_scores_fwd, _scores_bwd)


def _product(weights, x, xt):
    return jnp.matmul(x, weights, precision=_HIGHEST) if xt is None else _scores(weights, x, xt)


def svm_loss(weights, x, labels, C, xt=None):
    """One-vs-all L2-SVM, summed over classes: 1/2 ||W||^2 + C * mean_i sum_k margin_ik^2,
    margin = max(0, 1 - y_ik x_i.w_k), y = +1 for the true class, -1 otherwise.
    ``xt``: optionally x.T stored contiguously, for a faster gradient (same values)."""
    y = 2.0 * jax.nn.one_hot(labels, weights.shape[1], dtype=x.dtype) - 1.0
    margin = jnp.maximum(0.0, 1.0 - y * _product(weights, x, xt))
    return 0.5 * jnp.sum(weights * weights) + C * jnp.sum(jnp.mean(margin * margin, axis=0))


def softmax_loss(weights, x, labels, C, xt=None):
    """Multinomial logistic regression with the same scaling: 1/2 ||W||^2 + C * mean cross-entropy."""
    logits = _product(weights, x, xt)
    return 0.5 * jnp.sum(weights * weights) + C * jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    )


LOSSES = {"svm": svm_loss, "logistic": softmax_loss}


class TrainInfo(NamedTuple):
    """loss: final objective. grad_norm: its gradient's norm. n_iter: L-BFGS iterations run."""

    loss: jax.Array
    grad_norm: jax.Array
    n_iter: jax.Array


@partial(jax.jit, static_argnames=("loss", "num_classes", "max_iter", "memory", "progress"))
def _train(x, labels, C, tol, *, loss, num_classes, max_iter, memory, progress):
    fun = partial(LOSSES[loss], x=x, labels=labels, C=C, xt=x.T.copy())
    opt = optax.lbfgs(memory_size=memory)
    value_and_grad = optax.value_and_grad_from_state(fun)
    w0 = jnp.zeros((x.shape[1], num_classes), jnp.float32)

    def step(carry):
        w, state, _, it = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=fun)
        if progress is not None:  # host callback, outside the numerics
            jax.debug.callback(progress, it + 1, max_iter, value)
        return w + updates, state, optax.tree.norm(grad), it + 1

    def cond(carry):
        _, _, gnorm, it = carry
        return (it < max_iter) & (gnorm > tol)

    w, _, _, it = jax.lax.while_loop(cond, step, (w0, opt.init(w0), jnp.float32(jnp.inf), jnp.int32(0)))
    value, grad = jax.value_and_grad(fun)(w)
    return LinearModel(w), TrainInfo(value, optax.tree.norm(grad), it)


def train_linear(x, labels, *, loss: str = "svm", C: float = 100.0, num_classes: int | None = None,
                 max_iter: int = 1000, tol: float = 1e-3, memory: int = 20, progress=None):
    """Train a linear classifier on standardized features with L-BFGS.

    Args:
      x: (N, F + 1) standardized features with the bias column (see ``standardize``).
      labels: (N,) int class indices in [0, num_classes).
      loss: "svm" (one-vs-all squared hinge) or "logistic" (softmax cross-entropy).
      C: weight of the data term against 1/2 ||W||^2 (larger: less regularization).
      num_classes: default max(labels) + 1.
      max_iter: L-BFGS iterations at most. tol: stop once the gradient norm is below it.
      memory: L-BFGS history length.
      progress: optional ``progress(iteration, max_iter, loss)`` called on the host after each
        iteration (through ``jax.debug.callback``).

    Returns:
      (LinearModel, TrainInfo).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {tuple(LOSSES)}")
    x = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, F) and labels (N,), got {x.shape} and {labels.shape}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C!r}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    return _train(x, labels, jnp.float32(C), jnp.float32(tol), loss=loss, num_classes=int(num_classes),
                  max_iter=int(max_iter), memory=int(memory), progress=progress)


@jax.jit
def predict(model: LinearModel, x):
    """Class index of each row of (N, F + 1) standardized features."""
    return jnp.argmax(jnp.matmul(x, model.weights, precision=_HIGHEST), axis=1).astype(jnp.int32)


def accuracy(model: LinearModel, x, labels) -> float:
    """Fraction of rows whose predicted class equals the label."""
    return float(jnp.mean(predict(model, x) == jnp.asarray(labels)))


def predict_features(standardizer: Standardizer, model: LinearModel, features, block: int = 4096) -> np.ndarray:
    """Class index of each row of raw (N, F) features, standardized and scored ``block`` rows at a
    time: the (N, F + 1) standardized copy of a large data set is never made."""
    n = features.shape[0]
    return np.concatenate([np.asarray(predict(model, standardize(standardizer, np.asarray(features[i : i + block]))))
                           for i in range(0, n, block)] or [np.zeros(0, np.int32)])


class GramStats(NamedTuple):
    """Sufficient statistics of a least-squares fit over rows (x_i, y_i), float64 NumPy arrays.

    count: rows. shift: (F,) subtracted from every x first (the mean of the first block read),
    so that the centred Gram matrix below does not lose its digits to large feature means.
    x_sum: (F,) sum of x - shift. gram: (F, F) sum of (x - shift)(x - shift)^T.
    cross: (F, C) sum of (x - shift) y^T. y_sum: (C,) sum of y. y: +1 for the true class, -1 else.
    """

    count: float
    shift: np.ndarray
    x_sum: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    y_sum: np.ndarray

    def __add__(self, other: "GramStats") -> "GramStats":
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("GramStats with different shifts cannot be added; pass the same shift to gram_stats")
        return GramStats(self.count + other.count, self.shift, self.x_sum + other.x_sum, self.gram + other.gram,
                         self.cross + other.cross, self.y_sum + other.y_sum)


_GRAM_TILE = 16384  # feature columns per product (see _add_gram)


def _add_gram(gram, x, tile: int = _GRAM_TILE) -> None:
    """gram[i, j] += x^T x on the tiles with i <= j (the upper triangle, tile-wise; diagonal tiles
    whole). Products of at most ``tile`` columns: NumPy's bundled OpenBLAS crashes (SIGSEGV) in
    x^T x for x of 32,000 columns; the diagonal tiles still use its ``syrk`` (half the flops)."""
    f = x.shape[1]
    for i in range(0, f, tile):
        xi = np.ascontiguousarray(x[:, i : i + tile])
        gram[i : i + tile, i : i + tile] += xi.T @ xi
        if i + tile < f:
            gram[i : i + tile, i + tile :] += xi.T @ x[:, i + tile :]


def _mirror_tiles(gram, tile: int = _GRAM_TILE) -> None:
    """Fill the lower off-diagonal tiles from the upper ones (the inverse of _add_gram's skipping)."""
    f = gram.shape[0]
    for i in range(0, f, tile):
        if i + tile < f:
            gram[i + tile :, i : i + tile] = gram[i : i + tile, i + tile :].T


def _triangular(l, b, trans: bool = False):
    return np.asarray(jax.scipy.linalg.solve_triangular(jnp.asarray(l), jnp.asarray(b), lower=True, trans=int(trans)))


def _cholesky(a, tile: int = _GRAM_TILE):
    """The lower Cholesky factor of a symmetric positive definite float32 ``a``, computed in place
    (its upper triangle is left as garbage) by tiles of at most ``tile``: the LAPACK factorization
    of a whole 32,000 x 32,000 matrix crashes (SIGSEGV) in the OpenBLAS that jaxlib ships, and
    NumPy's already at 16,384 (both seen on this project's AVX-512 machine), so the tiles go
    through jaxlib's."""
    f = a.shape[0]
    for i in range(0, f, tile):
        j = min(i + tile, f)
        a[i:j, i:j] = np.asarray(jax.scipy.linalg.cholesky(jnp.asarray(a[i:j, i:j]), lower=True))
        if j < f:
            panel = _triangular(a[i:j, i:j], a[j:, i:j].T).T  # L_ji = A_ji L_ii^-T
            a[j:, i:j] = panel
            for k in range(j, f, tile):  # A_22 -= L_j L_j^T, lower part, by column tiles
                a[k:, k : k + tile] -= panel[k - j :] @ panel[k - j : k - j + tile].T
    return a


def _cholesky_solve(l, r, tile: int = _GRAM_TILE):
    """Solve L L^T x = r with the tiled factor of ``_cholesky`` (forward, then back substitution)."""
    f = l.shape[0]
    x = np.array(r, np.float32)
    starts = range(0, f, tile)
    for i in starts:
        j = min(i + tile, f)
        if i:
            x[i:j] -= l[i:j, :i] @ x[:i]
        x[i:j] = _triangular(l[i:j, i:j], x[i:j])
    for i in reversed(starts):
        j = min(i + tile, f)
        if j < f:
            x[i:j] -= l[j:, i:j].T @ x[j:]
        x[i:j] = _triangular(l[i:j, i:j], x[i:j], trans=True)
    return x


def gram_stats(features, labels, num_classes: int, *, rows=None, shift=None, block: int = 8192,
               progress=None, into: GramStats | None = None) -> GramStats:
    """Accumulate ``GramStats`` over the rows of (N, F) features, ``block`` rows at a time.

    Args:
      features: (N, F) array-like; a ``np.memmap`` is read block by block, never whole.
      labels: (N,) int class indices in [0, num_classes).
      rows: optional indices of the rows to use (e.g. a training split), in any order.
      shift: (F,) to subtract first; default the mean of the first block. Statistics that are to
        be added (``a + b``) must share it.
      block: rows per product (8192: 1 GB of float32 at 32,000 features; larger blocks amortize the
        float64 accumulation). Each block's products are float32 (BLAS ``syrk``), summed in float64.
      progress: optional ``progress(done, total)`` after each block.
      into: statistics to add these rows to, in place (their shift is used): one F x F matrix in
        memory where ``a + b`` would need three.
    """
    n, f = np.shape(features)
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"features are {np.shape(features)} but labels {labels.shape}: one label per row")
    rows = np.arange(n) if rows is None else np.sort(np.asarray(rows, np.int64))
    if rows.size == 0:
        raise ValueError("gram_stats got no rows")
    if labels[rows].min() < 0 or labels[rows].max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    acc = into
    if into is not None:
        if into.gram.shape != (f, f) or into.cross.shape != (f, num_classes):
            raise ValueError(f"`into` holds statistics of {into.gram.shape[0]} features and {into.cross.shape[1]} "
                             f"classes, these rows have {f} and {num_classes}")
    for start in range(0, rows.size, block):
        idx = rows[start : start + block]
        # a copy (np.array): the block is shifted in place below, and a slice of an in-memory array is a view
        x = np.array(features[idx[0] : idx[-1] + 1] if idx[-1] - idx[0] + 1 == idx.size else features[idx],
                     np.float32)
        if acc is None:
            shift = np.asarray(x.mean(axis=0, dtype=np.float64) if shift is None else shift, np.float64)
            acc = GramStats(0.0, shift, np.zeros(f), np.zeros((f, f)), np.zeros((f, num_classes)),
                            np.zeros(num_classes))
        x -= acc.shift.astype(np.float32)
        y = 2.0 * np.eye(num_classes, dtype=np.float32)[labels[idx]] - 1.0
        _add_gram(acc.gram, x)
        acc.cross.__iadd__(x.T @ y)
        acc = acc._replace(count=acc.count + idx.size, x_sum=acc.x_sum + x.sum(axis=0, dtype=np.float64),
                           y_sum=acc.y_sum + y.sum(axis=0, dtype=np.float64))
        if progress is not None:
            progress(min(start + block, rows.size), rows.size)
    _mirror_tiles(acc.gram)
    return acc


def fit_ridge(stats: GramStats, C: float, eps: float = 0.01, refine: int = 3) -> tuple[Standardizer, LinearModel]:
    """One-vs-all ridge regression on standardized features, from their ``GramStats``.

    Minimizes 1/2 ||W||^2 + C * mean_i sum_k (y_ik - z_i.w_k - b_k)^2 over the standardized
    features z = (x - mean) / sqrt(var + eps) (the SVM's standardization and C scaling; the bias b
    is not regularized), i.e. solves A W = Z^T (Y - mean(Y)) with A = Z^T Z + n / (2C) I.

    A is factored by a float32 Cholesky decomposition (a third of the work of a float64 LU solve,
    half its memory; by tiles, see ``_cholesky``), and the solution is polished by ``refine``
    steps of iterative refinement whose residuals are computed in float64 from the statistics
    themselves, which brings it to float64 accuracy while A's condition number times float32's
    rounding (6e-8) is well below 1 (C up to ~1e4 on standardized pooled features).
    Memory: the statistics' F x F float64 matrix plus one F x F float32 one.

    Returns:
      (Standardizer, LinearModel) usable exactly like those of the L-BFGS classifiers.
    """
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C!r}")
    n = stats.count
    if n < 2:
        raise ValueError(f"fit_ridge needs statistics of at least 2 rows, got {n:g}")
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
    factor = _cholesky(a)

    def solve(r):
        return _cholesky_solve(factor, r).astype(np.float64)

    def product(w):  # A @ w in float64, from the uncentred Gram matrix: Z^T Z w = D^-1 (G - n m m^T) D^-1 w
        v = w / scale[:, None]
        gv = np.concatenate([stats.gram[i : i + _GRAM_TILE] @ v for i in range(0, f, _GRAM_TILE)])
        return (gv - n * np.outer(m, m @ v)) / scale[:, None] + lam * w

    rhs = (stats.cross - np.outer(m, stats.y_sum)) / scale[:, None]
    w = solve(rhs)
    for _ in range(refine):
        w += solve(rhs - product(w))
    if not np.all(np.isfinite(w)):
        raise ValueError(f"the ridge system at C = {C:g} is too ill-conditioned for a float32 factorization; "
                         "use a smaller C (stronger regularization)")
    weights = np.vstack([w, stats.y_sum[None, :] / n])  # centred z: the bias is the mean target
    std = Standardizer(jnp.asarray(stats.shift + m, jnp.float32), jnp.asarray(scale, jnp.float32))
    return std, LinearModel(jnp.asarray(weights, jnp.float32))
