"""The matrix products of the hot loops, at a chosen precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "tf32", "bfloat16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return precision


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
