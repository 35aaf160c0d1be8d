"""Linear algebra on F x F matrices by tiles of at most ``_TILE`` columns, for the ridge classifier.

Why tiles: at F = 32,000 features (K = 4000 centroids) the OpenBLAS builds that NumPy and jaxlib
bundle crash (SIGSEGV) on whole-matrix calls, seen on this project's AVX-512 machine: NumPy's
x^T x (``syrk``) at 32,000 columns, and the Cholesky factorization (``potrf``) in jaxlib's at
32,000 and in NumPy's already at 16,384. So x^T x is summed from tiles of at most ``_TILE``
columns, and the factorization is done by tiles of at most ``_TILE``, whose diagonal blocks go
through jaxlib's. The functions work in place on NumPy arrays: the F x F matrices (8 GB in
float64 at F = 32,000) are never copied whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_TILE = 16384  # rows/columns per tile: below 32,000, where the whole-matrix calls crash


def _add_gram(gram, x, tile: int = _TILE) -> None:
    """gram[i, j] += x^T x on the tiles with i <= j (the upper triangle, tile-wise; diagonal tiles
    whole). The diagonal tiles are x_i^T x_i of at most ``tile`` columns, which NumPy computes with
    BLAS ``syrk`` (half the flops of a general product; its whole-matrix call crashes at 32,000
    columns); the tiles above them are general products."""
    f = x.shape[1]
    for i in range(0, f, tile):
        xi = np.ascontiguousarray(x[:, i : i + tile])
        gram[i : i + tile, i : i + tile] += xi.T @ xi
        if i + tile < f:
            gram[i : i + tile, i + tile :] += xi.T @ x[:, i + tile :]


def _mirror_tiles(gram, tile: int = _TILE) -> None:
    """Fill the lower off-diagonal tiles from the upper ones (the inverse of _add_gram's skipping)."""
    f = gram.shape[0]
    for i in range(0, f, tile):
        if i + tile < f:
            gram[i + tile :, i : i + tile] = gram[i : i + tile, i + tile :].T


def _row_tiles_matmul(a, b, tile: int = _TILE):
    """a @ b by row tiles of ``a``, so that no BLAS call sees a whole F x F matrix (the module
    docstring says why)."""
    return np.concatenate([a[i : i + tile] @ b for i in range(0, a.shape[0], tile)])


def _triangular(l, b, trans: bool = False):
    return np.asarray(jax.scipy.linalg.solve_triangular(jnp.asarray(l), jnp.asarray(b), lower=True, trans=int(trans)))


def _cholesky(a, tile: int = _TILE):
    """The lower Cholesky factor of a symmetric positive definite float32 ``a``, computed in place
    (its upper triangle is left as garbage) by tiles of at most ``tile``: the LAPACK factorization
    of a whole 32,000 x 32,000 matrix crashes (SIGSEGV) in the OpenBLAS that jaxlib ships, and
    NumPy's already at 16,384 (both seen on this project's AVX-512 machine), so the tiles go
    through jaxlib's."""
    f = a.shape[0]
    for i in range(0, f, tile):
        j = min(i + tile, f)
        a[i:j, i:j] = np.asarray(jax.scipy.linalg.cholesky(jnp.asarray(a[i:j, i:j]), lower=True))
        if j < f:
            panel = _triangular(a[i:j, i:j], a[j:, i:j].T).T  # L_ji = A_ji L_ii^-T
            a[j:, i:j] = panel
            for k in range(j, f, tile):  # A_22 -= L_j L_j^T, lower part, by column tiles
                a[k:, k : k + tile] -= panel[k - j :] @ panel[k - j : k - j + tile].T
    return a


def _cholesky_solve(l, r, tile: int = _TILE):
    """Solve L L^T x = r with the tiled factor of ``_cholesky`` (forward, then back substitution)."""
    f = l.shape[0]
    x = np.array(r, np.float32)
    starts = range(0, f, tile)
    for i in starts:
        j = min(i + tile, f)
        if i:
            x[i:j] -= l[i:j, :i] @ x[:i]
        x[i:j] = _triangular(l[i:j, i:j], x[i:j])
    for i in reversed(starts):
        j = min(i + tile, f)
        if j < f:
            x[i:j] -= l[j:, i:j].T @ x[j:]
        x[i:j] = _triangular(l[i:j, i:j], x[i:j], trans=True)
    return x
