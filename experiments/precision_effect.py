"""The effect of the matrix products' precision on test accuracy, measured on a CPU.

"bfloat16" rounds the operands of k-means' and the encoder's products to bfloat16 on every
backend, so a CPU measures exactly what a GPU would. "tf32" is a GPU-only rounding (the CPU
computes it in float32); here it is emulated by rounding both operands to TF32's 10 mantissa
bits (round to nearest even) before a float32 product, as NVIDIA tensor cores do. Whitening and
the classifier stay float32, as in kmjax.

    python experiments/precision_effect.py --data-dir DIR [--config coates2011_triangle_1600] \\
        [--precisions float32,tf32,bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from kmjax import _ops
from kmjax.config import load_config
from kmjax.experiment import run


def _to_tf32(x):
    """float32 -> the nearest value with TF32's 10-bit mantissa (round half to even)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = bits + jnp.uint32(0xFFF) + ((bits >> 13) & 1)
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--config", default="coates2011_triangle_1600")
    p.add_argument("--precisions", default="float32,tf32,bfloat16")
    p.add_argument("--out", default="runs/precision")
    p.add_argument("--json")
    args = p.parse_args(argv)
    exact = _ops.matmul
    rows = []
    for precision in args.precisions.split(","):
        if precision == "tf32" and jax.default_backend() == "cpu":  # emulate the GPU's operand rounding
            _ops.matmul = lambda a, b, precision="float32": exact(_to_tf32(a), _to_tf32(b), "float32")
            import kmjax.cluster
            import kmjax.encoders
            kmjax.cluster.matmul = kmjax.encoders.matmul = _ops.matmul
        sets = [f"kmeans.precision={precision}", f"features.precision={precision}", f"name=precision_{precision}"]
        t = time.perf_counter()
        res = run(load_config(args.config, sets), data_dir=args.data_dir, out=args.out, quiet=True)
        rows.append({"precision": precision, "emulated": precision == "tf32" and jax.default_backend() == "cpu",
                     "test_accuracy": res.get("test_accuracy"), "train_accuracy": res.get("train_accuracy"),
                     "kmeans_inertia": res["kmeans"]["inertia"], "seconds": round(time.perf_counter() - t, 1),
                     "device": res["environment"]["device"]})
        print(rows[-1], flush=True)
        import kmjax.cluster
        import kmjax.encoders
        _ops.matmul = kmjax.cluster.matmul = kmjax.encoders.matmul = exact
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
