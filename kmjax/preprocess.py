"""Patch preprocessing: per-patch normalization, per-dimension standardization, ZCA whitening.

Scales: the authors' constants assume pixels on the 0-255 scale (eps_norm = 10, eps_zca = 0.1).
On the 0-1 scale the same normalization is eps_norm = 10 / 255**2 ~= 1.5e-4, because eps is
added to a variance.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import check_matrix, number
from kmjax.errors import InputError

__all__ = ["normalize_patches", "standardize_dimensions", "ZCA", "fit_zca", "apply_zca"]


@jax.jit
def normalize_patches(patches, eps: float = 10.0):
    """Per-patch brightness and contrast normalization: (x - mean(x)) / sqrt(var(x) + eps).

    Args:
      patches: (..., D) patches, any dtype; computed in float32.
      eps: added to each patch's variance. 10 assumes the 0-255 scale (the authors' value);
        use 10 / 255**2 for pixels on the 0-1 scale.

    Returns:
      (..., D) float32. The variance is the unbiased one (divided by D - 1), as MATLAB's ``var``
      in the authors' code.
    """
    x = jnp.asarray(patches, jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True, ddof=1)
    return (x - mean) / jnp.sqrt(var + eps)


@jax.jit
def standardize_dimensions(x):
    """The blog post's per-dimension standardization: (x - mean) / (std + ptp / 20).

    Args:
      x: (N, D) patches, any scale.

    Returns:
      (N, D) float32; mean and spread are taken over the N rows of this array. The ptp term keeps
      near-constant dimensions from blowing up; a constant dimension becomes all zeros.
    """
    x = jnp.asarray(x, jnp.float32)
    scale = x.std(axis=0) + jnp.ptp(x, axis=0) / 20.0
    scale = jnp.where(scale > 0, scale, 1.0)  # a constant dimension becomes 0, not 0/0
    return (x - x.mean(axis=0)) / scale


class ZCA(NamedTuple):
    """A fitted ZCA whitening transform: ``whitened = (x - mean) @ matrix``.

    mean: (D,) float32. matrix: (D, D) float32, symmetric, V diag(1/sqrt(lambda + eps)) V^T.
    """

    mean: jax.Array
    matrix: jax.Array


@jax.jit
def _fit_zca(x, eps):
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    mean = x.mean(axis=0)
    # Centre before the product: the raw second moment of 0-255 pixels loses most of its float32
    # digits to the mean. HIGHEST keeps accelerators from using TF32/bf16 for the covariance.
    xc = x - mean
    cov = jnp.matmul(xc.T, xc, precision=jax.lax.Precision.HIGHEST) / (n - 1)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = jnp.linalg.eigh(cov)
    # Rounding can leave tiny negative eigenvalues; a covariance has none.
    scale = 1.0 / jnp.sqrt(jnp.maximum(evals, 0.0) + eps)
    matrix = jnp.matmul(evecs * scale, evecs.T, precision=jax.lax.Precision.HIGHEST)
    return ZCA(mean, 0.5 * (matrix + matrix.T))


def fit_zca(patches, eps: float = 0.1) -> ZCA:
    """Fit ZCA whitening on (N, D) patches (sample covariance, divided by N - 1).

    Args:
      patches: (N, D) with N >= 2.
      eps: added to every eigenvalue of the covariance before the inverse square root; it caps
        the gain of low-variance directions. 0.1 (the authors') for normalized 0-255 patches,
        0.01 in the blog post.

    Returns:
      ``ZCA(mean, matrix)``. Whitened data has covariance V diag(lambda / (lambda + eps)) V^T,
      i.e. the identity shrunk along directions whose variance is comparable to eps.
    """
    check_matrix(patches, "patches")
    if np.shape(patches)[0] < 2:
        raise InputError(f"fit_zca needs at least 2 patches to estimate a covariance, got {np.shape(patches)[0]}")
    number(eps, "eps", at_least=0)
    # host values sent explicitly (jnp.asarray, jnp.float32 would be implicit transfers): one program
    # for every eps, as before (a float32 scalar operand)
    if not isinstance(patches, jax.Array):
        patches = jax.device_put(np.asarray(patches))
    return _fit_zca(patches, jax.device_put(np.float32(eps)))


@jax.jit
def apply_zca(zca: ZCA, patches):
    """Whiten (..., D) patches with a fitted ``ZCA``; returns float32 (..., D) (full float32
    products on every backend: GPUs would otherwise round the operands to TF32)."""
    x = jnp.asarray(patches, jnp.float32)
    return jnp.matmul(x - zca.mean, zca.matrix, precision=jax.lax.Precision.HIGHEST)
