"""Time one Lloyd k-means iteration: kmjax against scikit-learn, faiss and a plain PyTorch loop.

What it measures
  For each problem (N points x D dims, K centroids) every library starts from the same
  float32 data (a fixed-seed gaussian mixture) and the same K initial centroids (K distinct
  data rows picked with the seed), and runs exactly ``--iters`` Lloyd iterations; the whole
  call is timed and divided by ``--iters``:

  * kmjax   ``kmjax.cluster.kmeans(key, x, k, init=c0, max_iter=iters, tol=None)`` followed by
            ``jax.block_until_ready``. It also does one extra assignment pass for the final
            inertia; that pass is inside the timing (counted against kmjax). The jitted function
            is compiled by a warm-up call with the same shapes and ``max_iter`` before timing;
            the points are put on the JAX device once, outside the timing.
  * sklearn ``KMeans(n_clusters=k, init=c0, n_init=1, max_iter=iters, tol=0,
            algorithm="lloyd").fit(x)``; it too does a final assignment pass. With tol=0 it may
            still stop at a fixed point (labels unchanged): ``n_iter_`` is printed and checked.
  * faiss   ``faiss.Clustering(d, k)`` with niter=iters, all points used
            (max_points_per_centroid=n), early stopping off (early_stop_threshold=-1), trained
            with an ``IndexFlatL2`` from the provided centroids; ``train`` is timed. The number
            of ``iteration_stats`` is checked against iters.

  * torch   the plain Lloyd loop a GPU user would write (``TorchRunner``): all scores at once,
            argmax, ``index_add_``, ``bincount``; with --precision tf32 it allows TF32 products.
            On the GPU when torch sees one. torch is never a kmjax dependency: skipped if absent.

  Repeats are interleaved (for each repeat, each library once) and the median is reported, as
  ms/iter, GFLOP/s of the distance product (2*N*K*D per iteration) and the ratios to faiss and
  to scikit-learn (< 1: faster). The machine's float32 matmul peak (4096^3, numpy and jitted
  jax, median of 3) is measured in the same run for scale.

  Correctness check: the final centroids of every library are scored with one common scorer
  (``kmjax.assign``: float32 distances, float64 sum); as all start from the same centroids and run the
  same iterations, the inertias should agree to ~1e-4 relative. The libraries' own numbers are
  printed too (faiss reports the objective of the last assignment, i.e. before its last update),
  and kmjax's per-iteration objective is compared with faiss's.

Problems: seed = 360,000 x 75, K 64; paper = 400,000 x 108, K 1600; scale = 1,000,000 x 128,
K 4096 (not run by default: several minutes per library on 2 cores). ``--ks 64,256,1024,4096``
adds problems of ``--kn`` x ``--kd`` points at each K: time per iteration against K. Each time
is also printed as a fraction of the measured matrix-product peak of the precision it used.

Run (from the repository root):

  PYTHONPATH=. python experiments/bench_kmeans.py --problems seed,paper --iters 10 \\
      --repeats 3 --json /tmp/bench_kmeans.json

Environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set, can slow OpenBLAS (numpy's and
scipy/scikit-learn's); the script warns at startup if they are set but does not change them.
Thread counts are whatever the libraries pick by default (all cores). Each run prints its
CPU utilisation (process CPU time / wall time, up to the number of cores): a value well below
the core count for a multithreaded library means something else was using the CPU and the
timing is not trustworthy. The JSON keeps every repeat (ms_per_iter_all, cpu_util_all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from kmjax.benchmarks.common import matmul_peak, numpy_peak, shape_rate
from kmjax.cluster import default_chunk
from kmjax.experiment.report import cpu_model
from kmjax.parallel import split_cpu
from kmjax.benchmarks.peers import SEED, KmjaxRunner, TorchRunner, import_libs, make_runner
from kmjax.cluster import assign

PROBLEMS = {
    "seed": (360_000, 75, 64),
    "paper": (400_000, 108, 1600),
    "scale": (1_000_000, 128, 4096),
}
ALL_LIBS = ("kmjax", "sklearn", "faiss", "torch")
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ----------------------------------------------------------------------------- data


def make_problem(n: int, d: int, k: int, seed: int = SEED):
    """Gaussian mixture (2K components, overlapping, unequal spreads) and K distinct data rows."""
    rng = np.random.default_rng(seed)
    m = 2 * k
    centers = rng.standard_normal((m, d), dtype=np.float32)
    spread = rng.uniform(0.4, 1.2, size=m).astype(np.float32)
    labels = rng.integers(0, m, size=n)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= spread[labels, None]
    x += centers[labels]
    idx = rng.choice(n, size=k, replace=False)
    c0 = np.ascontiguousarray(x[idx])
    return np.ascontiguousarray(x), c0


def evaluate_inertia(x: np.ndarray, c: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid (``kmjax.assign``: float32 distances), in float64."""
    return float(np.asarray(assign(x, np.asarray(c, np.float32))[1]).sum(dtype=np.float64))


# ----------------------------------------------------------------------------- matmul peak


# ----------------------------------------------------------------------------- metadata


def _meta(mods):
    meta = {
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "processor": cpu_model(),  # with its matrix extensions: AVX-512, AVX512-BF16, AMX (bfloat16 products)
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for var in OPENBLAS_VARS:
        meta[var] = os.environ.get(var)
    try:
        import jax
        meta["jax_version"] = jax.__version__
        meta["device_kind"] = jax.devices()[0].device_kind
        meta["kmjax_devices"] = KmjaxRunner.devices or len(jax.local_devices())
    except Exception:
        meta["jax_version"] = meta["device_kind"] = None
    for name, mod in (("sklearn_version", "sklearn"), ("faiss_version", "faiss")):
        try:
            meta[name] = __import__(mod).__version__
        except Exception:
            meta[name] = None
    return meta


def _fmt_ratio(v):
    return "n/a" if v is None else f"{v:.3f}"


# ----------------------------------------------------------------------------- main


def _time_problem(name, args, libs, mods, meta, peaks, records, rows, checks):
    """Time every library on one problem; append its records, rows and correctness line."""
    n, d, k = PROBLEMS[name]
    n = max(k, int(round(n * args.n_frac)))
    t = time.perf_counter()
    x, c0 = make_problem(n, d, k)
    print(f"\n[{name}] N={n} D={d} K={k}, {args.iters} iters x {args.repeats} repeats "
          f"(data {time.perf_counter() - t:.1f} s)")
    runners = {lib: make_runner(lib, mods, x, c0, k, args.iters) for lib in libs}
    for lib in ("kmjax", "torch"):
        if lib in runners:
            wt = runners[lib].warmup()
            print(f"  {lib} warm-up (compile + one run): {wt:.2f} s")
    times = {lib: [] for lib in libs}
    utils = {lib: [] for lib in libs}
    infos = {}
    for r in range(args.repeats):
        for lib in libs:
            w0, c0_cpu = time.perf_counter(), time.process_time()
            dt, info = runners[lib].run()
            util = (time.process_time() - c0_cpu) / max(time.perf_counter() - w0, 1e-9)
            per = dt / max(info["n_iter"], 1)
            times[lib].append(per)
            utils[lib].append(util)
            infos[lib] = info
            print(f"  repeat {r + 1} {lib:8s} {dt:8.3f} s  {per * 1e3:9.1f} ms/iter  "
                  f"(n_iter {info['n_iter']}, cpu {util:.2f} of {os.cpu_count()} cores)")
    del runners

    flop = 2.0 * n * k * d
    # the bound of kmjax's own loop: its distance products, (chunk x d) @ (d x k), alone
    chunk = default_chunk(n, k)
    shape = shape_rate(chunk, d, k, args.precision)
    print(f"  products of kmjax's shape ({chunk} x {d}) @ ({d} x {k}): {shape:.1f} GFLOP/s")
    med = {lib: statistics.median(times[lib]) for lib in libs}
    evals = {lib: evaluate_inertia(x, infos[lib]["centroids"]) for lib in libs}
    for lib in libs:
        rec = dict(meta)
        precision = args.precision if lib == "kmjax" or (lib == "torch" and args.precision == "tf32") else "float32"
        rec.update(
            problem=name, n=n, d=d, k=k, library=lib, iters=args.iters,
            kernel=args.kernel if lib == "kmjax" else None,
            precision=precision, fraction_of_peak=flop / med[lib] / 1e9 / peaks[precision],
            fraction_of_shape=(flop / med[lib] / 1e9 / shape if lib == "kmjax" else None),
            n_iter=infos[lib]["n_iter"],
            ms_per_iter=med[lib] * 1e3,
            ms_per_iter_all=[t * 1e3 for t in times[lib]],
            ms_per_iter_min=min(times[lib]) * 1e3,
            cpu_util_all=utils[lib],
            gflops=flop / med[lib] / 1e9,
            ratio_to_faiss=(med[lib] / med["faiss"]) if "faiss" in med else None,
            ratio_to_sklearn=(med[lib] / med["sklearn"]) if "sklearn" in med else None,
            # the target of issue 27 (item 4) on CPUs: kmjax <= 1.0x the fastest of the others, same run
            ratio_to_fastest_peer=(med[lib] / min(v for other, v in med.items() if other != lib)
                                   if len(med) > 1 else None),
            inertia=evals[lib],
            inertia_reported=infos[lib]["inertia_reported"],
        )
        if "nsplit" in infos[lib]:
            rec["faiss_nsplit"] = infos[lib]["nsplit"]
        records.append(rec)
        rows.append(rec)

    vals = list(evals.values())
    ref = min(vals)
    max_rel = (max(vals) - ref) / ref if ref > 0 else float("nan")
    print("  final inertia (common evaluator | library's own):")
    for lib in libs:
        extra = ""
        if lib == "faiss":
            extra = (f"  [own = objective before last update; splits of empty clusters: "
                     f"{infos[lib]['nsplit']}]")
        print(f"    {lib:8s} {evals[lib]:.8e} | {infos[lib]['inertia_reported']:.8e}{extra}")
    print(f"    max relative difference: {max_rel:.2e}"
          + ("  <-- larger than 1e-4: check the libraries" if max_rel > 1e-4 else ""))
    line = {"problem": name, "max_rel_inertia_diff": max_rel}
    if "kmjax" in infos and "faiss" in infos:
        a = np.array(infos["kmjax"]["objective"], np.float64)
        b = np.array(infos["faiss"]["objective"], np.float64)
        m = min(len(a), len(b))
        rel = float(np.max(np.abs(a[:m] - b[:m]) / np.abs(b[:m]))) if m else float("nan")
        print(f"    kmjax vs faiss per-iteration objective, max relative difference: {rel:.2e}")
        line["max_rel_objective_diff_kmjax_faiss"] = rel
    checks.append(line)
    for rec in rows[-len(libs):]:
        rec["max_rel_inertia_diff"] = max_rel
    del x, c0


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="seed,paper",
                   help=f"comma list from {','.join(PROBLEMS)} (default seed,paper)")
    p.add_argument("--iters", type=int, default=10, help="Lloyd iterations per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library (median)")
    p.add_argument("--libs", default=",".join(ALL_LIBS),
                   help="comma list from kmjax,sklearn,faiss,torch (those not importable are skipped)")
    p.add_argument("--ks", default="", help="also time these K on one N x D problem (e.g. 64,256,1024,4096): "
                   "time per iteration against K")
    p.add_argument("--kn", type=int, default=100_000, help="N of the --ks problems (default 100,000)")
    p.add_argument("--kd", type=int, default=108, help="D of the --ks problems (default 108)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the records here")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="kmjax data-parallel on N local devices (a CPU is split into N before JAX starts; 0: one "
                        "per hardware thread, at most 8), as `kmjax run` with devices = N; the peers keep every "
                        "thread (default 1)")
    p.add_argument("--precision", default="float32", choices=("float32", "tf32", "bfloat16"),
                   help="kmjax's distance products, and PyTorch's with tf32 (tf32/bfloat16: faster on GPUs)")
    p.add_argument("--update", choices=("scatter", "matmul"), default=None,
                   help="kmjax's centroid update (default: the backend's, scatter on CPUs, matmul elsewhere)")
    p.add_argument("--kernel", choices=("xla", "pallas"), default="xla",
                   help="kmjax's nearest-centroid pass: xla (default) or the fused Pallas kernel (GPU; interpreted on CPUs)")
    p.add_argument("--n-frac", type=float, default=1.0,
                   help="use this fraction of each problem's N (quick smoke tests only)")
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)

    problems = [s.strip() for s in args.problems.split(",") if s.strip()]
    for name in problems:
        if name not in PROBLEMS:
            p.error(f"unknown problem {name!r}; choose from {','.join(PROBLEMS)}")
    for k in (int(v) for v in args.ks.split(",") if v.strip()):
        PROBLEMS[f"k{k}"] = (args.kn, args.kd, k)
        problems.append(f"k{k}")
    if args.iters < 1 or args.repeats < 1:
        p.error("--iters and --repeats must be >= 1")
    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    if args.devices < 0:
        p.error("--devices must be >= 0")
    split_cpu(args.devices)
    KmjaxRunner.devices = args.devices
    KmjaxRunner.precision = TorchRunner.precision = args.precision
    KmjaxRunner.update = args.update
    KmjaxRunner.kernel = args.kernel

    set_vars = {v: os.environ[v] for v in OPENBLAS_VARS if v in os.environ}
    if set_vars:
        print(f"WARNING: {set_vars} set; OpenBLAS (numpy, scipy/scikit-learn) may run slower "
              "than on a default setup. Not changed by this script.")

    mods = import_libs(libs)
    libs = [lib for lib in libs if lib in mods]
    if not libs:
        print("no library to benchmark")
        return []
    meta = _meta(mods)
    print(f"machine: {meta['processor']}, {meta['cpu_count']} CPUs; jax {meta['jax_version']} "
          f"({meta['device_kind']}; kmjax on {meta.get('kmjax_devices')} device(s)), numpy {meta['numpy_version']}, sklearn "
          f"{meta['sklearn_version']}, faiss {meta['faiss_version']}")

    np_gf, jax_gf = numpy_peak(), matmul_peak("float32")
    peaks = {"float32": jax_gf}  # measured once: a second float32 measurement replaced the first before
    if args.precision != "float32":
        peaks[args.precision] = matmul_peak(args.precision)
    jax_txt = ", ".join(f"{p} {g:.1f}" for p, g in peaks.items())
    print(f"matmul peak (4096^3, median of 3): numpy float32 {np_gf:.1f} GFLOP/s; jax {jax_txt} GFLOP/s")
    meta["peak_gflops"] = np_gf
    meta["peak_gflops_jax"] = jax_gf
    meta["peak_gflops_by_precision"] = peaks

    records = [dict(meta, library="matmul_peak", gflops=np_gf, gflops_jax=jax_gf, size=4096)]
    rows = []
    checks = []
    for name in problems:
        _time_problem(name, args, libs, mods, meta, peaks, records, rows, checks)

    print("\n" + f"{'problem':8s} {'n':>9s} {'d':>4s} {'k':>5s} {'library':8s} {'ms/iter':>10s} "
          f"{'GFLOP/s':>8s} {'of peak':>8s} {'of shape':>8s} {'vs faiss':>9s} {'vs sklearn':>10s} {'vs torch':>9s}")
    for rec in rows:
        vs_torch = None
        if "torch" in libs:
            torch_rec = next(r for r in rows if r["problem"] == rec["problem"] and r["library"] == "torch")
            vs_torch = rec["ms_per_iter"] / torch_rec["ms_per_iter"]
        rec["ratio_to_torch"] = vs_torch
        print(f"{rec['problem']:8s} {rec['n']:9d} {rec['d']:4d} {rec['k']:5d} {rec['library']:8s} "
              f"{rec['ms_per_iter']:10.1f} {rec['gflops']:8.1f} {rec['fraction_of_peak']:8.1%} "
              f"{'' if rec['fraction_of_shape'] is None else format(rec['fraction_of_shape'], '.1%'):>8s} "
              f"{_fmt_ratio(rec['ratio_to_faiss']):>9s} {_fmt_ratio(rec['ratio_to_sklearn']):>10s} "
              f"{_fmt_ratio(vs_torch):>9s}")
    print(f"(matmul peak: numpy float32 {np_gf:.1f} GFLOP/s, jax {jax_txt} GFLOP/s; of peak: of the precision "
          "used; of shape: of kmjax's distance products alone, at the shape its loop runs them; ratios < 1 = faster)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")
    return records


if __name__ == "__main__":
    main()
