"""Linear algebra on F x F matrices by tiles of at most ``_TILE`` columns, for the ridge classifier.

Why tiles: at F = 32,000 features (K = 4000 centroids) the OpenBLAS builds that NumPy and jaxlib
bundle can crash (SIGSEGV) on whole-matrix calls on AVX-512 CPUs: NumPy's x^T x (``syrk``) at
32,000 columns, and the Cholesky factorization (``potrf``) in jaxlib's at 32,000 and in NumPy's
at 16,384. So x^T x is summed from tiles of at most ``_TILE`` columns, and the factorization
works by blocks of at most ``_BLOCK``, whose diagonal blocks go through jaxlib's. The functions work
in place on NumPy arrays: the F x F matrices (8 GB in
float64 at F = 32,000) are never copied whole.

Where the products run: with an accelerator as JAX's default device, the float32 products (the
Gram tiles, the factorization's panel updates, the CG solver's passes) run there, exact float32
(``precision=HIGHEST``), and only their results come back to be summed on the host in float64;
on a CPU they stay NumPy's BLAS calls, so CPU results are those of a NumPy-only solver.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_TILE = 16384  # rows/columns per tile: below 32,000, where the whole-matrix calls crash
_BLOCK = 4096  # blocks of the Cholesky factorization (as fast as 16,384 at 16,384 rows, with small temporaries)
ON_DEVICE: bool | None = None  # None: products on the default device when it is an accelerator; True/False: force


def on_device() -> bool:
    """Whether the float32 products run through JAX on its default device (see the module docstring)."""
    return jax.default_backend() != "cpu" if ON_DEVICE is None else ON_DEVICE


_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _tn(a, b):
    return jnp.matmul(a.T, b, precision=_HIGHEST)


@jax.jit
def _nt(a, b):
    return jnp.matmul(a, b.T, precision=_HIGHEST)


@jax.jit
def _normal(z, p):
    return jnp.matmul(z.T, jnp.matmul(z, p, precision=_HIGHEST), precision=_HIGHEST)


def matmul_tn(a, b):
    """a^T b of float32 arrays as a float32 host array (on the device per ``on_device``); NumPy
    computes a^T a with BLAS ``syrk`` when ``b`` is ``a``."""
    return np.asarray(_tn(a, b)) if on_device() else a.T @ b


def matmul_nt(a, b):
    """a b^T of float32 arrays as a float32 host array (on the device per ``on_device``)."""
    return np.asarray(_nt(a, b)) if on_device() else a @ b.T


def normal_product(z, p):
    """z^T (z p) of float32 arrays as a float32 host array, with one copy of ``z`` to the device."""
    return np.asarray(_normal(z, p)) if on_device() else z.T @ (z @ p)


def add_gram(gram, x, tile: int | None = None) -> None:
    """gram[i, j] += x^T x on the tiles with i <= j (the upper triangle, tile-wise; diagonal tiles
    whole). The diagonal tiles are x_i^T x_i of at most ``tile`` columns, which NumPy computes with
    BLAS ``syrk`` (half the flops of a general product; its whole-matrix call crashes at 32,000
    columns); the tiles above them are general products."""
    tile = _TILE if tile is None else tile
    f = x.shape[1]
    if on_device():
        x = jnp.asarray(x)  # copied to the device once, its tiles sliced there
    for i in range(0, f, tile):
        xi = x[:, i : i + tile] if on_device() else np.ascontiguousarray(x[:, i : i + tile])
        gram[i : i + tile, i : i + tile] += matmul_tn(xi, xi)
        if i + tile < f:
            gram[i : i + tile, i + tile :] += matmul_tn(xi, x[:, i + tile :])


def mirror_tiles(gram, tile: int | None = None) -> None:
    """Fill the lower off-diagonal tiles from the upper ones (the inverse of add_gram's skipping)."""
    tile = _TILE if tile is None else tile
    f = gram.shape[0]
    for i in range(0, f, tile):
        if i + tile < f:
            gram[i + tile :, i : i + tile] = gram[i : i + tile, i + tile :].T


def row_tiles_matmul(a, b, tile: int | None = None):
    """a @ b by row tiles of ``a``, so that no BLAS call sees a whole F x F matrix (the module
    docstring says why)."""
    tile = _TILE if tile is None else tile
    return np.concatenate([a[i : i + tile] @ b for i in range(0, a.shape[0], tile)])


def triangular(l, b, trans: bool = False):
    return np.asarray(jax.scipy.linalg.solve_triangular(jnp.asarray(l), jnp.asarray(b), lower=True, trans=int(trans)))


def cholesky(a, block: int | None = None):
    """The lower Cholesky factor of a symmetric positive definite float32 ``a``, computed in place
    (its upper triangle is left as garbage), right-looking by blocks of at most ``block`` (default
    ``_BLOCK``): each diagonal block is factored by jaxlib's LAPACK, the panel below it solved
    against it, and the trailing lower part updated by matrix products ``block`` columns at a
    time (BLAS, or the device per ``on_device``). LAPACK's factorization runs at about a quarter
    of the product's speed on CPUs and crashes (SIGSEGV) on whole 32,000 x 32,000 matrices in the
    OpenBLAS jaxlib ships (NumPy's already at 16,384), so it only sees ``block``-sized ones; the
    temporaries are ``block`` columns wide (0.6 GB at 36,000 rows)."""
    block = _BLOCK if block is None else block
    f = a.shape[0]
    for i in range(0, f, block):
        j = min(i + block, f)
        a[i:j, i:j] = np.asarray(jax.scipy.linalg.cholesky(jnp.asarray(a[i:j, i:j]), lower=True))
        if j < f:
            panel = triangular(a[i:j, i:j], a[j:, i:j].T).T  # L_ji = A_ji L_ii^-T
            a[j:, i:j] = panel
            for k in range(j, f, block):  # A_22 -= L_j L_j^T, lower part, by column tiles
                a[k:, k : k + block] -= matmul_nt(panel[k - j :], panel[k - j : k - j + block])
    return a


def block_inverses(l, tile: int = 512) -> list:
    """The inverses of the ``tile`` x ``tile`` diagonal blocks of a lower factor (float32, each
    inverted in float64): made once, they turn ``cholesky_solve``'s diagonal solves into small
    products, for a factor that solves many right-hand sides one after another."""
    return [np.linalg.inv(np.tril(l[i : i + tile, i : i + tile]).astype(np.float64)).astype(np.float32)
            for i in range(0, l.shape[0], tile)]


def cholesky_solve(l, r, tile: int = 512, inverses: list | None = None):
    """Solve L L^T x = r with the tiled factor of ``cholesky`` (forward, then back substitution), by
    blocks of ``tile`` rows: products with the panels beside each diagonal block (BLAS, never a
    whole F x F call), and each diagonal block's small triangular system solved by LAPACK
    (``np.linalg.solve`` on its lower triangle; XLA's triangular solve costs far more a block on a
    CPU), or multiplied by its inverse from ``block_inverses(l, tile)`` when given."""
    f = l.shape[0]
    x = np.array(r, np.float32)
    starts = range(0, f, tile)

    def diagonal(k, i, j, b, transpose):
        if inverses is not None:
            return (inverses[k].T if transpose else inverses[k]) @ b
        block = np.tril(l[i:j, i:j])
        return np.linalg.solve(block.T if transpose else block, b)

    for k, i in enumerate(starts):
        j = min(i + tile, f)
        if i:
            x[i:j] -= l[i:j, :i] @ x[:i]
        x[i:j] = diagonal(k, i, j, x[i:j], False)
    for k, i in reversed(list(enumerate(starts))):
        j = min(i + tile, f)
        if j < f:
            x[i:j] -= l[j:, i:j].T @ x[j:]
        x[i:j] = diagonal(k, i, j, x[i:j], True)
    return x
