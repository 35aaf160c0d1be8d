"""What both benchmarks measure the same way: the machine's matrix-product peak per precision."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._ops import matmul, xla_fusions

__all__ = ["matmul_peak", "shape_rate", "numpy_peak", "median_seconds"]


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
    return 2 * size**3 / _fastest(f, (a,), repeats) / 1e9


def _fastest(f, args, repeats) -> float:
    """Median seconds of the jitted ``f(*args)`` compiled as XLA does by default or with the options
    of kmjax's element-wise-heavy loops (``kmjax._ops.xla_fusions``), whichever is faster: a bound
    holds for either compilation."""
    variants = {f, xla_fusions(f, (), jax.default_backend())}
    return min(median_seconds(lambda g=g: g(*args).block_until_ready(), repeats) for g in variants)


def shape_rate(m: int, k: int, n: int, precision: str = "float32", rows: int = 1 << 16, repeats: int = 3) -> float:
    """GFLOP/s of jitted (m x k) @ (k x n) products at kmjax's ``precision``, one after another over
    ``rows`` rows, each result summed (read once, in cache, as a hot loop reads its scores): the bound
    of a loop whose products have this shape. A small inner dimension k (108 for 6x6x3 patches) or
    few rows m run far below the square product's peak (``matmul_peak``)."""
    count = max(1, rows // m)
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((count, m, k), np.float32))
    b = jax.device_put(rng.standard_normal((k, n), np.float32))
    f = jax.jit(lambda a, b: jax.lax.map(lambda x: jnp.sum(matmul(x, b, precision)), a))
    return 2 * count * m * k * n / _fastest(f, (a, b), repeats) / 1e9


def numpy_peak(size: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of one float32 size^3 NumPy (BLAS) product on the host."""
    a = np.random.default_rng(0).standard_normal((size, size), np.float32)
    return 2 * size**3 / median_seconds(lambda: a @ a, repeats) / 1e9
