"""Linear classifiers trained with L-BFGS: feature standardization, one-vs-all L2-SVM and softmax
regression, prediction.

Both losses are minimized full-batch with optax's L-BFGS inside one jit-compiled
``lax.while_loop`` (stop at ``max_iter`` or when the gradient norm falls below ``tol``). A
constant-1 column is appended to the standardized features, so the bias is one more weight (and
is regularized with the rest, as in the authors' code).
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


def svm_loss(weights, x, labels, C, xt=None):
    """One-vs-all L2-SVM, summed over classes: 1/2 ||W||^2 + C * mean_i sum_k margin_ik^2,
    margin = max(0, 1 - y_ik x_i.w_k), y = +1 for the true class, -1 otherwise.
    ``xt``: optionally x.T stored contiguously, for a faster gradient (same values)."""
    y = 2.0 * jax.nn.one_hot(labels, weights.shape[1], dtype=jnp.float32) - 1.0
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


class _Fit(NamedTuple):
    loss: str
    num_classes: int
    max_iter: int
    memory: int


def _objective(x, xt, labels, C, fit: _Fit):
    return partial(LOSSES[fit.loss], x=x, labels=labels, C=C, xt=xt)


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
def _lbfgs_iterate(x, xt, labels, C, tol, state: LBFGSState, until, fit: _Fit) -> LBFGSState:
    """L-BFGS iterations from ``state`` until iteration ``until`` (traced: one compiled program
    however the loop is split), ``fit.max_iter``, or a gradient norm below ``tol``."""
    fun = _objective(x, xt, labels, C, fit)
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
def _lbfgs_finish(x, xt, labels, C, state: LBFGSState, fit: _Fit):
    value, grad = jax.value_and_grad(_objective(x, xt, labels, C, fit))(state.weights)
    return LinearModel(state.weights), TrainInfo(value, optax.tree.norm(grad), state.iterations)


# The transposed copy of the features that the gradient reads (see _scores), made once per fit.
_transpose = jax.jit(lambda x: x.T.copy())


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
    labels = jnp.asarray(labels, jnp.int32)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise InputError(f"x must be (N, F) and labels (N,), got {x.shape} and {labels.shape}")
    if not is_tracer(C):
        number(C, "C", above=0)
    if num_classes is None:
        if is_tracer(labels):
            raise InputError("inside jax.jit, pass num_classes: it cannot be read from traced labels")
        num_classes = int(labels.max()) + 1
    if not is_tracer(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    fit = _Fit(loss, int(num_classes), int(max_iter), int(memory))
    start = init_lbfgs(x.shape[1], fit.num_classes, fit.memory)
    if state is not None:
        state = _check_state(state, start)
    C, tol, xt = jnp.float32(C), jnp.float32(tol), _transpose(x)
    reports = progress is not None or checkpoint is not None
    state = run_in_pieces(lambda s, until: _lbfgs_iterate(x, xt, labels, C, tol, s, jnp.int32(until), fit),
                          start if state is None else state, fit.max_iter, done=lambda s: int(s.iterations),
                          stopped=lambda s: not float(s.grad_norm) > float(tol), progress=progress,
                          checkpoint=checkpoint, every=_REPORT_EVERY if reports else None,
                          # the objective at the current weights, as the line search left it in the optimizer state
                          value=lambda s: float(np.asarray(optax.tree_utils.tree_get(s.optimizer, "value"))))
    return _lbfgs_finish(x, xt, labels, C, state, fit)


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
def _scores_raw(standardizer: Standardizer, model: LinearModel, features):
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
        return jax.device_get(_scores_raw(standardizer, model, jax.device_put(rows)))

    out = np.empty(n, np.int32)
    for i in range(0, n, size):
        s = scores(features, i) if mirrors is None else scores(features, i) + scores(mirrors, i)
        out[i : i + size] = np.argmax(s, axis=1)[: min(size, n - i)]
    return out
