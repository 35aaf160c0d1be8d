"""Encoders: map whitened patches to feature vectors given a dictionary of centroids.

All take (M, D) patches and (K, D) centroids and are one matrix product plus elementwise work,
so they fuse into a single pass on every backend.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kmjax._ops import matmul, max_argmax

__all__ = ["ENCODERS", "Encoder", "triangle", "hard", "soft_threshold", "encode", "num_outputs"]

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
    scores = matmul(x, centroids.T, precision) - 0.5 * jnp.sum(centroids * centroids, axis=1)
    _, index = max_argmax(scores)  # the first nearest on ties (e.g. several zeroed centroids)
    return jax.nn.one_hot(index, centroids.shape[0], dtype=jnp.float32)


def soft_threshold(x, centroids, alpha: float = 0.25, precision: str = "float32"):
    """Soft threshold with both signs: [max(0, c.x - alpha), max(0, -c.x - alpha)], (M, 2K)."""
    proj = matmul(x, centroids.T, precision)
    return jnp.concatenate([jnp.maximum(proj - alpha, 0.0), jnp.maximum(-proj - alpha, 0.0)], axis=1)


class Encoder(NamedTuple):
    """A registered encoder: ``fn(x, centroids, alpha, precision)`` -> (M, outputs * K) codes."""

    fn: Callable
    outputs: int  # codes per centroid


# The vocabulary of encoders, defined once: the config schema, FeatureSpec checks and the
# scikit-learn adapter read it. A new encoder is one function and one entry here.
ENCODERS: dict[str, Encoder] = {
    "triangle": Encoder(lambda x, c, alpha, precision: triangle(x, c, precision), 1),
    "hard": Encoder(lambda x, c, alpha, precision: hard(x, c, precision), 1),
    "soft_threshold": Encoder(soft_threshold, 2),
}


def _lookup(encoder: str) -> Encoder:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {tuple(ENCODERS)}")
    return ENCODERS[encoder]


def num_outputs(encoder: str, k: int) -> int:
    """Features per patch that ``encoder`` gives for a K-centroid dictionary."""
    return _lookup(encoder).outputs * k


def encode(x, centroids, encoder: str = "triangle", alpha: float = 0.25, precision: str = "float32"):
    """Dispatch on the encoder's name (one of ``ENCODERS``)."""
    return _lookup(encoder).fn(x, centroids, alpha, precision)
