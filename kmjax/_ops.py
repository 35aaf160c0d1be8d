"""Building blocks of the hot loops: matrix products at a chosen precision, a fast row argmax, the
CPU compiler options of the element-wise-heavy loops, and the row buckets that sizes are padded to."""

from __future__ import annotations

import os
import functools

import jax
import jax.numpy as jnp
import numpy as np

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


# XLA's CPU compiler hands matrix products, with the element-wise work around them, to YNNPACK
# ("YNN fusions"). For k-means (products and a row argmax) and the L-BFGS products (by far with
# bfloat16 features) that is the faster choice; for the dense features, whose encoder and pooling
# do as much element-wise work per score as the product does, XLA's own loop fusions around
# Eigen's products are faster. So that loop alone is compiled with YNN fusions off. Measured in
# BENCHMARKS.md, "Hot loops on a CPU, second pass": python experiments/hot_loop_parts.py, and the
# benchmarks with and without XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= .
_XLA_FUSIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@functools.cache
def _xla_fusions_known() -> bool:
    x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
    try:
        jax.jit(lambda v: v + 1, compiler_options=dict(_XLA_FUSIONS)).lower(x).compile()
    except Exception:  # a jaxlib without this (experimental) option: its default fusions, same numbers
        return False
    return True


@functools.cache
def _recompiled(fn, static_argnames: tuple):
    return jax.jit(fn, static_argnames=static_argnames, compiler_options=dict(_XLA_FUSIONS))


def xla_fusions(fn, static_argnames: tuple, platform: str):
    """The jitted ``fn`` compiled with XLA's own fusions instead of YNNPACK's when it runs on a CPU
    (``platform``) and jaxlib knows the option; else ``fn`` itself. For loops dominated by
    element-wise work around their products (see ``_XLA_FUSIONS``); the same numbers to float
    rounding, since only how the products are blocked changes."""
    if platform != "cpu" or not _xla_fusions_known():
        return fn
    return _recompiled(fn, tuple(static_argnames))


def bucket(n: int, steps: int = 8) -> int:
    """The number of rows ``n`` rows are padded to, so that nearby sizes share one compiled program:
    the smallest number >= n of the form 2**e * (steps + j) / steps, j = 0 .. steps - 1 (``steps`` a
    power of two); every n <= 2 * steps is its own bucket.

    Eighths of an octave: at most 12.5% padding (6% on average), against eight programs per doubling
    of n. Quarters (at most 25%) would halve the programs but the padded rows are paid on every pass
    of the loops that read them (each L-BFGS evaluation, each Lloyd iteration), while a program is
    compiled once; the buckets are also multiples of a power of two, which keeps chunked passes
    aligned. E.g. 50,000 -> 53,248; 70 -> 72; 76 -> 80.

    Only where compiling costs more than padding: on accelerators (a GPU autotunes each program's
    products: seconds a program). On a CPU a program compiles in about a second while the padded
    rows are paid on every pass (50,000 -> 53,248 training rows: 6.5% more work for each of the
    README config's 1000 L-BFGS iterations), so there ``bucket(n)`` is ``n``. The environment
    variable ``KMJAX_BUCKET_ROWS`` = 1 or 0 forces either way (the tests of the buckets set it)."""
    n = int(n)
    forced = os.environ.get("KMJAX_BUCKET_ROWS", "").strip().lower()
    if (forced in ("0", "off", "false", "no")) if forced else jax.default_backend() == "cpu":
        return n
    unit = 1 << max(0, (n - 1).bit_length() - steps.bit_length())
    return -(-n // unit) * unit
