"""Dense feature extraction speed: images per second of the full pipeline at the paper's settings.

Measures ``kmjax.extract_features`` (6x6x3 patches at stride 1 -> per-patch normalization -> ZCA
-> triangle encoding against K centroids -> quadrant sum pooling; ``--encoder`` and
``--pool-size`` / ``--pool-stride`` choose others) on synthetic 32x32x3 uint8
images, and, in the same run, the machine's float32 matrix-product peak, so that the result is
also a fraction of what the hardware allows. Two variants of the same code are timed side by
side: the default schedule for this backend, and one wide matrix product per batch
("batch-wide", what a straightforward jitted function does; the default on accelerators).

    python experiments/bench_features.py                    # K = 1600, 1024 images, 3 repeats
    python experiments/bench_features.py --k 4000 --json out.json

FLOPs counted per image: the encoder's product 2 * P * D * K and the whitening 2 * P * D * D,
with P = 27 * 27 positions and D = 108 (elementwise work not counted).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from kmjax.benchmarks.common import matmul_peak, shape_rate
from kmjax.experiment.report import cpu_model
from kmjax.features import FeatureSpec, extract_features, prepare_features
from kmjax.preprocess import fit_zca


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=1600, help="dictionary size (default 1600)")
    p.add_argument("--images", type=int, default=1024, help="images per timed run (default 1024)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the median is reported")
    p.add_argument("--batch-wide-step", type=int, default=64,
                   help="images per matrix product in the batch-wide variant (default 64)")
    p.add_argument("--precision", default="float32", choices=("float32", "tf32", "bfloat16"),
                   help="the encoder's matrix products (tf32/bfloat16: faster on GPUs; default float32)")
    p.add_argument("--encoder", default="triangle", choices=("triangle", "soft_threshold"),
                   help="the encoder (default triangle)")
    p.add_argument("--pool-size", type=int, default=0,
                   help="pooling windows of this many positions (15 with --pool-stride 6: 3x3 windows); "
                        "default 0: the paper's quadrants")
    p.add_argument("--pool-stride", type=int, default=0, help="the windows' step (default: --pool-size)")
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    centroids = rng.standard_normal((args.k, 108)).astype(np.float32)
    zca = fit_zca(rng.standard_normal((5000, 108)).astype(np.float32), 0.1)
    spec = FeatureSpec(encoder=args.encoder, pool_size=args.pool_size, pool_stride=args.pool_stride)
    positions, d = 27 * 27, 108
    flops_per_image = 2 * positions * d * args.k + 2 * positions * d * d

    variants = {"default": {}, "batch-wide": {"step": args.batch_wide_step, "batch_size": args.batch_wide_step}}
    for kw in variants.values():
        kw["precision"] = args.precision
    for kw in variants.values():  # compile outside the timing
        extract_features(images[: kw.get("batch_size", 128)], centroids, zca, spec, **kw)
    peak = matmul_peak(args.precision)  # the peak of the precision the products use
    # the bound of the shape the default schedule runs: its encoder's and whitening's products alone
    step = prepare_features(images, centroids, zca, spec, precision=args.precision, step=None, batch_size=None,
                            memory_mb=512.0)[1]
    rows = step * positions
    seconds = sum(2 * positions * d * n / (shape_rate(rows, d, n, args.precision) * 1e9) for n in (args.k, d))
    shape_bound = 1 / seconds
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so that drifts in machine load hit both
        for name, kw in variants.items():
            t0 = time.perf_counter()
            extract_features(images, centroids, zca, spec, **kw)
            times[name].append(time.perf_counter() - t0)

    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "cpu_count": __import__("os").cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "encoder": args.encoder, "pool_size": args.pool_size, "pool_stride": args.pool_stride}
    records = []
    print(f"dense {args.encoder} features, K = {args.k}, {args.images} images of 32x32x3, "
          f"{meta['device']} ({meta['backend']}; {meta['cpu']}); matrix-product peak {peak:.0f} GFLOP/s")
    print(f"{'variant':12s} {'images/s':>9s} {'GFLOP/s':>8s} {'of peak':>8s} {'of shape':>8s} {'vs batch-wide':>14s}")
    rates = {name: args.images / float(np.median(t)) for name, t in times.items()}
    for name, rate in rates.items():
        gflops = rate * flops_per_image / 1e9
        rec = {"variant": name, "k": args.k, "precision": args.precision, "images": args.images, "images_per_s": round(rate, 1),
               "gflops": round(gflops, 1), "peak_gflops": round(peak, 1),
               "bound_images_per_s": round(peak * 1e9 / flops_per_image, 1),
               "shape_rows": rows, "shape_bound_images_per_s": round(shape_bound, 1),
               "ratio_to_batch_wide": round(rate / rates["batch-wide"], 3), **meta}
        records.append(rec)
        print(f"{name:12s} {rate:9.1f} {gflops:8.1f} {gflops / peak:8.1%} {rate / shape_bound:8.1%} "
              f"{rec['ratio_to_batch_wide']:14.2f}")
    print(f"matrix-product bound: {records[0]['bound_images_per_s']:.0f} images/s at the square product's peak, "
          f"{shape_bound:.0f} at the default schedule's shape ({rows} x {d} times {d} x {args.k}, and {d} x {d})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return records


if __name__ == "__main__":
    main()
