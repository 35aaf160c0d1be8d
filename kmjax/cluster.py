"""Lloyd's k-means and its spherical (gain-shape, OMP-1) variant, chunked and jit-compiled.

Every pass over the data is a ``lax.scan`` over fixed-size chunks of points. Within a chunk the
distances are one matrix product, (chunk, D) x (D, K), so peak memory is O(chunk * K) whatever N
is, and the hot loop is GEMM-shaped on every backend. Squared distances use
||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2): the nearest centroid maximizes x.c - ||c||^2 / 2.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import check_matrix, is_tracer, positive_int
from kmjax._ops import check_precision, matmul, max_argmax
from kmjax._pallas import check_kernel, nearest_pallas

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["KMeansResult", "LloydSpec", "kmeans", "assign", "init_centroids", "prepare_kmeans", "INITS",
           "EMPTY_POLICIES", "UPDATES", "KERNELS"]

INITS = ("k-means++", "random", "randn")
EMPTY_POLICIES = ("reseed", "zero")
# How a pass adds the points to their centroids' sums: "scatter" (segment_sum; a sequential loop on
# CPUs, atomic adds on GPUs, whose order varies from run to run) or "matmul" (one-hot^T @ points:
# GEMM-shaped, and deterministic on every backend).
UPDATES = ("scatter", "matmul")
# How a pass finds each point's nearest centroid: "xla" (a chunk's scores from one product, then
# their row maximum) or "pallas" (one fused kernel keeping a running best per row; kmjax/_pallas.py).
KERNELS = ("xla", "pallas")
# Scores per chunk: on a CPU about 8 MB of float32 (cache-sized); on an accelerator as wide as
# 256 MB allows (at K = 1600, 40,000 rows per product instead of hundreds of small products).
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "accelerator": 1 << 26}


class KMeansResult(NamedTuple):
    """Output of ``kmeans``.

    centroids: (K, D) float32.
    counts: (K,) float32, points (total weight) per centroid in the final assignment.
    inertia: () float32, sum of weighted squared distances to the final centroids (spherical:
      the residual ||x||^2 - (c.x)^2 of the best one-atom reconstruction).
    objective: (max_iter,) float32, the objective of the centroids at the start of each
      iteration; NaN after the last iteration run. Never increases.
    n_iter: () int32, iterations run.
    converged: () bool, whether the relative decrease of the objective fell to ``tol``.
    """

    centroids: jax.Array
    counts: jax.Array
    inertia: jax.Array
    objective: jax.Array
    n_iter: jax.Array
    converged: jax.Array


def _default_chunk(n: int, k: int) -> int:
    elements = _CHUNK_ELEMENTS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
    return int(min(max(256, elements // max(k, 1)), n))


def _default_update() -> str:
    """"scatter" on CPUs (measured faster there, and deterministic), "matmul" on accelerators
    (same seed, same bits: GPU scatter-adds are atomic and their order varies)."""
    return "scatter" if jax.default_backend() == "cpu" else "matmul"


def _chunks(x, chunk, body, init):
    """Scan ``body(carry, xc, real, start)`` over ``chunk``-row windows of x, read in place.

    No padded copy of x is made: the last window is shifted back to end at row N, and ``real``
    marks the rows that the previous window did not already cover.
    """
    n = x.shape[0]
    n_chunks = -(-n // chunk)

    def step(carry, i):
        start = jnp.minimum(i * chunk, n - chunk)
        xc = jax.lax.dynamic_slice_in_dim(x, start, chunk)
        real = start + jnp.arange(chunk) >= i * chunk
        return body(carry, xc, real, start)

    carry, out = jax.lax.scan(step, init, jnp.arange(n_chunks))
    # (n_chunks, chunk, ...) per-row outputs -> (N, ...): drop the last window's repeated rows
    out = jax.tree.map(lambda a: jnp.concatenate([a[:-1].reshape((-1,) + a.shape[2:]),
                                                  a[-1, n_chunks * chunk - n :]]), out)
    return carry, out


class LloydSpec(NamedTuple):
    """The static settings of a Lloyd run, one hashable value (a ``jit`` static argument).

    max_iter, chunk_size, empty, spherical, precision, update, kernel: as ``kmeans``. weighted: whether
    the passes multiply by point weights (False: unit weights, no multiply in the hot loop). m:
    min(K, N) re-seeding candidates (global N).
    """

    max_iter: int
    chunk_size: int
    empty: str
    spherical: bool
    precision: str
    weighted: bool
    m: int
    update: str = "scatter"
    kernel: str = "xla"


def _nearest(xc, centroids, spec: LloydSpec):
    """Best score, index (lowest on ties) and signed projection onto it, for a chunk of rows.

    Lloyd: maximize x.c - ||c||^2 / 2. Spherical (OMP-1): maximize |x.c|.
    """
    if spec.kernel == "pallas":

        best, index, code = nearest_pallas(xc, centroids, spherical=spec.spherical, precision=spec.precision)
        return best, index, code if spec.spherical else None
    proj = matmul(xc, centroids.T, spec.precision)
    scores = jnp.abs(proj) if spec.spherical else proj - 0.5 * jnp.sum(centroids * centroids, axis=1)
    best, index = max_argmax(scores)
    code = jnp.take_along_axis(proj, index[:, None], axis=1)[:, 0] if spec.spherical else None
    return best, index, code


def _accumulate(x, w, centroids, spec: LloydSpec, axis_name=None):
    """The Lloyd pass: per-centroid sums and weights, and sum_i w_i * best_i.

    Sums are of w x (Lloyd) or of w (c.x) x (spherical); with ``w`` None all weights are 1.
    The objective follows without per-point output: sum w ||x||^2 - 2 sum w best (Lloyd),
    sum w ||x||^2 - sum w best^2 (spherical).
    """
    k, d = centroids.shape
    chunk = spec.chunk_size

    def body(carry, xc, real, start):
        sums, weights, total = carry
        wc = real.astype(jnp.float32)
        if w is not None:
            wc = wc * jax.lax.dynamic_slice_in_dim(w, start, chunk)
        best, index, code = _nearest(xc, centroids, spec)
        if spec.spherical:
            contrib, gain = xc * (code * wc)[:, None], best * best
        else:
            contrib, gain = (xc if w is None else xc * wc[:, None]), 2.0 * best
        target = jnp.where(real, index, k)  # index k is dropped by segment_sum / one_hot
        if spec.update == "matmul":
            onehot = jax.nn.one_hot(target, k, dtype=jnp.float32)
            if spec.spherical or w is not None:
                part = jnp.matmul(onehot.T, contrib, precision=_HIGHEST)
                counts = jnp.matmul(onehot.T, wc, precision=_HIGHEST)
            else:
                part, counts = jnp.matmul(onehot.T, xc, precision=_HIGHEST), jnp.sum(onehot, axis=0)
        else:
            part, counts = jax.ops.segment_sum(contrib, target, k), jax.ops.segment_sum(wc, target, k)
        carry = (sums + part, weights + counts, total + jnp.sum(wc * gain))
        return carry, None

    init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.float32), jnp.float32(0.0))
    if axis_name is not None:  # the running sums differ between devices until the psum
        init = jax.lax.pcast(init, axis_name, to="varying")
    out = _chunks(x, chunk, body, init)[0]
    return out if axis_name is None else jax.lax.psum(out, axis_name)


def _assign_rows(x, centroids, spec: LloydSpec):
    """Per-row nearest index and error (squared distance; spherical: ||x||^2 - (c.x)^2)."""

    def body(carry, xc, real, start):
        best, index, code = _nearest(xc, centroids, spec)
        sq = jnp.sum(xc * xc, axis=1)
        err = sq - code * code if spec.spherical else sq - 2.0 * best
        return carry, (index, jnp.maximum(err, 0.0))  # rounding can take a zero distance below 0

    return _chunks(x, spec.chunk_size, body, None)[1]


def _normalize_rows(c):
    norm = jnp.linalg.norm(c, axis=1, keepdims=True)
    return jnp.where(norm > 0, c / jnp.where(norm > 0, norm, 1.0), 0.0)


def _worst_served(x, w, centroids, spec: LloydSpec, axis_name):
    """The m points worst served by ``centroids``, worst first (never a zero-weight point).

    Sharded: each device proposes its own m worst; the candidates, gathered in device order,
    keep global row order among equal errors, so the result is the same as on one device.
    """
    m = spec.m
    _, err = _assign_rows(x, centroids, spec)
    err, idx = jax.lax.top_k(jnp.where(w > 0, err, -1.0), min(m, x.shape[0]))
    if axis_name is None:
        return x[idx]
    # "invarying": the gathered candidates are the same on every device, so is their choice
    err = jax.lax.all_gather(err, axis_name, tiled=True, to="invarying")
    cand = jax.lax.all_gather(x[idx], axis_name, tiled=True, to="invarying")
    return cand[jax.lax.top_k(err, m)[1]]


def _update(x, w, centroids, sums, weights, spec: LloydSpec, axis_name=None):
    """New centroids from a pass's (global) sums; empty clusters zeroed or re-seeded.

    Re-seeding: the j-th empty cluster takes the j-th point worst served by the current
    centroids (m = min(K, N) candidates). It needs per-point errors: one more pass over the
    data, run only in iterations that leave a cluster empty.
    """
    is_empty = weights <= 0
    if spec.spherical:
        new = _normalize_rows(sums)
    else:
        new = sums / jnp.where(is_empty, 1.0, weights)[:, None]
    if spec.empty == "zero":
        return jnp.where(is_empty[:, None], 0.0, new)

    def reseed(new):
        seeds = _worst_served(x, w, centroids, spec, axis_name)
        seeds = seeds[jnp.clip(jnp.cumsum(is_empty) - 1, 0, spec.m - 1)]
        if spec.spherical:
            seeds = _normalize_rows(seeds)
        return jnp.where(is_empty[:, None], seeds, new)

    return jax.lax.cond(is_empty.any(), reseed, lambda c: c, new)


class _LoopState(NamedTuple):
    centroids: jax.Array
    objective: jax.Array
    it: jax.Array
    converged: jax.Array


def _start(centroids, spec: LloydSpec) -> _LoopState:
    return _LoopState(centroids.astype(jnp.float32), jnp.full((spec.max_iter,), jnp.nan, jnp.float32), jnp.int32(0),
                      jnp.bool_(False))


def _prepared(x, w, spec: LloydSpec, axis_name):
    """float32 points, their weights, the weights a pass multiplies by (None: unit weights, no multiply
    in the hot loop) and sum w ||x||^2 (global)."""
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    total_sq = jnp.sum(w * jnp.sum(x * x, axis=1))
    if axis_name is not None:
        total_sq = jax.lax.psum(total_sq, axis_name)
    return x, w, (w if spec.weighted else None), total_sq


def _lloyd_iterate(x, w, state: _LoopState, tol, until, spec: LloydSpec, axis_name=None) -> _LoopState:
    """Lloyd iterations from ``state`` until iteration ``until`` (a traced number: one compiled
    program for any split of the loop), ``spec.max_iter``, or convergence."""
    x, w, pass_w, total_sq = _prepared(x, w, spec, axis_name)

    def cond(s):
        return (s.it < jnp.minimum(until, spec.max_iter)) & ~s.converged

    def body(s):
        sums, weights, total = _accumulate(x, pass_w, s.centroids, spec, axis_name)
        obj = jnp.maximum(total_sq - total, 0.0)
        prev = s.objective[jnp.maximum(s.it - 1, 0)]
        converged = (s.it > 0) & ((prev - obj) <= tol * jnp.abs(prev))
        new = _update(x, w, s.centroids, sums, weights, spec, axis_name)
        return _LoopState(new, s.objective.at[s.it].set(obj), s.it + 1, converged)

    return jax.lax.while_loop(cond, body, state) if spec.max_iter else state  # 0: the init is the result


def _lloyd_finish(x, w, state: _LoopState, spec: LloydSpec, axis_name=None) -> KMeansResult:
    """The final pass: counts and inertia of the last centroids."""
    x, w, pass_w, total_sq = _prepared(x, w, spec, axis_name)
    _, weights, total = _accumulate(x, pass_w, state.centroids, spec, axis_name)
    return KMeansResult(state.centroids, weights, jnp.maximum(total_sq - total, 0.0), state.objective, state.it,
                        state.converged)


def _lloyd_loop(x, w, centroids, tol, spec: LloydSpec, axis_name=None) -> KMeansResult:
    """Lloyd iterations until ``spec.max_iter`` or convergence, then a final pass for the inertia.

    The one implementation of the loop: on one device as the compiled pieces ``_lloyd_iterate`` and
    ``_lloyd_finish`` (see ``kmeans``), and inside ``shard_map`` with ``axis_name`` on a shard of the
    points per device (``kmjax.parallel``), where every pass's sums are ``psum``-ed, so that the
    centroids and the whole loop state stay identical on all devices.
    """
    state = _lloyd_iterate(x, w, _start(centroids, spec), tol, spec.max_iter, spec, axis_name)
    return _lloyd_finish(x, w, state, spec, axis_name)


_lloyd_iterate_jit = jax.jit(_lloyd_iterate, static_argnames=("spec", "axis_name"))
_lloyd_finish_jit = jax.jit(_lloyd_finish, static_argnames=("spec", "axis_name"))


@partial(jax.jit, static_argnames=("k", "method", "spherical"))
def _init(key, x, w, *, k, method, spherical):
    x = x.astype(jnp.float32)
    n, d = x.shape
    if method == "randn":  # the authors' code: randn(K, D) * 0.1
        c = 0.1 * jax.random.normal(key, (k, d), jnp.float32)
    elif method == "random":  # k distinct points, drawn in proportion to their weight
        c = x[jax.random.choice(key, n, (k,), replace=False, p=w / w.sum())]
    else:  # k-means++ (Arthur & Vassilvitskii 2007): sample in proportion to w * D(x)^2
        sq = jnp.sum(x * x, axis=1)
        key, first = jax.random.split(key)
        c0 = x[jax.random.choice(first, n, p=w / w.sum())]

        def d2(c):
            return jnp.maximum(sq - 2.0 * jnp.matmul(x, c, precision=jax.lax.Precision.HIGHEST) + c @ c, 0.0)

        def step(i, carry):
            c, dist, key = carry
            key, sub = jax.random.split(key)
            p = w * dist
            # Fewer distinct points than k: every distance is zero, fall back to the weights.
            p = jnp.where(p.sum() > 0, p, w)
            ci = x[jax.random.choice(sub, n, p=p / p.sum())]
            return c.at[i].set(ci), jnp.minimum(dist, d2(ci)), key

        c = jnp.zeros((k, d), jnp.float32).at[0].set(c0)
        c, _, _ = jax.lax.fori_loop(1, k, step, (c, d2(c0), key))
    return _normalize_rows(c) if spherical else c


def _check_k(x, k) -> int:
    k = positive_int(k, "k")
    n = np.shape(x)[0]
    if k > n:
        raise ValueError(f"k={k} is larger than the number of points ({n}); use k <= {n}")
    return k


def _weights(x, weights):
    """(N,) float32 weights, ones by default; values checked on concrete arrays."""
    if weights is None:
        return jnp.ones((x.shape[0],), jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (x.shape[0],):
        raise ValueError(f"weights must have shape ({x.shape[0]},) to match x, got {w.shape}")
    if not is_tracer(w) and (not bool(jnp.all(jnp.isfinite(w) & (w >= 0))) or not float(w.sum()) > 0):
        raise ValueError("weights must be finite, >= 0 and not all zero")
    return w


def init_centroids(key, x, k: int, method: str = "k-means++", *, weights=None, spherical: bool = False):
    """Starting centroids for ``kmeans``.

    Args:
      key: a ``jax.random`` key.
      x: (N, D) points.
      k: number of centroids.
      method: "k-means++" (D^2 sampling), "random" (k distinct points) or "randn" (the
        authors' 0.1 * standard normal; independent of the data).
      weights: optional (N,) non-negative point weights.
      spherical: normalize the centroids to unit length.

    Returns:
      (k, D) float32.
    """
    check_matrix(x)
    x = jnp.asarray(x)
    k = _check_k(x, k)
    if method not in INITS:
        raise ValueError(f"unknown init {method!r}; choose one of {INITS} or pass a (k, D) array")
    return _init(key, x, _weights(x, weights), k=k, method=method, spherical=spherical)


def prepare_kmeans(x, k, *, init, max_iter, tol, chunk_size, empty, spherical, weights, precision,
                   update=None, kernel: str = "xla", shards: int = 1):
    """Check the arguments of a k-means call; return (k, init array or name, tol, LloydSpec).

    The one argument-checking path of ``kmeans`` and ``kmjax.parallel.kmeans_sharded`` (whose
    passes each see the rows of one of ``shards`` devices, which sets the default chunk), so the
    two accept and refuse the same inputs with the same messages.
    """
    check_matrix(x)
    n, d = np.shape(x)
    k = _check_k(x, k)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    check_precision(precision)
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty-cluster policy {empty!r}; choose one of {EMPTY_POLICIES}")
    update = _default_update() if update is None else update
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose one of {UPDATES}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    check_kernel(kernel)
    rows = -(-n // shards)
    chunk_size = _default_chunk(rows, k) if chunk_size is None else positive_int(chunk_size, "chunk_size")
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS} or pass a (k, D) array")
    else:
        init = jnp.asarray(init, jnp.float32) if is_tracer(init) else np.asarray(init, np.float32)
        if init.shape != (k, d):
            raise ValueError(f"init array must have shape (k, D) = ({k}, {d}), got {init.shape}")
        check_matrix(init, "init")
    if tol is not None and not (is_tracer(tol) or tol >= 0):
        raise ValueError(f"tol must be >= 0 or None, got {tol!r}")
    tol = jnp.float32(-jnp.inf if tol is None else tol)
    spec = LloydSpec(max_iter=int(max_iter), chunk_size=int(min(chunk_size, rows)), empty=empty,
                     spherical=bool(spherical), precision=precision, weighted=weights is not None,
                     m=min(k, n), update=update, kernel=kernel)
    return k, init, tol, spec


def kmeans(
    key,
    x,
    k: int,
    *,
    init="k-means++",
    max_iter: int = 100,
    tol: float | None = 1e-4,
    chunk_size: int | None = None,
    empty: str = "reseed",
    spherical: bool = False,
    weights=None,
    precision: str = "float32",
    update: str | None = None,
    kernel: str = "xla",
    progress=None,
) -> KMeansResult:
    """Lloyd's k-means on (N, D) points, in bounded memory.

    Works as it is inside ``jax.jit`` (with ``k`` and the options static); values of traced
    arguments (finiteness, weights) are then not checked.

    Args:
      key: a ``jax.random`` key (used by the init only).
      x: (N, D) points; finite values.
      k: number of centroids, 1 <= k <= N.
      init: "k-means++", "random", "randn" (see ``init_centroids``) or a (k, D) array of
        starting centroids, to compare runs with other libraries.
      max_iter: maximum number of Lloyd iterations; 0 returns the initial centroids (with their
        counts and inertia): with ``init="random"`` and ``spherical=True``, a dictionary of random
        unit-norm data points.
      tol: stop when the objective decreased by at most ``tol`` times its previous value in an
        iteration (0 stops at a fixed point); None never stops early.
      chunk_size: points per matrix product; memory is O(chunk_size * k). Default: about 2M
        scores per chunk on a CPU (cache-sized), 64M (256 MB) on an accelerator.
      empty: "reseed" moves an empty cluster onto the point worst served by the current
        centroids (distinct points for distinct clusters); "zero" sets it to the origin, as
        the authors' code does.
      spherical: the gain-shape / OMP-1 variant of the authors' later work: unit-norm
        centroids, assignment by the largest |c.x|, update c <- normalize(sum (c.x) x).
      weights: optional (N,) non-negative point weights.
      precision: of the distance products: "float32" (default), "tf32" (the backend's default:
        TF32 on recent NVIDIA GPUs) or "bfloat16" (bf16 operands, float32 accumulation).
      update: how each pass sums the points per centroid: "scatter" or "matmul" (see ``UPDATES``);
        default "scatter" on CPUs, "matmul" on accelerators (deterministic there).
      kernel: how each pass finds the nearest centroids: "xla" (default: a chunk's scores from one
        product, then their row maximum) or "pallas" (one fused kernel that never writes the
        scores; see ``kmjax/_pallas.py``: interpreted, slowly, on a CPU; compiled with Triton on GPUs;
        refused on TPUs).
      progress: optional ``progress(iteration, max_iter, objective)`` called after each iteration
        (the loop then runs one iteration per call of the same compiled program: the same numbers,
        nothing compiled again for a new function, and no host callback inside the program, which
        would keep JAX's persistent cache from storing it).

    Returns:
      ``KMeansResult``.
    """
    k, init, tol, spec = prepare_kmeans(x, k, init=init, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                                        empty=empty, spherical=spherical, weights=weights, precision=precision,
                                        update=update, kernel=kernel)
    x = jnp.asarray(x)
    w = _weights(x, weights)
    c0 = init_centroids(key, x, k, init, weights=w, spherical=spherical) if isinstance(init, str) else init
    state = _start(jnp.asarray(c0), spec)
    if progress is None:  # the whole loop in one call
        state = _lloyd_iterate_jit(x, w, state, tol, jnp.int32(spec.max_iter), spec)
    else:  # the same compiled loop, one iteration per call: a report between calls, no host callback
        while (it := int(state.it)) < spec.max_iter and not bool(state.converged):  # host reads: nothing compiles
            state = _lloyd_iterate_jit(x, w, state, tol, jnp.int32(it + 1), spec)
            progress(it + 1, spec.max_iter, float(np.asarray(state.objective)[it]))
    return _lloyd_finish_jit(x, w, state, spec)


@partial(jax.jit, static_argnames=("spec",))
def _assign(x, centroids, spec):
    return _assign_rows(x.astype(jnp.float32), centroids.astype(jnp.float32), spec)


def assign(x, centroids, *, chunk_size: int | None = None, spherical: bool = False,
           precision: str = "float32"):
    """Nearest centroid of each point, in bounded memory.

    Args:
      x: (N, D) points.
      centroids: (K, D).
      chunk_size: points per matrix product (memory O(chunk_size * K)).
      spherical: assign by the largest |c.x| (unit-norm centroids) instead of distance.

    Returns:
      index: (N,) int32, the nearest centroid (lowest index on ties).
      sqdist: (N,) float32, squared distance to it (spherical: ||x||^2 - (c.x)^2).
    """
    check_matrix(x)
    check_matrix(centroids, "centroids")
    check_precision(precision)
    x, centroids = jnp.asarray(x), jnp.asarray(centroids)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {centroids.shape[1]} but x has {x.shape[1]}")
    if chunk_size is None:
        chunk_size = _default_chunk(x.shape[0], centroids.shape[0])
    chunk_size = min(positive_int(chunk_size, "chunk_size"), x.shape[0])
    spec = LloydSpec(max_iter=1, chunk_size=chunk_size, empty="zero", spherical=bool(spherical),
                     precision=precision, weighted=False, m=1)
    return _assign(x, centroids, spec)
