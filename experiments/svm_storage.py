"""The classifier step of a finished run, timed once per ``classifier.storage``, on that run's own features.

``kmjax run ... --resume DIR --set 'classifier.storage="..."'`` does the same through the runner, but
recomputes every stage whose code changed since DIR was written; this reads DIR's feature files
directly and times ``fit_classifier`` alone, with the config's classifier section (``classifier_spec``)
and only the storage changed, the storages one after the other (``--rounds`` alternates them again).

  python experiments/svm_storage.py RUN_DIR [--storages float32,bfloat16] [--max-iter N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _load(stages: Path, name: str):
    (path,) = sorted(stages.glob(f"features.{name}-*.npy"))
    return np.load(path, mmap_mode="r")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--storages", default="float32,bfloat16")
    p.add_argument("--max-iter", type=int, default=0, help="L-BFGS iterations (default: the config's)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax

    from kmjax.classify import fit_classifier, predict_features
    from kmjax.config import parse_config
    from kmjax.experiment.plan import classifier_spec
    from kmjax.experiment.report import cpu_model

    cfg = parse_config(json.loads((args.run_dir / "config.json").read_text()))
    stages = args.run_dir / "stages"
    x, y = _load(stages, "train"), np.asarray(_load(stages, "train_labels"))
    xt, yt = _load(stages, "test"), np.asarray(_load(stages, "test_labels"))
    spec = classifier_spec(cfg)._asdict()
    if args.max_iter:
        spec["max_iter"] = args.max_iter
    num_classes = int(y.max()) + 1
    print(f"{cpu_model()}, jax {jax.__version__}; features {x.shape}, test {xt.shape}; "
          f"L-BFGS up to {spec['max_iter']} iterations; load {os.getloadavg()}")
    records = []
    for r in range(args.rounds):
        for storage in args.storages.split(","):
            load = os.getloadavg()
            t = time.perf_counter()
            fit = fit_classifier(x, y, num_classes=num_classes, key=jax.random.key(0), **{**spec, "storage": storage})
            dt = time.perf_counter() - t
            pred = np.asarray(predict_features(fit.standardizer, fit.model, xt))
            acc = float((pred == yt).mean())
            rec = {"round": r, "storage": storage, "seconds": dt, "n_iter": fit.n_iter, "objective": fit.objective,
                   "test_accuracy": acc, "load_before": load, "load_after": os.getloadavg(), "cpu": cpu_model(),
                   "max_iter": spec["max_iter"], "jax": jax.__version__, "run_dir": str(args.run_dir)}
            records.append(rec)
            print(f"round {r} {storage:9s} {dt:7.1f} s  {fit.n_iter} iterations ({fit.n_iter / dt:.2f}/s)  "
                  f"objective {fit.objective:.4f}  test {acc:.2%}  load {load[0]:.2f} -> {rec['load_after'][0]:.2f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
