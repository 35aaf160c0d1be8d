"""Where the time of three hot loops goes, part by part, on the default JAX device.

1. One Lloyd pass over the paper's problem (400,000 x 108 points, K = 1600), in kmjax's chunks of
   rows (``kmjax.cluster.default_chunk``): the distance products alone (each chunk's scores summed,
   read once), then with the row maximum, with kmjax's maximum and index (``kmjax._ops.max_argmax``
   is what the loop uses), and with ``jnp.argmax``.
2. The L2-SVM's L-BFGS evaluation over 50,000 x 6,401 standardized features and 10 classes: the
   forward product x @ w in float32 and in bfloat16, and the loss with its gradient as
   ``train_linear`` computes it (x @ w, then the gradient from a transposed copy of x), with the
   features held in float32 and in bfloat16 (``storage="bfloat16"``: three bfloat16 parts of w).
3. The dense features' encoder and pooling (triangle, K = 1600, one image of 27 x 27 positions
   per step, 128 images): the product alone, then with the encoder and quadrant pooling three
   ways (kmjax's bands of rows then spans of columns; one product with a 0/1 matrix of regions;
   each region reduced on its own), each compiled as XLA does by default (YNNPACK fusions) and
   with kmjax's options for this loop (``kmjax._ops.xla_fusions``).

    python experiments/hot_loop_parts.py            # all three; about 3 minutes on 2 CPU cores

Each figure is the best of 3 after a warm-up; the products are compared with their own bound in
BENCHMARKS.md ("Hot loops on a CPU, part by part").
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import kmjax
from kmjax.classify.linear import svm_loss
from kmjax.cluster import default_chunk
from kmjax.encoders import triangle
from kmjax.pooling import pool, region_spans
from kmjax._ops import matmul, max_argmax, xla_fusions


def best_ms(f, *args) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def lloyd_parts():
    n, d, k = 400_000, 108, 1600
    m = default_chunk(n, k)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n // m, m, d), np.float32))
    c = jnp.asarray(rng.standard_normal((k, d), np.float32))

    def scores(xc, c):
        return matmul(xc, c.T) - 0.5 * jnp.sum(c * c, 1)

    parts = {
        "products, scores summed": lambda xc, c: jnp.sum(scores(xc, c)),
        "products + row maximum": lambda xc, c: jnp.max(scores(xc, c), 1),
        "products + max_argmax (kmjax's)": lambda xc, c: max_argmax(scores(xc, c)),
        "products + jnp.argmax": lambda xc, c: jnp.argmax(scores(xc, c), 1),
    }
    print(f"Lloyd pass, {n // m * m} x {d} points, K = {k}, chunks of {m} rows:")
    for name, part in parts.items():
        f = jax.jit(lambda x, c, part=part: jax.lax.map(lambda xc: part(xc, c), x))
        print(f"  {name:34s} {best_ms(f, x, c):8.1f} ms")
    print("  (the whole pass: kmjax bench kmeans --problems paper --libs kmjax)")


def svm_parts():
    n, f, classes = 50_000, 6401, 10
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, f), np.float32))
    w = jnp.asarray(rng.standard_normal((f, classes), np.float32) * 0.01)
    labels = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    xt = jax.jit(lambda x: x.T.copy())(x)
    gb = x.nbytes / 1e9
    print(f"L2-SVM evaluation, {n} x {f} features, {classes} classes ({gb:.2f} GB of float32):")
    for name, precision, a in (("x @ w, float32", "float32", x), ("x @ w, bfloat16", "bfloat16", x.astype(jnp.bfloat16))):
        ms = best_ms(jax.jit(lambda a, w, p=precision: matmul(a, w, p)), a, w)
        print(f"  {name:34s} {ms:8.1f} ms ({a.nbytes / 1e9 / ms * 1e3:.1f} GB/s)")
    g = jax.jit(jax.value_and_grad(lambda w, x, xt: svm_loss(w, x, labels, 100.0, xt)))
    print(f"  {'loss and gradient, float32':34s} {best_ms(g, w, x, xt):8.1f} ms")
    half, half_t = x.astype(jnp.bfloat16), xt.astype(jnp.bfloat16)
    del x, xt
    print(f"  {'loss and gradient, bfloat16 storage':34s} {best_ms(g, w, half, half_t):8.1f} ms")


def features_parts():
    images, k, h = 128, 1600, 27
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((images, h * h, 108), np.float32))
    c = jnp.asarray(rng.standard_normal((k, 108), np.float32) * 0.3)
    rows, cols = region_spans(h, h, 2)
    regions = np.zeros((4, h, h), np.float32)
    for i, ((r0, r1), (c0, c1)) in enumerate((r, q) for r in rows for q in cols):
        regions[i, r0:r1, c0:c1] = 1.0
    regions = jnp.asarray(regions.reshape(4, -1))

    def each_region(codes):
        m = codes.reshape(h, h, -1)
        return jnp.stack([jnp.sum(m[r0:r1, c0:c1], axis=(0, 1)) for r0, r1 in rows for c0, c1 in cols])

    parts = {
        "product alone": lambda xi: jnp.sum(matmul(xi, c.T)),
        "triangle + pooling by bands": lambda xi: pool(triangle(xi, c).reshape(1, h, h, -1)),
        "triangle + pooling product": lambda xi: jnp.matmul(regions, triangle(xi, c),
                                                            precision=jax.lax.Precision.HIGHEST),
        "triangle + each region": lambda xi: each_region(triangle(xi, c)),
    }
    print(f"Dense features, triangle, K = {k}, {images} images of {h} x {h} positions (images/s):")
    print(f"  {'':34s} {'default':>8s} {'kmjax':>8s}")
    for name, part in parts.items():
        f = jax.jit(lambda x, part=part: jax.lax.map(part, x))
        rates = [images / best_ms(g, x) * 1e3 for g in (f, xla_fusions(f, (), jax.default_backend()))]
        print(f"  {name:34s} {rates[0]:8.1f} {rates[1]:8.1f}")


if __name__ == "__main__":
    print(f"kmjax {kmjax.__version__}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    lloyd_parts()
    svm_parts()
    features_parts()
