"""Which is cheaper for a C grid in the dual: one float32 Cholesky factorization per C, or one
eigendecomposition reused across the grid? Times both on an n x n kernel-like matrix (the tiled
Cholesky of kmjax.classify.tiled; NumPy's LAPACK eigh), side by side in one run.

    python experiments/dual_solve_cost.py --n 4000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kmjax.classify.tiled import cholesky
from kmjax.experiment.report import cpu_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((args.n, args.n // 2)).astype(np.float32)
    k = z @ z.T
    k[np.diag_indices_from(k)] += args.n / 200
    cholesky(k[:256, :256].copy())  # compile the tile kernels once
    t = time.perf_counter()
    cholesky(k.copy())
    chol = time.perf_counter() - t
    t = time.perf_counter()
    np.linalg.eigh(k)
    eigh = time.perf_counter() - t
    out = {"n": args.n, "cholesky_s": round(chol, 3), "eigh_s": round(eigh, 3), "ratio": round(eigh / chol, 1),
           "cpu": cpu_model()}
    print(json.dumps(out))
    print(f"one eigendecomposition costs {eigh / chol:.1f} Cholesky factorizations: it pays for grids of more "
          f"than {int(eigh / chol)} values of C")


if __name__ == "__main__":
    main()
