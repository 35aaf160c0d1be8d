"""Time per Lloyd iteration against K, for kmjax and each peer: one panel per JSON file of
``kmjax bench kmeans --ks ...`` (e.g. one from the CPU, one from a GPU).

    python experiments/plot_kmeans_vs_k.py experiments/results/bench_kmeans_k_cpu.json [more.json] \\
        --out docs/kmeans_vs_k.png
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from matplotlib.figure import Figure


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="records of kmjax bench kmeans --ks (one panel each)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    fig = Figure(figsize=(5.5 * len(args.json), 4))
    axes = fig.subplots(1, len(args.json), squeeze=False)[0]
    for ax, path in zip(axes, args.json):
        records = [r for r in json.load(open(path)) if str(r.get("problem", "")).startswith("k")]
        first = records[0]
        for lib in sorted({r["library"] for r in records}):
            rows = sorted((r["k"], r["ms_per_iter"]) for r in records if r["library"] == lib)
            ks, ms = np.array(rows).T
            ax.plot(ks, ms, marker="o", label=f"{lib} ({next(r['precision'] for r in records if r['library'] == lib)})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (centroids)")
        ax.set_ylabel("ms per Lloyd iteration")
        ax.set_title(f"{first['device_kind']}: N = {first['n']:,}, D = {first['d']}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    print(args.out)


if __name__ == "__main__":
    main()
