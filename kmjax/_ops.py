"""Building blocks of the hot loops: matrix products at a chosen precision, a fast row argmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kmjax._checks import choice

PRECISIONS = ("float32", "tf32", "bfloat16")


def check_precision(precision: str) -> str:
    return choice(precision, PRECISIONS, "precision")


def matmul(a, b, precision: str = "float32"):
    """a @ b with float32 results.

    "float32": full single precision everywhere (XLA's HIGHEST; accelerators would otherwise
    use TF32 or bf16 passes). "tf32": the backend's default, TF32 on NVIDIA GPUs since Ampere,
    float32 on CPUs. "bfloat16": operands rounded to bfloat16 (8-bit mantissa), products
    accumulated in float32, on every backend.
    """
    if precision == "bfloat16":
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    if precision == "tf32":
        return jnp.matmul(a, b, precision=jax.lax.Precision.DEFAULT)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def max_argmax(scores):
    """Row maximum and the first index attaining it, as ``jnp.argmax`` gives it.

    On CPUs, computed as two plain max reductions: XLA's CPU argmax (a variadic reduce) costs
    several times a max. The index is carried as -k in float32, exact for k < 2**24. The scores
    pass an optimization barrier first, so that both reductions read the same rounded values (a
    backend that recomputed them inside each fused reduction, with different rounding, would find
    no score equal to the maximum). Accelerators use their own argmax, which is fast there.
    """
    if jax.default_backend() != "cpu":
        return jnp.max(scores, axis=1), jnp.argmax(scores, axis=1).astype(jnp.int32)
    scores = jax.lax.optimization_barrier(scores)
    best = jnp.max(scores, axis=1)
    neg_iota = -jnp.arange(scores.shape[1], dtype=jnp.float32)
    index = (-jnp.max(jnp.where(scores >= best[:, None], neg_iota, -jnp.inf), axis=1)).astype(jnp.int32)
    return best, index
