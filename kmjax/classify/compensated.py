"""Compensated float32 arithmetic for the classifier's device path (``device.py``): sums carried as
float32 pairs (hi, lo) by Knuth's TwoSum, to about twice float32's digits without float64 (which
TPUs lack and consumer GPUs run at 1/32-1/64 of float32's rate); long contractions as float32
products of ``_TILE`` terms summed that way; loops over blocks of static width; and the refined
solve of a factored system. Pure functions of JAX arrays, traced inside ``device``'s programs."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Pair", "two_sum", "zeros", "value", "matmul", "over_blocks", "dot", "refined_solve"]

_HIGHEST = jax.lax.Precision.HIGHEST
_TILE = 2048  # terms per float32 product in the compensated contractions


class Pair(NamedTuple):
    """hi + lo, a float32 sum carried to about twice float32's precision: lo gathers the rounding
    errors of the additions into hi (it is not renormalized, so it may grow past half an ulp of hi;
    hi + lo is the value)."""

    hi: jax.Array
    lo: jax.Array


def two_sum(total: Pair, x) -> Pair:
    """total + x by Knuth's TwoSum: the rounding error of hi + x is exact in float32 and kept in lo
    (XLA does not reassociate floating-point sums, so the error terms survive compilation)."""
    s = total.hi + x
    v = s - total.hi
    return Pair(s, total.lo + ((total.hi - (s - v)) + (x - v)))


def zeros(shape) -> Pair:
    return Pair(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def over_blocks(size: int, block: int, step):
    """``step(start, width)`` over [0, size) in blocks: a fori_loop over the full blocks (one
    compiled body), then the tail with its own static width. step(start, width, carry) -> carry."""
    full = size // block

    def run(carry):
        if full:  # (a loop of no blocks would still trace a body of a block wider than the array)
            carry = jax.lax.fori_loop(0, full, lambda i, c: step(i * block, block, c), carry)
        return step(full * block, size - full * block, carry) if size % block else carry

    return run


def dot(a, b, tile: int = _TILE) -> Pair:
    """a @ b over the columns of a (m, n) and rows of b (n, c) as a compensated sum of float32
    products of ``tile`` terms each; b may be a Pair (both halves multiplied)."""
    parts = b if isinstance(b, Pair) else (b,)
    n = a.shape[1]

    def step(start, width, total):
        block = jax.lax.dynamic_slice_in_dim(a, start, width, axis=1)
        for part in parts:
            total = two_sum(total, matmul(block, jax.lax.dynamic_slice_in_dim(part, start, width, axis=0)))
        return total

    return over_blocks(n, tile, step)(zeros((a.shape[0], parts[0].shape[1])))


def value(p: Pair):
    return p.hi + p.lo


def refined_solve(a, factor, rhs, refine: int):
    """The solution of a x = rhs (a symmetric positive definite, float32; ``factor`` its Cholesky
    factor), refined ``refine`` times with compensated residuals; a compensated Pair."""
    cho = partial(jax.scipy.linalg.cho_solve, (factor, True))
    x = Pair(cho(rhs), jnp.zeros_like(rhs))
    for _ in range(refine):
        ax = dot(a, x)
        residual = (rhs - ax.hi) - ax.lo
        x = two_sum(x, cho(residual))
    return x
