"""The nearest centroid of each row: one function, ``nearest``, behind which sit the two ways of
computing it. k-means, the hard encoder, ``kmjax.assign`` (and through it the scikit-learn adapter
and the k-means benchmark's common scorer) all call it.

Scores: x.c - ||c||^2 / 2 (the nearest centroid maximizes it: ||x - c||^2 = ||x||^2 - 2 (x.c -
||c||^2 / 2)), or |x.c| for unit-norm atoms (``spherical``, OMP-1). Ties go to the lowest index.

kernel="xla": a block's (rows, K) scores from one matrix product, then their row maximum
(``kmjax._ops.max_argmax``). kernel="pallas": one fused kernel that never writes the scores. Past
some size the round trip of the scores through memory costs more than the product itself (on a GPU
with TF32 products above all); the known remedy (flash-kmeans, a Triton kernel) keeps, for a block
of rows, the best score and index so far while it walks over blocks of centroids, so only three
numbers per row ever leave the kernel. Here it is in Pallas: a grid over blocks of ``block_rows``
rows; inside, a loop over blocks of ``block_k`` centroids, each a (block_rows, D) x (D, block_k)
product followed by the row maximum and its first index, merged into the running best (a later
block wins only when strictly better). D is zero-padded to a power of two and K to a multiple of
``block_k`` (padded centroids get an infinite penalty, so they never win), as Triton blocks require.

Lowering of the fused kernel: chosen by the platform the program is lowered for
(``jax.lax.platform_dependent``), never by the default backend: on CPUs it runs interpreted (Pallas
has no CPU compiler; the numerical tests run it there); on NVIDIA and AMD GPUs it is compiled with
Triton, which suits this kernel: a grid over row blocks, each a loop over centroid blocks with a
(rows, D) x (D, K_b) product and row reductions, whose layouts Triton chooses (Mosaic GPU, the
default Pallas GPU lowering of this JAX, refuses the transposed block: "Unimplemented primitive ...
transpose"); TPUs are refused (``check_kernel``; the plain path is what XLA fuses there).
``tests/test_lowering.py`` exports it for CUDA and ROCm from a CPU, which fails if it does not lower.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from kmjax._checks import choice
from kmjax._ops import matmul, max_argmax
from kmjax.errors import InputError

__all__ = ["KERNELS", "nearest", "nearest_pallas", "check_kernel"]

# How the nearest centroids are found: "xla" (one product, then the row maximum) or "pallas" (fused).
KERNELS = ("xla", "pallas")


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


def check_kernel(kernel: str) -> None:
    """ValueError for an unknown kernel, or the fused one on a backend it does not compile for (TPUs)."""
    choice(kernel, KERNELS, "kernel")
    if kernel == "pallas" and jax.default_backend() == "tpu":
        raise InputError("kernel='pallas' is a GPU kernel (compiled with Triton; interpreted on CPUs); on a TPU use "
                         "kernel='xla', whose product and row maximum XLA fuses there")


@partial(jax.jit, static_argnames=("spherical", "precision", "block_rows", "block_k"))
def nearest_pallas(x, centroids, *, spherical: bool, precision: str = "float32", block_rows: int = 128,
                   block_k: int = 128):
    """(best score, first index attaining it, c.x at that index) per row of x (N, D) against
    centroids (K, D): scores x.c - ||c||^2 / 2, or |x.c| when ``spherical``; the same as
    ``nearest(kernel="xla")`` up to the rounding of the products."""
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

    def call(interpret, compiler_params=None):
        return tuple(pl.pallas_call(
            kernel,
            out_shape=[jax.ShapeDtypeStruct((np_,), jnp.float32), jax.ShapeDtypeStruct((np_,), jnp.int32),
                       jax.ShapeDtypeStruct((np_,), jnp.float32)],
            grid=(np_ // block_rows,),
            in_specs=[pl.BlockSpec((block_rows, dp), lambda i: (i, 0)), pl.BlockSpec((kp, dp), lambda i: (0, 0)),
                      pl.BlockSpec((kp,), lambda i: (0,))],
            out_specs=[row, row, row],
            interpret=interpret,
            compiler_params=compiler_params,
        )(xp, cp, pen))

    def triton():
        from jax.experimental.pallas import triton as pltriton

        return call(False, pltriton.CompilerParams(num_warps=4, num_stages=2))

    # Chosen by the platform the program is lowered for, never by the default backend (so a program
    # exported for a GPU from a CPU gets the compiled kernel, or fails to lower): CPUs interpret the
    # kernel (Pallas has no CPU compiler); GPUs compile it with Triton; TPUs run the plain path
    # (``kmeans`` refuses kernel="pallas" there, see ``check_kernel``).
    out = jax.lax.platform_dependent(cpu=lambda: call(True), cuda=triton, rocm=triton,
                                     default=lambda: tuple(jnp.pad(o, (0, np_ - n)) for o in nearest(x, centroids, spherical=spherical,
                                                                                         precision=precision)))
    best, index, code = (o[:n] for o in out)
    return best, index, code


def nearest(x, centroids, *, spherical: bool = False, precision: str = "float32", kernel: str = "xla"):
    """(best score, first index attaining it, c.x at that index) for each row of x (N, D) against
    centroids (K, D), the scores of the module docstring; inside ``jax.jit`` (no argument checks).

    Memory: kernel="xla" makes the (N, K) scores; callers bound N (``kmjax.kmeans`` works in chunks).
    """
    if kernel == "pallas":
        return nearest_pallas(x, centroids, spherical=spherical, precision=precision)
    proj = matmul(x, centroids.T, precision)
    scores = jnp.abs(proj) if spherical else proj - 0.5 * jnp.sum(centroids * centroids, axis=1)
    best, index = max_argmax(scores)
    return best, index, jnp.take_along_axis(proj, index[:, None], axis=1)[:, 0]
