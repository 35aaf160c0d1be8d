"""The compiled core of Lloyd's k-means: passes over the points in fixed-size chunks, the update,
the loop; ``kmjax.cluster`` is its host-side API (argument checks, defaults, devices).

Every pass over the data is a ``lax.scan`` over fixed-size chunks of points. Within a chunk the
nearest centroids come from ``kmjax.nearest`` (one (chunk, D) x (D, K) product), so peak memory is
O(chunk * K) whatever N is, and the hot loop is GEMM-shaped on every backend.

Every function takes an ``axis_name``: None on one device; inside ``shard_map``, on a shard of the
points per device, the mesh axis whose every pass ``psum``s the sums, so that the centroids and the
whole loop state stay identical on all devices.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kmjax.nearest import nearest

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["KMeansResult", "LloydSpec", "LoopState", "start", "iterate", "finish", "assign_rows", "draw_init"]


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


def chunks(x, chunk, body, init):
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


def accumulate(x, w, centroids, spec: LloydSpec, axis_name=None):
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
        best, index, code = nearest(xc, centroids, spherical=spec.spherical, precision=spec.precision, kernel=spec.kernel)
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
    out = chunks(x, chunk, body, init)[0]
    return out if axis_name is None else jax.lax.psum(out, axis_name)


def assign_rows(x, centroids, spec: LloydSpec):
    """Per-row nearest index and error (squared distance; spherical: ||x||^2 - (c.x)^2)."""

    def body(carry, xc, real, start):
        best, index, code = nearest(xc, centroids, spherical=spec.spherical, precision=spec.precision, kernel=spec.kernel)
        sq = jnp.sum(xc * xc, axis=1)
        err = sq - code * code if spec.spherical else sq - 2.0 * best
        return carry, (index, jnp.maximum(err, 0.0))  # rounding can take a zero distance below 0

    return chunks(x, spec.chunk_size, body, None)[1]


def _normalize_rows(c):
    norm = jnp.linalg.norm(c, axis=1, keepdims=True)
    return jnp.where(norm > 0, c / jnp.where(norm > 0, norm, 1.0), 0.0)


def _worst_served(x, w, centroids, spec: LloydSpec, axis_name):
    """The m points worst served by ``centroids``, worst first (never a zero-weight point).

    Sharded: each device proposes its own m worst; the candidates, gathered in device order,
    keep global row order among equal errors, so the result is the same as on one device.
    """
    m = spec.m
    _, err = assign_rows(x, centroids, spec)
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


class LoopState(NamedTuple):
    centroids: jax.Array
    objective: jax.Array
    it: jax.Array
    converged: jax.Array


def start(centroids, spec: LloydSpec) -> LoopState:
    return LoopState(centroids.astype(jnp.float32), jnp.full((spec.max_iter,), jnp.nan, jnp.float32), jnp.int32(0),
                      jnp.bool_(False))


def _prepared(x, w, spec: LloydSpec, axis_name):
    """float32 points, their weights, the weights a pass multiplies by (None: unit weights, no multiply
    in the hot loop) and sum w ||x||^2 (global)."""
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    total_sq = jnp.sum(w * jnp.sum(x * x, axis=1))
    if axis_name is not None:
        total_sq = jax.lax.psum(total_sq, axis_name)
    return x, w, (w if spec.weighted else None), total_sq


def iterate(x, w, state: LoopState, tol, until, spec: LloydSpec, axis_name=None) -> LoopState:
    """Lloyd iterations from ``state`` until iteration ``until`` (a traced number: one compiled
    program for any split of the loop), ``spec.max_iter``, or convergence."""
    x, w, pass_w, total_sq = _prepared(x, w, spec, axis_name)

    def cond(s):
        return (s.it < jnp.minimum(until, spec.max_iter)) & ~s.converged

    def body(s):
        sums, weights, total = accumulate(x, pass_w, s.centroids, spec, axis_name)
        obj = jnp.maximum(total_sq - total, 0.0)
        prev = s.objective[jnp.maximum(s.it - 1, 0)]
        converged = (s.it > 0) & ((prev - obj) <= tol * jnp.abs(prev))
        new = _update(x, w, s.centroids, sums, weights, spec, axis_name)
        return LoopState(new, s.objective.at[s.it].set(obj), s.it + 1, converged)

    return jax.lax.while_loop(cond, body, state) if spec.max_iter else state  # 0: the init is the result


def finish(x, w, state: LoopState, spec: LloydSpec, axis_name=None) -> KMeansResult:
    """The final pass: counts and inertia of the last centroids."""
    x, w, pass_w, total_sq = _prepared(x, w, spec, axis_name)
    _, weights, total = accumulate(x, pass_w, state.centroids, spec, axis_name)
    return KMeansResult(state.centroids, weights, jnp.maximum(total_sq - total, 0.0), state.objective, state.it,
                        state.converged)


@partial(jax.jit, static_argnames=("k", "method", "spherical"))
def draw_init(key, x, w, *, k, method, spherical):
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


