"""Ridge on the accelerator: the statistics, the factorization, the solves, the scores and the
primal weights of ``ridge`` and ``dual`` as jit-compiled programs over features held on the device.

Each pass is one program (a ``lax.fori_loop`` over blocks), so nothing crosses to the host
between its blocks: the features, labels and row indices are put on the device once, and what
comes back is the model (and one count of correct validation rows per C). ``fit_classifier`` takes this path
when JAX's default device is an accelerator and the training features fit in its memory
(``placement``; when only the solver's arrays fit, the features are streamed to it in blocks);
otherwise the host path of ``ridge``/``dual``, which streams the features from
disk and sums in float64 NumPy.

Precision. Every product is float32 with float32 accumulation (``precision=HIGHEST``: no TF32 or
bfloat16 passes), and every sum across blocks is **compensated**: a float32 pair (hi, lo) advanced
by Knuth's TwoSum, so that the Gram matrix, the kernel and the long products below carry about
twice float32's digits without float64, which TPUs do not have and consumer GPUs run at 1/32-1/64
of float32's rate. The kernel is collapsed to float32 once complete (one rounding, where the host
path's running float32 sum rounds once per column block). Long contractions (the refinement's
residual products over up to 50,000 kernel columns, the primal weights over the rows) are float32
products of ``_TILE`` terms summed by TwoSum across tiles. The factorization is float32 Cholesky,
polished by ``refine`` steps of iterative refinement with those residuals and a compensated
solution. ``tests/test_device.py`` states the tolerances against float64 NumPy and the host path.

Memory at N = 50,000 rows and F = 72,000 features (the K = 8000 flip-closed config): features
14.4 GB, the kernel as a pair while it grows 20 GB (10 GB once collapsed), the centred block and its
factor 2 x 10 GB: about 45 GB, within an 80 GB H100.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kmjax.classify.compensated import Pair, over_blocks, dot, matmul, refined_solve, value, zeros, two_sum
from kmjax.classify.linear import LinearModel, Standardizer, raw_scores

__all__ = ["Pair", "two_sum", "DeviceGram", "gram_on_device", "fit_ridge_on_device", "DeviceKernel", "kernel_on_device",
           "fit_dual_on_device", "dual_scores_on_device", "primal_on_device", "linear_scores_on_device", "correct_on_device", "all_finite", "placement",
           "pulls"]

_ROWS = 4096  # rows per block of the Gram pass
_COLUMNS = 4096  # feature columns per block of the kernel pass (0.8 GB at 50,000 rows)


def _targets(labels, num_classes: int):
    return 2.0 * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) - 1.0


# ----------------------------------------------------------------------------------------------- primal


class DeviceGram(NamedTuple):
    """``ridge.GramStats`` on the device, its sums compensated pairs. count: () float32 (exact to
    2^24 rows); shift: (F,) the mean of the first block, subtracted from every row."""

    count: jax.Array
    shift: jax.Array
    x_sum: Pair
    gram: Pair
    cross: Pair
    y_sum: Pair


def _gram_rows(s: DeviceGram, x, labels, keep, num_classes: int) -> DeviceGram:
    """``s`` with a block of rows added: x (b, F) raw, their labels, keep (b,) 1 for a row, 0 for padding."""
    x = (x - s.shift) * keep[:, None]
    y = _targets(labels, num_classes) * keep[:, None]
    return DeviceGram(s.count + keep.sum(), s.shift, two_sum(s.x_sum, x.sum(axis=0)), two_sum(s.gram, matmul(x.T, x)),
                      two_sum(s.cross, matmul(x.T, y)), two_sum(s.y_sum, y.sum(axis=0)))


@partial(jax.jit, static_argnames=("num_classes",))
def _empty_gram(first, *, num_classes: int) -> DeviceGram:
    """No rows yet, shifted by the mean of ``first`` (the first block of rows)."""
    f = first.shape[1]
    return DeviceGram(jnp.zeros((), jnp.float32), first.mean(axis=0), zeros(f), zeros((f, f)),
                      zeros((f, num_classes)), zeros(num_classes))


@partial(jax.jit, static_argnames=("num_classes", "block"), donate_argnames=("stats",))
def _gram_resident(features, labels, rows, *, num_classes: int, stats: DeviceGram | None, block: int) -> DeviceGram:
    """One program: a loop over blocks of ``rows`` of the device features, the last one padded and masked."""
    if stats is None:
        stats = _empty_gram(features[rows[:block]], num_classes=num_classes)
    n = rows.shape[0]
    padded = jnp.pad(rows, (0, -n % block))
    valid = (jnp.arange(padded.shape[0]) < n).astype(jnp.float32)

    def step(start, width, s: DeviceGram):
        idx = jax.lax.dynamic_slice_in_dim(padded, start, width)
        return _gram_rows(s, features[idx], labels[idx], jax.lax.dynamic_slice_in_dim(valid, start, width), num_classes)

    return over_blocks(padded.shape[0], block, step)(stats)


@partial(jax.jit, static_argnames=("num_classes",), donate_argnames=("stats",))
def _gram_block(stats: DeviceGram, x, labels, keep, *, num_classes: int) -> DeviceGram:
    return _gram_rows(stats, x, labels, keep, num_classes)


def gram_on_device(features, labels, rows, *, num_classes: int, stats: DeviceGram | None = None,
                   block: int = _ROWS) -> DeviceGram:
    """The Gram statistics of ``rows`` (int indices) of (N, F) ``features``, added to ``stats``
    (consumed) when given. Device features (a ``jax.Array``; labels and rows too): one program, a
    loop over row blocks. Host features (NumPy, a memmap; labels and rows host arrays): streamed,
    each block read and put on the device while the previous one is summed there (JAX dispatches
    asynchronously), the last block padded to the same shape (one program for every block)."""
    if isinstance(features, jax.Array):
        return _gram_resident(features, labels, rows, num_classes=num_classes, stats=stats, block=block)
    rows = np.sort(np.asarray(rows))
    for start in range(0, rows.size, block):
        idx = rows[start : start + block]
        pad = block - idx.size
        x = np.pad(np.asarray(features[idx], np.float32), ((0, pad), (0, 0)))
        if stats is None:
            stats = _empty_gram(put(x[: idx.size]), num_classes=num_classes)
        keep = np.arange(block) < idx.size
        stats = _gram_block(stats, put(x), put(np.pad(np.asarray(labels)[idx], (0, pad))), put(keep, np.float32),
                            num_classes=num_classes)
    return stats


@partial(jax.jit, static_argnames=("eps", "refine"))
def fit_ridge_on_device(stats: DeviceGram, C, eps: float = 0.01, refine: int = 3):
    """``ridge.fit_ridge`` from ``DeviceGram``: (Standardizer, LinearModel) on the device. ``C``: a
    device scalar (one program for every C)."""
    n = stats.count
    m = value(stats.x_sum) / n  # mean of x - shift
    gram = value(stats.gram)
    scale = jnp.sqrt(jnp.maximum(jnp.diag(gram) - n * m * m, 0.0) / (n - 1) + eps)
    lam = n / (2.0 * C)
    a = (gram - n * jnp.outer(m, m)) / jnp.outer(scale, scale) + lam * jnp.eye(m.shape[0], dtype=jnp.float32)
    rhs = (value(stats.cross) - jnp.outer(m, value(stats.y_sum))) / scale[:, None]
    w = value(refined_solve(a, jnp.linalg.cholesky(a), rhs, refine))
    weights = jnp.concatenate([w, (value(stats.y_sum) / n)[None, :]])  # centred z: the bias is the mean target
    return Standardizer(stats.shift + m, scale), LinearModel(weights)


# ------------------------------------------------------------------------------------------------- dual


class DeviceKernel(NamedTuple):
    """``dual.KernelStats`` on the device, complete: mean, scale (F,) of the standardization and
    the (N, N) float32 kernel of the standardized features (summed as a pair, rounded once)."""

    mean: jax.Array
    scale: jax.Array
    kernel: jax.Array


def _kernel_columns(kernel: Pair, x, eps: float):
    """``kernel`` with a block of columns added: x (N, b) standardized over its rows (float32, two
    passes), z z^T summed into the pair; with the block's mean and scale. A zero column (padding)
    adds nothing."""
    mu = x.mean(axis=0)
    xc = x - mu
    sd = jnp.sqrt(jnp.square(xc).sum(axis=0) / (x.shape[0] - 1) + eps)
    z = xc / sd
    return two_sum(kernel, matmul(z, z.T)), mu, sd


@partial(jax.jit, static_argnames=("eps", "block"))
def _kernel_resident(features, eps: float, block: int) -> DeviceKernel:
    n, f = features.shape

    def step(start, width, carry):
        mean, scale, kernel = carry
        kernel, mu, sd = _kernel_columns(kernel, jax.lax.dynamic_slice_in_dim(features, start, width, axis=1), eps)
        return (jax.lax.dynamic_update_slice_in_dim(mean, mu, start, 0),
                jax.lax.dynamic_update_slice_in_dim(scale, sd, start, 0), kernel)

    mean, scale, kernel = over_blocks(f, block, step)((jnp.zeros(f), jnp.ones(f), zeros((n, n))))
    return DeviceKernel(mean, scale, value(kernel))


_kernel_block = jax.jit(_kernel_columns, static_argnames=("eps",), donate_argnames=("kernel",))
_empty_kernel = jax.jit(zeros, static_argnums=0)


@partial(jax.jit, static_argnames=("f",))
def _finish_kernel(means, scales, kernel: Pair, *, f: int) -> DeviceKernel:
    return DeviceKernel(jnp.concatenate(means)[:f], jnp.concatenate(scales)[:f], value(kernel))


def _column_blocks(features, block: int):
    """Column blocks of host ``features`` put on the device, the last padded with zero columns."""
    for start in range(0, np.shape(features)[1], block):
        x = np.asarray(features[:, start : start + block], np.float32)
        yield put(np.pad(x, ((0, 0), (0, block - x.shape[1]))))


def kernel_on_device(features, eps: float = 0.01, *, block: int = _COLUMNS) -> DeviceKernel:
    """``dual.accumulate_kernel`` over every row and column of (N, F) ``features``, by column
    blocks. Device features: one program. Host features: streamed as ``gram_on_device`` streams."""
    if isinstance(features, jax.Array):
        return _kernel_resident(features, eps, block)
    n, f = np.shape(features)
    kernel, means, scales = _empty_kernel((n, n)), [], []
    for x in _column_blocks(features, block):
        kernel, mu, sd = _kernel_block(kernel, x, eps)
        means.append(mu)
        scales.append(sd)
    return _finish_kernel(means, scales, kernel, f=f)


class DeviceDualFit(NamedTuple):
    """``dual.DualFit`` on the device: rows (fitted), alpha (n, classes) compensated and rounded,
    y_mean, row_mean (N,) and grand_mean of the centring."""

    rows: jax.Array
    alpha: jax.Array
    y_mean: jax.Array
    row_mean: jax.Array
    grand_mean: jax.Array


def _block_of(kernel, rows, block: int = 512):
    """kernel[rows][:, rows] by blocks of ``block`` rows (a gather of all n x n entries at once
    would build an (n, n, 2) index array: 20 GB at n = 50,000)."""
    n = rows.shape[0]
    if n == kernel.shape[0]:  # every row, in order (the final fit): the kernel itself
        return kernel

    def step(start, width, out):
        part = jnp.take(jnp.take(kernel, jax.lax.dynamic_slice_in_dim(rows, start, width), axis=0), rows, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)

    return over_blocks(n, block, step)(jnp.zeros((n, n), kernel.dtype))


@partial(jax.jit, static_argnames=("num_classes", "refine"))
def fit_dual_on_device(kern: DeviceKernel, labels, C, rows, *, num_classes: int, refine: int = 3) -> DeviceDualFit:
    """``dual.fit_dual`` on the device: ridge at ``C`` (a device scalar) on kernel rows ``rows``."""
    kernel = kern.kernel
    n = rows.shape[0]
    indicator = jnp.zeros((kernel.shape[0], 1), jnp.float32).at[rows].set(1.0 / n)
    row_mean = value(dot(kernel, indicator))[:, 0]
    grand = row_mean[rows].mean()
    y = _targets(labels[rows], num_classes)
    y_mean = y.mean(axis=0)
    a = (_block_of(kernel, rows) - row_mean[rows][:, None] - row_mean[rows][None, :] + grand
         + (n / (2.0 * C)) * jnp.eye(n, dtype=jnp.float32))
    alpha = value(refined_solve(a, jnp.linalg.cholesky(a), y - y_mean, refine))
    return DeviceDualFit(rows, alpha, y_mean, row_mean, grand)


@jax.jit
def dual_scores_on_device(kern: DeviceKernel, fit: DeviceDualFit, rows):
    """(len(rows), classes) scores of kernel rows ``rows`` under ``fit`` (``dual.dual_scores``)."""
    block = kern.kernel[rows[:, None], fit.rows[None, :]] - fit.row_mean[rows][:, None] - fit.row_mean[fit.rows][None, :] + fit.grand_mean
    return value(dot(block, fit.alpha)) + fit.y_mean


@partial(jax.jit, static_argnames=("n_all",))
def _fitted_weights(fit: DeviceDualFit, *, n_all: int):
    """alpha on every row (zero off the fitted ones) beside the fitted rows' indicator / n: then
    Z_c^T alpha = Z^T alpha_full - m (1^T alpha), m = Z^T indicator / n the fitted rows' mean of z."""
    out = jnp.zeros((n_all, fit.alpha.shape[1] + 1), jnp.float32)
    return out.at[fit.rows, :-1].set(fit.alpha).at[fit.rows, -1].set(1.0 / fit.rows.shape[0])


def _primal_columns(x, mean, scale, weights_in, alpha_sum):
    """The primal weights of a block of columns x (N, b), and their share of the bias."""
    prod = value(dot(((x - mean) / scale).T, weights_in))
    m = prod[:, -1]
    w = prod[:, :-1] - jnp.outer(m, alpha_sum)
    return w, m @ w


@partial(jax.jit, static_argnames=("block",))
def _primal_resident(kern: DeviceKernel, fit: DeviceDualFit, features, block: int):
    f = features.shape[1]
    weights_in, alpha_sum = _fitted_weights(fit, n_all=features.shape[0]), fit.alpha.sum(axis=0)

    def step(start, width, carry):
        weights, bias = carry
        w, share = _primal_columns(*(jax.lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)
                                     for a in (features, kern.mean, kern.scale)), weights_in, alpha_sum)
        return jax.lax.dynamic_update_slice_in_dim(weights, w, start, 0), bias - share

    weights, bias = over_blocks(f, block, step)((jnp.zeros((f, fit.alpha.shape[1]), jnp.float32), fit.y_mean))
    return Standardizer(kern.mean, kern.scale), LinearModel(jnp.concatenate([weights, bias[None, :]]))


_primal_block = jax.jit(_primal_columns)


@partial(jax.jit, static_argnames=("f",))
def _finish_primal(kern: DeviceKernel, fit: DeviceDualFit, parts, shares, *, f: int):
    weights = jnp.concatenate(parts)[:f]
    bias = fit.y_mean - jnp.sum(jnp.stack(shares), axis=0)
    return Standardizer(kern.mean, kern.scale), LinearModel(jnp.concatenate([weights, bias[None, :]]))


@partial(jax.jit, static_argnames=("block", "fill"))
def _split(v, *, block: int, fill: float):
    """(F,) ``v`` in blocks of ``block``, the last padded with ``fill``: a tuple, made by one program."""
    return tuple(jnp.pad(v, (0, -v.shape[0] % block), constant_values=fill).reshape(-1, block))


def primal_on_device(kern: DeviceKernel, fit: DeviceDualFit, features, *, block: int = _COLUMNS):
    """(Standardizer, LinearModel) of a dual fit (``dual.primal_model``): W = Z_c^T alpha by column
    blocks of the features, each a compensated sum over the rows. Device features: one program;
    host features: streamed as ``gram_on_device`` streams."""
    if isinstance(features, jax.Array):
        return _primal_resident(kern, fit, features, block)
    n_all, f = np.shape(features)
    weights_in, alpha_sum = _fitted_weights(fit, n_all=n_all), fit.alpha.sum(axis=0)
    blocks = zip(_column_blocks(features, block), _split(kern.mean, block=block, fill=0.0),
                 _split(kern.scale, block=block, fill=1.0))
    parts, shares = zip(*(_primal_block(x, mean, scale, weights_in, alpha_sum) for x, mean, scale in blocks))
    return _finish_primal(kern, fit, parts, shares, f=f)


# --------------------------------------------------------------------------------------- scores, sizes


@jax.jit
def linear_scores_on_device(standardizer: Standardizer, model: LinearModel, features, rows):
    """(len(rows), classes) scores of rows ``rows`` of the device features under a primal model (in
    one program: eager indexing would move its index arithmetic's constants to the device)."""
    return raw_scores(standardizer, model, features[rows])


@jax.jit
def correct_on_device(scores, labels):
    """How many rows' best score is their label: a device scalar (the accuracy's numerator, exact);
    -1 if any score is not finite (a solve that failed), so that one pull tells both."""
    return jnp.where(jnp.all(jnp.isfinite(scores)), jnp.sum(jnp.argmax(scores, axis=1) == labels), -1)


@jax.jit
def all_finite(tree):
    """Whether every array of ``tree`` is finite: one device scalar (one pull checks a model)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


_PULLS = [0]


def pulls() -> int:
    """How many values the classifier's device path has pulled to the host (``pull``), for tests."""
    return _PULLS[0]


def pull(x):
    """One explicit device-to-host pull (a validation accuracy's count of correct rows), counted."""
    _PULLS[0] += 1
    return jax.device_get(x)


def placement(n_rows: int, n_features: int, dual: bool, device=None) -> str | None:
    """Where a device fit of (n_rows, n_features) float32 features goes, by ``device``'s memory
    (default: JAX's first device; its ``memory_stats`` limit, with a quarter spare): "resident"
    when the features fit beside the solver's arrays, "streamed" when only the solver's arrays fit
    (the features then cross in blocks), None when not even they fit, or the device does not
    report its memory (a CPU). The solver's arrays at their peak, float32 side x side matrices: four
    for the dual, side N (the kernel pair and its rounding; then the kernel, the shifted block, its
    factor and the factorization's symmetrized copy of it), six for the Gram statistics, side F (the
    pair, kept for every C, its value, the shifted matrix, its factor and that copy)."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 1.25
    solver = 4 * (4 if dual else 6) * (n_rows if dual else n_features) ** 2
    if solver + 4 * n_rows * n_features <= free:
        return "resident"
    return "streamed" if solver + 4 * 2 * n_rows * _COLUMNS <= free else None


def put(x, dtype=None):
    """``x`` on the device by one explicit transfer (a host array, a memmap read once)."""
    return jax.device_put(np.asarray(x, dtype))
