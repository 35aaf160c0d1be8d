"""The experiment runner: config -> stages -> one run folder (the impure shell).

Stages: load data -> sample patches -> normalize -> whiten -> k-means -> dense features ->
standardize -> classifier (C chosen on a held-out split of the training set if asked) ->
evaluate. Everything random comes from ``jax.random.key(config.seed)``, so the same config and
seed give the same numbers on the same machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kmjax import plots
from kmjax.classify import accuracy, fit_standardizer, predict, standardize, train_linear
from kmjax.config import Config, to_dict
from kmjax.data import load_cifar10
from kmjax.features import FeatureSpec, extract_features
from kmjax.cluster import kmeans
from kmjax.patches import extract_patches, sample_patches
from kmjax.preprocess import apply_zca, fit_zca, normalize_patches, standardize_dimensions

__all__ = ["run", "new_run_dir", "learn_dictionary", "feature_spec"]


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


class _Timer:
    def __init__(self, quiet):
        self.seconds: dict[str, float] = {}
        self.quiet = quiet

    @contextmanager
    def stage(self, name):
        _log(f"[{name}] ...", self.quiet)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        _log(f"[{name}] {self.seconds[name]:.1f} s", self.quiet)


def _progress(label: str, quiet: bool):
    t0 = time.perf_counter()

    def report(done, total):
        if quiet:
            return
        rate = done / max(time.perf_counter() - t0, 1e-9)
        end = "\n" if done == total else "\r"
        print(f"  {label}: {done}/{total} images ({rate:.0f}/s)", end=end, file=sys.stderr, flush=True)

    return report


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh folder out/name, or out/name-2, -3, ...: an earlier run is never overwritten."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = out / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {out}")


def feature_spec(cfg: Config) -> FeatureSpec:
    return FeatureSpec(
        patch_size=cfg.patches.size,
        stride=cfg.features.stride,
        eps_norm=cfg.preprocess.eps_norm if cfg.preprocess.normalize == "patch" else None,
        encoder=cfg.features.encoder,
        alpha=cfg.features.alpha,
        grid=cfg.features.grid,
        pool=cfg.features.pool,
    )


def learn_dictionary(cfg: Config, images, key):
    """Patches -> normalization -> ZCA -> k-means. Returns (zca or None, KMeansResult, n_patches)."""
    key_patches, key_kmeans = jax.random.split(key)
    p = cfg.patches
    if p.sampling == "random":
        patches = sample_patches(key_patches, images, p.num, p.size)
    else:
        patches = extract_patches(images, p.size, p.stride)
        patches = patches.reshape(-1, patches.shape[-1])
    if cfg.preprocess.normalize == "patch":
        x = normalize_patches(patches, cfg.preprocess.eps_norm)
    elif cfg.preprocess.normalize == "dimension":
        x = standardize_dimensions(patches)
    else:
        x = jnp.asarray(patches, jnp.float32)
    zca = None
    if cfg.preprocess.whiten:
        zca = fit_zca(x, cfg.preprocess.eps_zca)
        x = apply_zca(zca, x)
    km = cfg.kmeans
    result = kmeans(
        key_kmeans, x, km.k, init=km.init, max_iter=km.max_iter,
        tol=None if km.tol < 0 else km.tol, empty=km.empty, spherical=km.spherical,
        chunk_size=km.chunk_size or None,
    )
    return zca, result, x.shape[0]


def _choose_C(cfg: Config, x, labels, key, quiet):
    """Pick C on a held-out part of the training features (never the test set)."""
    c = cfg.classifier
    n = x.shape[0]
    perm = np.asarray(jax.random.permutation(key, n))
    n_val = max(1, int(round(c.val_fraction * n)))
    val, fit = perm[:n_val], perm[n_val:]
    std = fit_standardizer(x[fit])
    xf, xv = standardize(std, x[fit]), standardize(std, x[val])
    scores = {}
    for C in c.C_grid:
        model, _ = train_linear(xf, labels[fit], loss=c.loss, C=float(C), num_classes=10,
                                max_iter=c.max_iter, tol=c.tol)
        scores[float(C)] = accuracy(model, xv, labels[val])
        _log(f"  C = {C:g}: validation accuracy {scores[float(C)]:.4f}", quiet)
    best = max(scores, key=lambda C: (scores[C], -C))
    return best, scores


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # never a half-written results file


def run(cfg: Config, *, data_dir=None, out: str | os.PathLike = "runs", quiet: bool = False) -> dict:
    """Run one experiment; write its folder; return the results dict (also ``results.json``)."""
    if cfg.features.enabled and cfg.preprocess.normalize == "dimension":
        raise ValueError("preprocess.normalize = 'dimension' is for dictionaries only (features.enabled = false);"
                         " the dense features use per-patch normalization: set it to 'patch' or 'none'")
    t_start = time.perf_counter()
    timer = _Timer(quiet)
    key_dict, key_val = jax.random.split(jax.random.key(cfg.seed))
    with timer.stage("load"):
        train = load_cifar10(data_dir, "train", batches=cfg.data.train_batches)
        train_images, train_labels = train.images, train.labels
        if cfg.data.n_train:
            train_images, train_labels = train_images[: cfg.data.n_train], train_labels[: cfg.data.n_train]
        test = None
        if cfg.features.enabled and cfg.data.n_test != -1:
            test = load_cifar10(data_dir, "test")
    run_dir = new_run_dir(Path(out), cfg.name)
    _log(f"run folder: {run_dir}", quiet)
    results: dict = {"name": cfg.name, "seed": cfg.seed, "config": to_dict(cfg), "run_dir": str(run_dir)}

    with timer.stage("dictionary"):
        zca, km, n_patches = learn_dictionary(cfg, train_images, key_dict)
        centroids = np.asarray(km.centroids)
    results["kmeans"] = {
        "n_patches": int(n_patches), "n_iter": int(km.n_iter), "converged": bool(km.converged),
        "inertia": float(km.inertia), "objective": [float(v) for v in np.asarray(km.objective)[: int(km.n_iter)]],
        "empty_clusters": int((np.asarray(km.counts) == 0).sum()),
    }
    channels = train_images.shape[-1]
    plots.save_filters(run_dir / "filters.png", centroids, cfg.patches.size, channels,
                       title=f"{cfg.name}: {cfg.kmeans.k} centroids")
    plots.save_objective(run_dir / "objective.png", km.objective)
    arrays = {"centroids": centroids, "objective": np.asarray(km.objective)}
    if zca is not None:
        arrays.update(zca_mean=np.asarray(zca.mean), zca_matrix=np.asarray(zca.matrix))

    if cfg.features.enabled:
        spec = feature_spec(cfg)
        with timer.stage("features"):
            f_train = extract_features(train_images, centroids, zca, spec, memory_mb=cfg.features.memory_mb,
                                       progress=_progress("train", quiet))
            f_test = None if test is None else extract_features(
                test.images if cfg.data.n_test == 0 else test.images[: cfg.data.n_test], centroids, zca, spec,
                memory_mb=cfg.features.memory_mb, progress=_progress("test", quiet))
        with timer.stage("classifier"):
            C = cfg.classifier.C
            if cfg.classifier.C_grid:
                C, scores = _choose_C(cfg, f_train, train_labels, key_val, quiet)
                results["C_validation"] = {f"{k:g}": v for k, v in scores.items()}
            std = fit_standardizer(f_train)
            x_train = standardize(std, f_train)
            del f_train
            model, info = train_linear(x_train, train_labels, loss=cfg.classifier.loss, C=C, num_classes=10,
                                       max_iter=cfg.classifier.max_iter, tol=cfg.classifier.tol)
            results["classifier"] = {"loss": cfg.classifier.loss, "C": C, "n_iter": int(info.n_iter),
                                     "objective": float(info.loss), "grad_norm": float(info.grad_norm)}
            results["train_accuracy"] = accuracy(model, x_train, train_labels)
            del x_train
        arrays.update(std_mean=np.asarray(std.mean), std_scale=np.asarray(std.scale),
                      weights=np.asarray(model.weights))
        if f_test is not None:
            with timer.stage("evaluate"):
                labels = test.labels[: f_test.shape[0]]
                pred = np.asarray(predict(model, standardize(std, f_test)))
                conf = np.zeros((10, 10), np.int64)
                np.add.at(conf, (labels, pred), 1)
                results["test_accuracy"] = float((pred == labels).mean())
                results["per_class_accuracy"] = {
                    name: float(conf[i, i] / max(conf[i].sum(), 1)) for i, name in enumerate(test.class_names)}
                results["confusion"] = conf.tolist()
                plots.save_confusion(run_dir / "confusion.png", conf, test.class_names)

    np.savez(run_dir / "model.npz", **arrays)
    results["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - t_start, 3)}
    results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["environment"] = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "jax": jax.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
        "cpu_count": os.cpu_count(),
    }
    _write_json(run_dir / "results.json", results)
    return results


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{results['name']}: {results['run_dir']}"]
    k = results["kmeans"]
    lines.append(f"  k-means: {k['n_iter']} iterations, objective {k['inertia']:.6g}, "
                 f"{k['empty_clusters']} empty clusters")
    if "train_accuracy" in results:
        lines.append(f"  train accuracy: {100 * results['train_accuracy']:.2f}%")
    if "test_accuracy" in results:
        lines.append(f"  test accuracy:  {100 * results['test_accuracy']:.2f}%")
    s = results["seconds"]
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()))
    lines.append(f"  peak memory: {results['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)
