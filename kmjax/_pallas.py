"""The nearest centroid of each row in one fused Pallas kernel: a running best score and index per
row, the N x K scores never written to memory.

The plain path (``cluster._nearest``) computes a chunk's (rows, K) scores with one matrix product,
writes them, and reads them back for the row maximum and its index. Past some size that round
trip costs more than the product itself (on a GPU with TF32 products above all); the known remedy
(flash-kmeans, a Triton kernel) keeps, for a block of rows, the best score and index so far while
it walks over blocks of centroids, so only three numbers per row ever leave the kernel.

This is that kernel in Pallas: a grid over blocks of ``block_rows`` rows; inside, a loop over
blocks of ``block_k`` centroids, each a (block_rows, D) x (D, block_k) product followed by the
row maximum and its first index, merged into the running best (a later block wins only when
strictly better: the lowest index on ties, as ``jnp.argmax``). D is zero-padded to a power of two
and K to a multiple of ``block_k`` (padded centroids get an infinite penalty, so they never win),
as Triton blocks require.

Status: optional (``kmeans(kernel="pallas")``), and checked against the plain path by the tests
on the CPU, where Pallas runs in interpret mode (slowly: the CPU default stays "xla"). Its speed
on a GPU is not measured yet (``experiments/device_check.sh`` times it beside the plain path).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from kmjax._ops import matmul


def _kernel(x_ref, c_ref, pen_ref, best_ref, idx_ref, code_ref, *, block_k, n_blocks, spherical, precision):
    from jax.experimental import pallas as pl

    x = x_ref[...]
    rows = x.shape[0]

    def body(j, carry):
        best, idx, code = carry
        start = pl.multiple_of(j * block_k, block_k)
        proj = matmul(x, c_ref[pl.ds(start, block_k), :].T, precision)
        scores = (jnp.abs(proj) if spherical else proj) - pen_ref[pl.ds(start, block_k)][None, :]
        top = jnp.max(scores, axis=1)
        iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        first = jnp.min(jnp.where(scores == top[:, None], iota, block_k), axis=1)
        at = jnp.sum(jnp.where(iota == first[:, None], proj, 0.0), axis=1)  # the signed c.x there
        better = top > best
        return jnp.where(better, top, best), jnp.where(better, first + start, idx), jnp.where(better, at, code)

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.float32))
    best, idx, code = jax.lax.fori_loop(0, n_blocks, body, init)
    best_ref[...] = best
    idx_ref[...] = idx
    code_ref[...] = code


@partial(jax.jit, static_argnames=("spherical", "precision", "block_rows", "block_k"))
def nearest_pallas(x, centroids, *, spherical: bool, precision: str = "float32", block_rows: int = 128,
                   block_k: int = 128):
    """(best score, first index attaining it, c.x at that index) per row of x (N, D) against
    centroids (K, D): scores x.c - ||c||^2 / 2, or |x.c| when ``spherical``; the same as
    ``cluster._nearest`` up to the rounding of the products."""
    from jax.experimental import pallas as pl

    n, d = x.shape
    k = centroids.shape[0]
    dp = max(16, pl.next_power_of_2(d))
    kp = pl.cdiv(k, block_k) * block_k
    np_ = pl.cdiv(n, block_rows) * block_rows
    xp = jnp.zeros((np_, dp), jnp.float32).at[:n, :d].set(x)
    cp = jnp.zeros((kp, dp), jnp.float32).at[:k, :d].set(centroids)
    half = jnp.zeros((k,), jnp.float32) if spherical else 0.5 * jnp.sum(centroids * centroids, axis=1)
    pen = jnp.full((kp,), jnp.inf, jnp.float32).at[:k].set(half)
    kernel = partial(_kernel, block_k=block_k, n_blocks=kp // block_k, spherical=spherical, precision=precision)
    row = pl.BlockSpec((block_rows,), lambda i: (i,))
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((np_,), jnp.float32), jax.ShapeDtypeStruct((np_,), jnp.int32),
                   jax.ShapeDtypeStruct((np_,), jnp.float32)],
        grid=(np_ // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, dp), lambda i: (i, 0)), pl.BlockSpec((kp, dp), lambda i: (0, 0)),
                  pl.BlockSpec((kp,), lambda i: (0,))],
        out_specs=[row, row, row],
        interpret=jax.default_backend() == "cpu",  # Pallas has no CPU compiler: the kernel is interpreted
    )(xp, cp, pen)
    best, index, code = (o[:n] for o in out)
    return best, index, code
