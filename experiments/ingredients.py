"""What each ingredient of the best published single-layer results is worth here, on validation.

One fixed, moderate BASE (the sc_vq_demo recipe at K = 800): an OMP-1 dictionary (spherical
k-means, randn init, 50 iterations, 400,000 patches normalized per patch with eps 10, ZCA eps 0.1
on the 0-255 scale), the soft threshold alpha = 0.25 with both signs, sum pooling over the four
quadrants, all 50,000 training images, ridge regression with C chosen on a held-out 10% of the
training images (``kmjax.fit_classifier``; the score is the accuracy on those held-out images).
Each variant changes one thing:

  pool_15_6          3 x 3 overlapping windows, 15 positions every 6 (Recht et al.)
  random_patches     random whitened patches, unit norm, as the dictionary (k-means max_iter = 0)
  recht_prep_a*      no per-patch normalization, ZCA eps 65.025 on 0-255 (= 1e-3 on [0, 1]), and
                     three thresholds: 0.125 (the activity Recht et al.'s bias 1 gives their
                     filters, see ALPHAS), 0.25 (BASE's) and 1.0 (the bias, literally)
  nearest_q          the Q-nearest encoding, Q = 0.4 K, both signs (Thiry et al.)
  mirror             mirrored copies of the training images (2 x 50,000 rows)
  crops              one random crop (zero padding 4) of each training image as a second copy
  combined           the changes that beat BASE by more than 0.2 points, together
and, for comparison: k1600 (BASE with twice the atoms: about pool_15_6's feature count), and
partial combinations (pool_15_6+mirror, pool_15_6+mirror+crops, pool_15_6+recht_prep_a0.125+mirror)
and pool_15_6+nearest_q.

The test set is never loaded. Dictionaries are cached in the work folder, features are written
there as memory maps (deleted after each variant), and each finished variant's result is kept
there too, so a rerun continues where it stopped.

    nice -n 10 python experiments/ingredients.py --data-dir DIR     # DIR holds cifar-10-batches-py/
    python experiments/ingredients.py --only base,mirror        # a subset
    python experiments/ingredients.py --combine pool_15_6,mirror   # choose the combination

Writes experiments/results/ingredients_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import jax
import numpy as np

import kmjax
from kmjax.augment import mirror, random_crops
from kmjax.features import FeatureSpec, feature_dim

K = 800
C_GRID = [10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0]
# The 0/1 counts of the Q-nearest encoding want much stronger regularization (best at the grid's
# lower edge, C = 10, on the grid above): their own grid reaches down to C = 1.
C_GRID_NEAREST_Q = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
RECHT_EPS_ZCA = 1e-3 * 255.0**2  # Recht et al.'s 1e-3 on [0, 1] pixels, on the 0-255 scale (tests/test_features.py)
# Thresholds for the unnormalized variant: Recht et al.'s bias 1 sits at ~0.12 standard deviations
# of their filters' responses; the same activity for unit-norm atoms here is about alpha = 0.125
# (``calibrate_alpha`` measures both and writes them to the results).
ALPHAS = (0.125, 0.25, 1.0)


def make_variants(k: int):
    base = {
        "dictionary": {"k": k, "n_patches": 400_000, "normalize": "patch", "eps_norm": 10.0, "whiten": True,
                       "eps_zca": 0.1, "init": "randn", "max_iter": 50, "tol": None, "empty": "reseed",
                       "spherical": True},
        "spec": {"eps_norm": 10.0, "encoder": "soft_threshold", "alpha": 0.25, "grid": 2, "pool": "sum"},
        "copies": [],  # extra training copies: "mirror", "crop"
    }

    def variant(name, changes, note):
        cfg = copy.deepcopy(base)
        for part, values in changes.items():
            if part == "copies":
                cfg["copies"] = list(values)
            else:
                cfg[part].update(values)
        grid = C_GRID_NEAREST_Q if cfg["spec"]["encoder"] == "nearest_q" else C_GRID
        return {"name": name, "changes": changes, "note": note, "config": cfg, "C_grid": grid}

    recht_dict = {"normalize": "none", "eps_zca": RECHT_EPS_ZCA}
    q = int(0.4 * k)
    variants = [
        variant("base", {}, f"OMP-1 K={k}, soft threshold 0.25, quadrants"),
        variant("pool_15_6", {"spec": {"pool_size": 15, "pool_stride": 6}}, "3x3 overlapping windows, 15 every 6"),
        variant("random_patches", {"dictionary": {"init": "random", "max_iter": 0}},
                "random whitened patches (unit norm) as the dictionary"),
        *[variant(f"recht_prep_a{a:g}", {"dictionary": recht_dict, "spec": {"eps_norm": None, "alpha": a}},
                  f"no per-patch normalization, ZCA eps {RECHT_EPS_ZCA:g} (0-255), alpha {a:g}") for a in ALPHAS],
        variant("nearest_q", {"spec": {"encoder": "nearest_q", "q": q}}, f"Q-nearest, Q = {q} = 0.4 K"),
        variant("mirror", {"copies": ["mirror"]}, "mirrored copies of the training images"),
        variant("crops", {"copies": ["crop"]}, "one random crop (pad 4) of each image as a second copy"),
    ]

    def merge(parts, name="combined"):
        """One variant with the changes of all of ``parts`` (copies concatenated)."""
        changes = {}
        for v in parts:
            for part, values in v["changes"].items():
                if part == "copies":
                    changes["copies"] = changes.get("copies", []) + list(values)
                else:
                    changes.setdefault(part, {}).update(values)
        return variant(name, changes, " + ".join(v["name"] for v in parts))

    by_name = {v["name"]: v for v in variants}
    # Not ingredients (never combined automatically): the same feature count bought with atoms
    # instead of pooling regions, and the combination with one ingredient left out at a time.
    extras = [variant(f"k{2 * k}", {"dictionary": {"k": 2 * k}}, f"BASE with K = {2 * k}: 4 x 2K features, "
                      "about as many as pool_15_6's 9 x 2 x K")]
    for combo in ("pool_15_6+mirror", "pool_15_6+mirror+crops", "pool_15_6+recht_prep_a0.125+mirror",
                  "pool_15_6+nearest_q"):
        extras.append(merge([by_name[n] for n in combo.split("+")], combo))
    return base, variants, extras, merge


def calibrate_alpha(images, n: int = 100_000):
    """Activity P(|response| > threshold) of Recht et al.'s filters at their bias 1, and of unit-norm
    random-patch atoms on unnormalized whitened patches (the recht_prep variants) at ``ALPHAS``.

    Recht et al. (modestyachts/nondeep, random_features/utils.py normalize_patches): patches on
    [0, 1], each centred and scaled to unit norm, ZCA with eps 1e-3 on those, filters = patches
    @ ZCA @ ZCA^T, convolved with the raw [0, 1] images; features relu(+-conv - 1).
    """
    pick = kmjax.sample_patches(jax.random.key(0), images[: len(images) // 2], n, 6)
    probe = np.asarray(kmjax.sample_patches(jax.random.key(1), images[len(images) // 2:], n, 6), np.float64)
    p = np.asarray(pick, np.float64) / 255.0
    p -= p.mean(axis=1, keepdims=True)
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-8)
    evals, evecs = np.linalg.eigh(p.T @ p / len(p))
    zca = (evecs / np.sqrt(evals + 1e-3)) @ evecs.T
    rng = np.random.default_rng(0)
    filters = p[rng.choice(len(p), 800, replace=False)] @ zca @ zca.T
    conv = (probe / 255.0) @ filters.T
    d = kmjax.learn_dictionary(jax.random.key(0), images, 800, n_patches=n, normalize="none", eps_zca=RECHT_EPS_ZCA,
                               init="random", max_iter=0, spherical=True)
    proj = np.asarray(kmjax.apply_zca(d.zca, probe.astype(np.float32))) @ np.asarray(d.centroids).T
    return {"recht_conv_std": float(conv.std()), "recht_activity_at_bias_1": float((np.abs(conv) > 1).mean()),
            "ours_projection_std": float(proj.std()),
            "ours_activity": {f"{a:g}": float((np.abs(proj) > a).mean()) for a in ALPHAS}}


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get_dictionary(images, cfg, work: Path):
    """(centroids, zca, seconds to learn, cached?): cached in ``work`` by the dictionary's settings."""
    path = work / f"dictionary-{key_of([cfg, len(images)])}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        zca = kmjax.ZCA(z["zca_mean"], z["zca_matrix"]) if "zca_mean" in z else None
        return z["centroids"], zca, float(z["seconds"]), True
    args = dict(cfg)
    k = args.pop("k")
    start = time.perf_counter()
    d = kmjax.learn_dictionary(jax.random.key(0), images, k, **args)
    centroids = np.asarray(d.centroids)
    seconds = time.perf_counter() - start
    arrays = {"centroids": centroids, "seconds": np.float64(seconds)}
    if d.zca is not None:
        arrays.update(zca_mean=np.asarray(d.zca.mean), zca_matrix=np.asarray(d.zca.matrix))
    np.savez(path, **arrays)
    return centroids, d.zca, seconds, False


def run_variant(v, train, work: Path):
    cfg = v["config"]
    centroids, zca, dict_seconds, cached = get_dictionary(train.images, cfg["dictionary"], work)
    log(f"  dictionary: {dict_seconds:.0f} s{' (learned earlier, shared)' if cached else ''}")

    spec = FeatureSpec(**cfg["spec"])
    n = len(train.labels)
    copies = 1 + len(cfg["copies"])
    dim = feature_dim(spec, centroids.shape[0], train.images.shape[1:])
    path = work / f"features-{v['name']}.npy"
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(copies * n, dim))
    t0 = time.perf_counter()
    sources = [("original", lambda: train.images)]
    for i, how in enumerate(cfg["copies"]):
        if how == "mirror":
            sources.append(("mirror", lambda: mirror(train.images)))
        elif how == "crop":
            sources.append(("crop", lambda i=i: random_crops(jax.random.key(100 + i), train.images, 4)))
        else:
            raise ValueError(f"unknown copy {how!r}")
    for j, (label, make) in enumerate(sources):  # rows j*n .. (j+1)*n - 1: copy j of every image
        kmjax.extract_features(make(), centroids, zca, spec, out=feats[j * n:(j + 1) * n])
        log(f"  features of the {label} images done at {time.perf_counter() - t0:.0f} s")
    feats.flush()
    feat_seconds = time.perf_counter() - t0
    labels = np.tile(train.labels, copies)

    t0 = time.perf_counter()
    fit = kmjax.fit_classifier(feats, labels, num_classes=10, loss="ridge", C_grid=v["C_grid"],
                               key=jax.random.key(0), copies=copies,
                               log=lambda line: log(line.strip()))
    clf_seconds = time.perf_counter() - t0
    del feats
    path.unlink()
    best = max(fit.scores, key=lambda C: (fit.scores[C], -C))
    return {
        "name": v["name"], "note": v["note"], "changes": v["changes"], "config": cfg,
        "feature_spec": spec._asdict(), "feature_dim": dim, "train_rows": copies * n, "copies": copies,
        "C_grid": v["C_grid"], "scores": {f"{C:g}": s for C, s in fit.scores.items()}, "best_C": best,
        "val_accuracy": fit.scores[best],
        "seconds": {"dictionary": round(dict_seconds, 1), "features": round(feat_seconds, 1),
                    "classifier": round(clf_seconds, 1),
                    "total": round(dict_seconds + feat_seconds + clf_seconds, 1)},
        "best_C_at_grid_edge": best in (min(v["C_grid"]), max(v["C_grid"])),
    }


def table(results):
    w = max(len(r["name"]) for r in results)
    lines = [f"{'variant':<{w}} {'val acc':>8} {'vs base':>8} {'best C':>7} {'dim':>6} {'rows':>7} {'seconds':>8}"]
    base = next((r["val_accuracy"] for r in results if r["name"] == "base"), None)
    for r in results:
        diff = "" if base is None else f"{100 * (r['val_accuracy'] - base):+.2f}"
        lines.append(f"{r['name']:<{w}} {100 * r['val_accuracy']:>7.2f}% {diff:>8} {r['best_C']:>7g} "
                     f"{r['feature_dim']:>6} {r['train_rows']:>7} {r['seconds']['total']:>8.0f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder containing cifar-10-batches-py/")
    p.add_argument("--work", default="/tmp/ingredients", help="dictionaries, features, partial results")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--combine", default=None,
                   help="comma-separated variants to combine (default: those beating base by > 0.2 points; "
                        "of the recht_prep_a* ones only the best)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingredients_cpu.json"))
    p.add_argument("--k", type=int, default=K, help=f"dictionary size (default {K})")
    p.add_argument("--n-train", type=int, default=0, help="first N training images only (0: all; smoke tests)")
    args = p.parse_args(argv)
    base_cfg, variants, extras, merge = make_variants(args.k)
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(work).free < 12e9:
        raise SystemExit(f"{work} has less than 12 GB free; the largest variant's features need ~9 GB")

    train = kmjax.load_cifar10(split="train", data_dir=args.data_dir)  # the test set is never loaded
    if args.n_train:
        train = train._replace(images=train.images[: args.n_train], labels=train.labels[: args.n_train])
    log(f"{len(train.labels)} training images; jax {jax.__version__} on {jax.devices()[0].platform}")
    wanted = None if args.only is None else set(args.only.split(","))
    results = {}

    def run(v, compute=True):
        """Run variant v, or read its result from an earlier run; compute=False: only read it."""
        cached = work / "results" / f"{v['name']}-{key_of([v['config'], v['C_grid'], len(train.labels)])}.json"
        if cached.exists():
            results[v["name"]] = json.loads(cached.read_text())
            log(f"{v['name']}: from an earlier run, {100 * results[v['name']]['val_accuracy']:.2f}%")
            return
        if not compute:
            return
        log(f"{v['name']}: {v['note']}")
        r = run_variant(v, train, work)
        cached.write_text(json.dumps(r, indent=2))
        results[v["name"]] = r
        log(f"{v['name']}: validation {100 * r['val_accuracy']:.2f}% (C = {r['best_C']:g}), "
            f"{r['seconds']['total']:.0f} s")

    calibration_path = work / f"alpha_calibration-{len(train.labels)}.json"
    if not calibration_path.exists():
        calibration_path.write_text(json.dumps(calibrate_alpha(train.images), indent=2))
    calibration = json.loads(calibration_path.read_text())
    log(f"alpha calibration: {calibration}")

    for v in variants:
        run(v, compute=wanted is None or v["name"] in wanted)
    if "base" in results:
        by_name = {v["name"]: v for v in variants}
        if args.combine:
            parts = [by_name[n] for n in args.combine.split(",")]
        else:
            base = results["base"]["val_accuracy"]
            helped = [n for n, r in results.items() if n != "base" and r["val_accuracy"] > base + 0.002]
            recht = [n for n in helped if n.startswith("recht_prep")]
            if recht:
                best_recht = max(recht, key=lambda n: results[n]["val_accuracy"])
                helped = [n for n in helped if not n.startswith("recht_prep") or n == best_recht]
            parts = [by_name[n] for n in helped]
        if len(parts) >= 2:
            run(merge(parts), compute=wanted is None or "combined" in wanted)
        else:
            log(f"combined: fewer than two variants helped ({[v['name'] for v in parts]}); nothing to combine")

    for v in extras:
        run(v, compute=wanted is None or v["name"] in wanted)
    ordered = [results[n] for n in [v["name"] for v in variants] + ["combined"] + [v["name"] for v in extras]
               if n in results]
    print(table(ordered))
    out = {
        "what": "validation accuracy (held-out 10% of the training images, chosen by kmjax.fit_classifier's "
                f"split with jax.random.key(0)) of one-change variants of a K = {args.k} OMP-1 / soft-threshold / "
                "ridge base; the test set is not used. seconds: wall time of each stage on this machine (shared "
                "with other work); a dictionary shared by several variants is counted in each",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "kmjax": kmjax.__version__},
        "peak_rss_gb_of_last_invocation": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "training_images": len(train.labels), "base": base_cfg, "C_grid": C_GRID,
        "C_grid_nearest_q": C_GRID_NEAREST_Q,
        "alpha_calibration": calibration,
        "variants": ordered,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
