"""Linear classifiers trained with L-BFGS: feature standardization, one-vs-all L2-SVM and softmax
regression, prediction.

Both losses are minimized full-batch with optax's L-BFGS inside one jit-compiled
``lax.while_loop`` (stop at ``max_iter`` or when the gradient norm falls below ``tol``). A
constant-1 column is appended to the standardized features, so the bias is one more weight (and
is regularized with the rest, as in the authors' code).

The training rows are padded to a bucket (``kmjax._ops.bucket``: at most 12.5% more rows) and the
padded rows masked out of the loss, whose mean divides by the real number of rows (a traced
value): training sets of nearby sizes run the same compiled L-BFGS programs. Only a small program
that pads the rows (and makes the transposed copy) is built per size.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kmjax._checks import choice, host_only, is_tracer, number
from kmjax._loop import run_in_pieces
from kmjax._ops import bucket
from kmjax.errors import InputError

__all__ = [
    "Standardizer", "fit_standardizer", "standardize",
    "STORAGES", "LinearModel", "svm_loss", "softmax_loss", "LOSSES", "TrainInfo", "LBFGSState", "init_lbfgs",
    "train_linear", "predict", "accuracy",
    "predict_features",
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
    host_only("fit_standardizer", "the mean and standard deviation of the features with jnp (this one sums "
              "in float64 on the host)", features)
    f = features
    if np.ndim(f) != 2 or np.shape(f)[0] < 2:
        raise InputError(f"features must be (N, F) with N >= 2 to estimate a variance, got shape {np.shape(f)}")
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


STORAGES = ("float32", "bfloat16")  # the dtypes train_linear can hold its features in


def _bfloat16_head(v):
    """float32 ``v`` with its mantissa cut to bfloat16's 8 bits: exact in bfloat16, and ``v`` minus it
    exact in float32. Cut by masking the bits, not by a float32 -> bfloat16 -> float32 round trip,
    which a compiler may fold away (XLA's GPU pipeline simplifies such conversion pairs)."""
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _dot(a, b):
    """a @ b with float32 results. For bfloat16 ``a`` (features held in half the bytes), the float32
    ``b`` is split into three bfloat16 parts, b = b1 + b2 + b3 exactly (8 bits each of float32's
    24), multiplied in one product accumulated in float32: the float32 product of the rounded
    ``a`` with the exact ``b``. The objective is then a smooth function of the weights (no
    rounding of them), and an L-BFGS line search sees what it would in float32."""
    if a.dtype != jnp.bfloat16:
        return jnp.matmul(a, b, precision=_HIGHEST)
    parts, rest = [], b.astype(jnp.float32)
    for _ in range(3):
        head = _bfloat16_head(rest)
        parts.append(head.astype(jnp.bfloat16))
        rest = rest - head
    out = jax.lax.dot(a, jnp.concatenate(parts, axis=1), preferred_element_type=jnp.float32)
    return out.reshape(a.shape[0], 3, b.shape[1]).sum(axis=1)


@jax.custom_vjp
def _scores(weights, x, xt):
    """x @ weights, whose gradient for the weights is computed as xt @ g.

    XLA's CPU product x.T @ g with the long N axis contracted runs at a third of the speed of
    the same product with x stored transposed; L-BFGS spends its time in exactly these two
    products, so training keeps a transposed copy of the features.
    """
    return _dot(x, weights)


def _scores_fwd(weights, x, xt):
    return _dot(x, weights), xt


def _scores_bwd(xt, g):
    return _dot(xt, g), None, None


_scores.defvjp(_scores_fwd, _scores_bwd)


def _product(weights, x, xt):
    # always through _scores: JAX's own transpose of _dot would round a bfloat16 x's gradient to bfloat16
    return _scores(weights, x, x.T if xt is None else xt)


def _row_mean(v, count):
    """Mean of ``v`` over its rows (axis 0); with ``count`` (traced), over its first ``count`` rows
    only: the rows after them are padding, masked out (their values, whatever they are, count 0)."""
    if count is None:
        return jnp.mean(v, axis=0)
    real = (jnp.arange(v.shape[0]) < count).reshape((-1,) + (1,) * (v.ndim - 1))
    return jnp.sum(jnp.where(real, v, 0.0), axis=0) / jnp.asarray(count, jnp.float32)


def svm_loss(weights, x, labels, C, xt=None, count=None):
    """One-vs-all L2-SVM, summed over classes: 1/2 ||W||^2 + C * mean_i sum_k margin_ik^2,
    margin = max(0, 1 - y_ik x_i.w_k), y = +1 for the true class, -1 otherwise.
    ``xt``: optionally x.T stored contiguously, for a faster gradient (same values).
    ``count``: optionally the number of real rows (the rest padding): the mean is over them."""
    y = 2.0 * jax.nn.one_hot(labels, weights.shape[1], dtype=jnp.float32) - 1.0
    margin = jnp.maximum(0.0, 1.0 - y * _product(weights, x, xt))
    return 0.5 * jnp.sum(weights * weights) + C * jnp.sum(_row_mean(margin * margin, count))


def softmax_loss(weights, x, labels, C, xt=None, count=None):
    """Multinomial logistic regression with the same scaling: 1/2 ||W||^2 + C * mean cross-entropy."""
    logits = _product(weights, x, xt)
    return 0.5 * jnp.sum(weights * weights) + C * _row_mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels), count
    )


LOSSES = {"svm": svm_loss, "logistic": softmax_loss}


class TrainInfo(NamedTuple):
    """loss: final objective. grad_norm: its gradient's norm. n_iter: L-BFGS iterations run."""

    loss: jax.Array
    grad_norm: jax.Array
    n_iter: jax.Array


class _Fit(NamedTuple):
    loss: str
    num_classes: int
    max_iter: int
    memory: int


def _objective(x, xt, labels, C, count, fit: _Fit):
    return partial(LOSSES[fit.loss], x=x, labels=labels, C=C, xt=xt, count=count)


class LBFGSState(NamedTuple):
    """Where an L-BFGS fit stands, a pytree to persist and continue from (``train_linear(state=)``).

    weights: (F + 1, classes) float32. optimizer: optax's L-BFGS state (its history of
    ``memory`` steps and its line search). grad_norm: () the gradient norm at the last step (inf
    before the first). iterations: () int32, the iterations run.
    """

    weights: jax.Array
    optimizer: optax.OptState
    grad_norm: jax.Array
    iterations: jax.Array


@partial(jax.jit, static_argnames=("num_weights", "num_classes", "memory"))
def init_lbfgs(num_weights: int, num_classes: int, memory: int = 20) -> LBFGSState:
    """The state before the first iteration: zero (num_weights, num_classes) weights (num_weights:
    the features plus the bias column) and an empty history of ``memory`` steps."""
    w0 = jnp.zeros((num_weights, num_classes), jnp.float32)
    return LBFGSState(w0, optax.lbfgs(memory_size=memory).init(w0), jnp.float32(jnp.inf), jnp.int32(0))


@partial(jax.jit, static_argnames=("fit",))
def _lbfgs_iterate(x, xt, labels, C, tol, count, state: LBFGSState, until, fit: _Fit) -> LBFGSState:
    """L-BFGS iterations from ``state`` until iteration ``until`` (traced: one compiled program
    however the loop is split), ``fit.max_iter``, or a gradient norm below ``tol``. ``count``: the
    real rows of the padded ``x`` (traced: one program per bucket of row counts)."""
    fun = _objective(x, xt, labels, C, count, fit)
    opt = optax.lbfgs(memory_size=fit.memory)
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(s: LBFGSState) -> LBFGSState:
        value, grad = value_and_grad(s.weights, state=s.optimizer)
        updates, optimizer = opt.update(grad, s.optimizer, s.weights, value=value, grad=grad, value_fn=fun)
        return LBFGSState(s.weights + updates, optimizer, optax.tree.norm(grad), s.iterations + 1)

    def cond(s: LBFGSState):
        return (s.iterations < jnp.minimum(until, fit.max_iter)) & (s.grad_norm > tol)

    return jax.lax.while_loop(cond, step, state)


@partial(jax.jit, static_argnames=("fit",))
def _lbfgs_finish(x, xt, labels, C, count, state: LBFGSState, fit: _Fit):
    value, grad = jax.value_and_grad(_objective(x, xt, labels, C, count, fit))(state.weights)
    return LinearModel(state.weights), TrainInfo(value, optax.tree.norm(grad), state.iterations)


@partial(jax.jit, static_argnames=("rows",))
def _padded(x, labels, rows: int):
    """The fit's arrays: x and labels padded with zero rows to ``rows``, the transposed copy of the
    padded x that the gradient reads (see _scores), and the labels' range (for the checks): the one
    program a fit builds per number of rows (the L-BFGS programs are built per bucket)."""
    pad = rows - x.shape[0]
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    return xp, xp.T.copy(), jnp.pad(labels, (0, pad)), jnp.min(labels), jnp.max(labels)


def train_linear(x, labels, *, loss: str = "svm", C: float = 100.0, num_classes: int | None = None,
                 max_iter: int = 1000, tol: float = 1e-3, memory: int = 20, storage: str = "float32",
                 progress=None, state: LBFGSState | None = None, checkpoint=None):
    """Train a linear classifier on standardized features with L-BFGS.

    Args:
      x: (N, F + 1) standardized features with the bias column (see ``standardize``).
      labels: (N,) int class indices in [0, num_classes).
      loss: "svm" (one-vs-all squared hinge) or "logistic" (softmax cross-entropy).
      C: weight of the data term against 1/2 ||W||^2 (larger: less regularization).
      num_classes: default max(labels) + 1.
      max_iter: L-BFGS iterations at most. tol: stop once the gradient norm is below it.
      memory: L-BFGS history length.
      storage: the dtype the features are held in while training, one of ``STORAGES``. Each
        L-BFGS evaluation reads them twice (x @ w and the gradient), and on CPUs it is bound by
        those bytes: "bfloat16" halves them (and the training copies' memory) and runs 2-3x
        faster, fitting the features rounded to bfloat16 with float32 weights, products and
        objective (``_dot``). Pass bfloat16 ``x`` to keep no float32 copy at all.
      progress: optional ``progress(iteration, max_iter, loss)`` called every few iterations.
      state: an ``LBFGSState`` that ``checkpoint`` was given by an interrupted call with the same
        arguments: the loop continues from it (default: ``init_lbfgs``).
      checkpoint: optional ``checkpoint(state) -> LBFGSState | None``, given the ``LBFGSState``
        every few iterations, to persist it; what it returns (when not None: the same values) is
        the state the loop goes on with. With ``progress`` or ``checkpoint`` the loop runs in
        pieces of the same compiled program: the same numbers (``kmjax._loop.run_in_pieces``).

    Works inside ``jax.jit`` when ``num_classes`` is given (the values of traced labels and C are
    then not checked).

    Returns:
      (LinearModel, TrainInfo).
    """
    choice(loss, LOSSES, "loss")
    choice(storage, STORAGES, "storage")
    x = jnp.asarray(x, jnp.dtype(storage))
    # host labels converted on the host: a conversion on the device would be a program per row count
    labels = jnp.asarray(labels if isinstance(labels, jax.Array) else np.asarray(labels, np.int32), jnp.int32)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise InputError(f"x must be (N, F) and labels (N,), got {x.shape} and {labels.shape}")
    if not is_tracer(C):
        number(C, "C", above=0)
    if num_classes is None and is_tracer(labels):
        raise InputError("inside jax.jit, pass num_classes: it cannot be read from traced labels")
    n = x.shape[0]
    x, xt, labels, lo, hi = _padded(x, labels, bucket(n))
    if not is_tracer(labels):
        lo, hi = (int(v) for v in jax.device_get((lo, hi)))  # one explicit pull, of two numbers
        num_classes = hi + 1 if num_classes is None else num_classes
        if lo < 0 or hi >= num_classes:
            raise InputError(f"labels must lie in [0, {num_classes}), got {lo}..{hi}")
    fit = _Fit(loss, int(num_classes), int(max_iter), int(memory))
    start = init_lbfgs(x.shape[1], fit.num_classes, fit.memory)
    if state is not None:
        state = _check_state(state, start)
    C, tol = jnp.float32(C), jnp.float32(tol)
    # the real row count, traced (sent explicitly): one L-BFGS program per bucket of row counts
    count = jnp.int32(n) if is_tracer(x) else jax.device_put(np.int32(n))
    reports = progress is not None or checkpoint is not None
    state = run_in_pieces(lambda s, until: _lbfgs_iterate(x, xt, labels, C, tol, count, s, jnp.int32(until), fit),
                          start if state is None else state, fit.max_iter, done=lambda s: int(s.iterations),
                          stopped=lambda s: not float(s.grad_norm) > float(tol), progress=progress,
                          checkpoint=checkpoint, every=_REPORT_EVERY if reports else None,
                          # the objective at the current weights, as the line search left it in the optimizer state
                          value=lambda s: float(np.asarray(optax.tree_utils.tree_get(s.optimizer, "value"))))
    return _lbfgs_finish(x, xt, labels, C, count, state, fit)


def _check_state(state, start: LBFGSState) -> LBFGSState:
    """A saved ``LBFGSState`` as arrays of the structure, shapes and dtypes of this call's ``start``."""
    leaves, treedef = jax.tree.flatten(state)
    want, want_def = jax.tree.flatten(start)
    if treedef != want_def or any(np.shape(a) != np.shape(b) for a, b in zip(leaves, want)):
        raise InputError("state is not an L-BFGS state of this call: it must come from a call with the same "
                         f"features' width, num_classes and memory; got shapes {[np.shape(a) for a in leaves]}")
    return jax.tree.unflatten(want_def, [jnp.asarray(a, b.dtype) for a, b in zip(leaves, want)])


_REPORT_EVERY = 10  # L-BFGS iterations between progress reports


@jax.jit
def predict(model: LinearModel, x):
    """Class index of each row of (N, F + 1) standardized features."""
    return jnp.argmax(jnp.matmul(x, model.weights, precision=_HIGHEST), axis=1).astype(jnp.int32)


def accuracy(model: LinearModel, x, labels) -> float:
    """Fraction of rows whose predicted class equals the label (a Python float: host-level)."""
    host_only("accuracy", "jnp.mean(kmjax.predict(model, x) == labels)", x, labels)
    return float(jnp.mean(predict(model, x) == jnp.asarray(labels)))


@jax.jit
def raw_scores(standardizer: Standardizer, model: LinearModel, features):
    return jnp.matmul(standardize(standardizer, features), model.weights, precision=_HIGHEST)


def predict_features(standardizer: Standardizer, model: LinearModel, features, block: int = 4096,
                     mirrors=None) -> np.ndarray:
    """Class index of each row of raw (N, F) features, standardized and scored ``block`` rows at a
    time: the (N, F + 1) standardized copy of a large data set is never made.

    mirrors: optional (N, F) features of the same images mirrored: each image's class is then the
    best of the two views' summed scores (test-time averaging over an image and its mirror).

    Every block is padded to ``block`` rows, so a whole run compiles the scoring once per feature
    width, whatever its data sizes.
    """
    host_only("predict_features", "kmjax.predict(model, kmjax.standardize(standardizer, features))", features)
    n, size = features.shape[0], block
    if mirrors is not None and np.shape(mirrors) != np.shape(features):
        raise InputError(f"mirrors must have the features' shape {np.shape(features)}, got {np.shape(mirrors)}")

    # sent once, explicitly (host arrays would be sent again with every block); per block one explicit
    # transfer of its rows and one pull of their scores (tests/test_residency.py)
    standardizer, model = jax.device_put((standardizer, model))

    def scores(x, i):
        rows = np.asarray(x[i : i + size], np.float32)
        if rows.shape[0] < size:
            rows = np.concatenate([rows, np.zeros((size - rows.shape[0], rows.shape[1]), np.float32)])
        return jax.device_get(raw_scores(standardizer, model, jax.device_put(rows)))

    out = np.empty(n, np.int32)
    for i in range(0, n, size):
        s = scores(features, i) if mirrors is None else scores(features, i) + scores(mirrors, i)
        out[i : i + size] = np.argmax(s, axis=1)[: min(size, n - i)]
    return out
