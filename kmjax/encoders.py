"""Encoders: map whitened patches to feature vectors given a dictionary of centroids.

All take (M, D) patches and (K, D) centroids and are one matrix product plus elementwise work
(and, for ``nearest_q``, a threshold per row found by counting passes), so the largest arrays
they make are the size of their output.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import choice
from kmjax._ops import matmul
from kmjax.errors import InputError
from kmjax.nearest import nearest

__all__ = ["ENCODERS", "Encoder", "triangle", "hard", "soft_threshold", "nearest_q", "encode", "num_outputs"]


def triangle(x, centroids, precision: str = "float32"):
    """'Triangle' k-means: f_k = max(0, mean_j z_j - z_k) with z_k = ||x - c_k||.

    Args:
      x: (M, D) patches. centroids: (K, D).

    Returns:
      (M, K) float32, non-negative; on average about half the entries are zero.
    """
    proj = matmul(x, centroids.T, precision)
    sq = jnp.sum(x * x, axis=1, keepdims=True) - 2.0 * proj + jnp.sum(centroids * centroids, axis=1)
    z = jnp.sqrt(jnp.maximum(sq, 0.0))
    return jnp.maximum(jnp.mean(z, axis=1, keepdims=True) - z, 0.0)


def hard(x, centroids, precision: str = "float32"):
    """Hard assignment: the one-hot code of the nearest centroid, (M, K) float32."""
    _, index, _ = nearest(x, centroids, precision=precision)  # the first nearest on ties (e.g. zeroed centroids)
    return jax.nn.one_hot(index, centroids.shape[0], dtype=jnp.float32)


def soft_threshold(x, centroids, alpha: float = 0.25, precision: str = "float32"):
    """Soft threshold with both signs: [max(0, c.x - alpha), max(0, -c.x - alpha)], (M, 2K)."""
    proj = matmul(x, centroids.T, precision)
    return jnp.concatenate([jnp.maximum(proj - alpha, 0.0), jnp.maximum(-proj - alpha, 0.0)], axis=1)


def _order_keys(v):
    """float32 -> uint32 keys in the same order (for finite values; -0.0 just below +0.0)."""
    u = jax.lax.bitcast_convert_type(v, jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _from_keys(k):
    u = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(u, jnp.float32)


def _kth_smallest(s, q: int):
    """(...,) the (q + 1)-th smallest entry along the last axis of s (..., K), 0 <= q < K, ties
    counted with their multiplicity (``np.sort(s)[..., q]``), without sorting.

    A bracket lo < hi per row with c(lo) <= q < c(hi), c(t) = #{s <= t}, narrowed by counting
    passes at the point where the counts' linear interpolation reaches q + 1/2 (a midpoint when
    that falls outside, or when the same end moved three times running). It stops once the
    answer is one reduction away: c(lo) = q (the smallest entry above lo), c(hi) = q + 1 (the
    largest entry up to hi), or no float between lo and hi. About a dozen passes on real
    encoder scores, where ``lax.top_k`` or a sort costs 30-50x more on CPUs.
    """
    # Every decision is made by counts, i.e. by the caller's own comparisons (-0.0 == +0.0, and
    # subnormals == 0 where the backend flushes them, as XLA on CPUs); the order-preserving integer
    # keys only pick trial points, and with c(lo) < c(hi), lo and hi are never one value spelled twice.
    s = s.astype(jnp.float32)

    def count(t):
        return jnp.sum((s <= t[..., None]).astype(jnp.int32), axis=-1)

    lo, hi = jnp.min(s, axis=-1), jnp.max(s, axis=-1)
    c_lo, c_hi = count(lo), jnp.full(lo.shape, s.shape[-1], jnp.int32)

    def finished(lo, c_lo, hi, c_hi):
        return (c_lo >= q) | (c_hi == q + 1) | (_order_keys(hi) - _order_keys(lo) <= 1)

    def step(state):
        lo, c_lo, hi, c_hi, run = state
        done = finished(lo, c_lo, hi, c_hi)
        k_lo, k_hi = _order_keys(lo), _order_keys(hi)
        between = _from_keys(k_lo + ((k_hi - k_lo) >> 1))  # strictly inside unless finished
        t = lo + (hi - lo) * ((q + 0.5 - c_lo) / (c_hi - c_lo))
        t = jnp.where(jnp.abs(run) >= 3, 0.5 * (lo + hi), t)
        t = jnp.where((t > lo) & (t < hi), t, between)
        c_t = count(t)
        low = c_t <= q
        run = jnp.where(low, jnp.maximum(run, 0) + 1, jnp.minimum(run, 0) - 1)
        new = (jnp.where(low, t, lo), jnp.where(low, c_t, c_lo), jnp.where(low, hi, t), jnp.where(low, c_hi, c_t), run)
        return tuple(jnp.where(done, old, n) for old, n in zip(state, new))

    run = jnp.zeros(lo.shape, jnp.int32)
    lo, c_lo, hi, c_hi, _ = jax.lax.while_loop(lambda st: ~jnp.all(finished(*st[:4])), step,
                                               (lo, c_lo, hi, c_hi, run))
    above = jnp.min(jnp.where(s > lo[..., None], s, jnp.inf), axis=-1)
    upto = jnp.max(jnp.where(s <= hi[..., None], s, -jnp.inf), axis=-1)
    # c(lo) > q only at the start: the row minimum itself repeats more than q times
    return jnp.where(c_lo > q, lo, jnp.where(c_hi == q + 1, upto, above))


def nearest_q(x, centroids, q: int, precision: str = "float32"):
    """Q-nearest encoding with both signs (Thiry, Arbel, Belilovsky & Oyallon, ICLR 2021).

    Codes [1{c_k is among the q atoms nearest to x}, 1{c_k is among the q atoms nearest to -x}],
    nearness in squared Euclidean distance in the space of x and the centroids (whitened space
    for a kmjax dictionary; x and the atoms both have the ZCA mean removed there, so -x is the
    patch mirrored through the mean patch). ||x - c||^2 ranks the atoms as 1/2 ||c||^2 - x.c,
    ||-x - c||^2 as 1/2 ||c||^2 + x.c: one matrix product gives both.

    Ties as the reference's ``s < kthvalue(s, q + 1)``: atom k is coded 1 iff it is strictly
    nearer than the (q + 1)-th nearest atom, i.e. iff at most q atoms (itself included) are at
    least as near. Each half of a row has q ones, fewer when atoms tie across the boundary.

    Args:
      x: (M, D) patches. centroids: (K, D). q: atoms per sign, 1 <= q < K (a Python int: it is
        static). precision: of the matrix product (see ``kmjax.kmeans``).

    Returns:
      (M, 2K) float32 of zeros and ones, the "x" half first (the layout of ``soft_threshold``).
    """
    k = centroids.shape[0]
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q < k:
        raise InputError(f"nearest_q needs q, the atoms coded per sign, from 1 to K - 1 = {k - 1}, got {q!r}")
    proj = matmul(x, centroids.T, precision)
    half_sq = 0.5 * jnp.sum(centroids * centroids, axis=1)
    scores = jnp.stack([half_sq - proj, half_sq + proj], axis=1)  # (M, 2, K): x, then -x
    codes = scores < _kth_smallest(scores, int(q))[..., None]
    return codes.astype(jnp.float32).reshape(x.shape[0], 2 * k)


class Encoder(NamedTuple):
    """A registered encoder: ``fn(x, centroids, alpha, precision, **params)`` -> (M, outputs * K)
    codes, where ``params`` names the further ``FeatureSpec`` fields it reads (passed by keyword)."""

    fn: Callable
    outputs: int  # codes per centroid
    params: tuple = ()


# The vocabulary of encoders, defined once: the config schema, FeatureSpec checks and the
# scikit-learn adapter read it. A new encoder is one function and one entry here.
ENCODERS: dict[str, Encoder] = {
    "triangle": Encoder(lambda x, c, alpha, precision: triangle(x, c, precision), 1),
    "hard": Encoder(lambda x, c, alpha, precision: hard(x, c, precision), 1),
    "soft_threshold": Encoder(soft_threshold, 2),
    "nearest_q": Encoder(lambda x, c, alpha, precision, q: nearest_q(x, c, q, precision), 2, ("q",)),
}


def _lookup(encoder: str) -> Encoder:
    return ENCODERS[choice(encoder, ENCODERS, "encoder")]


def num_outputs(encoder: str, k: int) -> int:
    """Features per patch that ``encoder`` gives for a K-centroid dictionary."""
    return _lookup(encoder).outputs * k


def encode(x, centroids, encoder: str = "triangle", alpha: float = 0.25, precision: str = "float32", *, q: int = 0):
    """Dispatch on the encoder's name (one of ``ENCODERS``); ``q`` is read by "nearest_q" only."""
    entry = _lookup(encoder)
    params = {"q": q}
    return entry.fn(x, centroids, alpha, precision, **{name: params[name] for name in entry.params})
