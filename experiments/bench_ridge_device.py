"""The ridge classifier's device path (kmjax.classify.device), pass by pass, at full size on
synthetic features made on the device: the Gram statistics and their solve (features <= rows), the
dual's kernel, its factorization and solve, the held-out scores and the primal weights (features >
rows). Each program is run twice: the first time includes its compilation, the second is its speed.

    python3 experiments/bench_ridge_device.py --json out.json              # full size (a GPU)
    python3 experiments/bench_ridge_device.py --rows 2000 --dual-features 3000 --gram-features 500  # a CPU

Defaults: 50,000 rows; the dual at 72,000 features (the K = 8000 flip-closed config), the Gram
path at 6,401 (the paper's config). GFLOP/s count the products' multiply-adds twice (the kernel's
full N x N product, the Cholesky factorization's n^3 / 3).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kmjax.classify import device


def _timed(fn, *args, **kw):
    """(result, seconds of the first call, seconds of the second)."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kw))
        times.append(time.perf_counter() - start)
    return out, times[0], times[1]


def _features(key, n, f):
    """Non-negative features with a shared component, like pooled soft-threshold codes."""
    a, b = jax.random.split(key)
    return jnp.square(jax.random.normal(a, (n, f))) + 0.3 * jax.random.uniform(b, (n, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dual-features", type=int, default=72_000)
    p.add_argument("--gram-features", type=int, default=6_401)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    n, classes = args.rows, args.classes
    key = jax.random.key(0)
    labels = jax.random.randint(key, (n,), 0, classes)
    held = n // 10
    fit, scored = jnp.arange(held, n), jnp.arange(held)
    C = jnp.float32(30.0)
    out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "rows": n, "classes": classes}

    def record(name, flop, first, second):
        out[name] = {"first_s": round(first, 3), "second_s": round(second, 3),
                     "gflops": round(flop / second / 1e9, 1) if flop else None}
        print(f"{name:>14}: {second:8.3f} s ({first:.3f} s with compiling)"
              + (f", {flop / second / 1e9:,.0f} GFLOP/s" if flop else ""), flush=True)

    f = args.gram_features
    x = _features(key, n, f)
    stats, *t = _timed(device.gram_on_device, x, labels, fit, num_classes=classes)
    record("gram", 2.0 * (n - held) * f * (f + classes), *t)
    _, *t = _timed(device.fit_ridge_on_device, stats, C)
    record("gram_solve", f ** 3 / 3 * 2, *t)
    del x, stats

    f = args.dual_features
    x = _features(key, n, f)
    kern, *t = _timed(device.kernel_on_device, x)
    record("kernel", 2.0 * n * n * f, *t)
    solution, *t = _timed(device.fit_dual_on_device, kern, labels, C, fit, num_classes=classes)
    record("dual_solve", (n - held) ** 3 / 3 * 2, *t)
    _, *t = _timed(device.dual_scores_on_device, kern, solution, scored)
    record("dual_scores", 2.0 * held * (n - held) * classes, *t)
    _, *t = _timed(device.primal_on_device, kern, solution, x)
    record("primal", 2.0 * n * f * (classes + 1), *t)
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None
    print(f"peak device memory: {out['peak_gb']} GB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
