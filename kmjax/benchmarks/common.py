"""What both benchmarks measure the same way: the machine's matrix-product peak per precision."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from kmjax._ops import matmul

__all__ = ["matmul_peak", "numpy_peak", "median_seconds"]


def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(precision: str = "float32", size: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of one jitted size^3 product at kmjax's ``precision`` ("float32": no TF32 on GPUs;
    "tf32": the backend's default; "bfloat16" operands), on the default JAX device."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32))
    f = jax.jit(lambda a: matmul(a, a, precision))
    return 2 * size**3 / median_seconds(lambda: f(a).block_until_ready(), repeats) / 1e9


def numpy_peak(size: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of one float32 size^3 NumPy (BLAS) product on the host."""
    a = np.random.default_rng(0).standard_normal((size, size), np.float32)
    return 2 * size**3 / median_seconds(lambda: a @ a, repeats) / 1e9
