"""The experiment runner: config -> stages -> one run folder (the impure shell).

Stages: load data -> sample patches -> normalize -> whiten -> k-means -> dense features ->
standardize -> classifier (C chosen on a held-out split of the training set if asked) ->
evaluate. Everything random comes from ``jax.random.key(config.seed)``, so the same config and
seed give the same numbers on the same machine.
"""

from __future__ import annotations

import hashlib
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
from kmjax._io import atomic_write
from kmjax.classify import (LinearModel, Standardizer, TrainInfo, accuracy, fit_ridge, fit_standardizer, gram_stats,
                            predict_features, standardize, train_linear)
from kmjax.config import Config, ConfigError, _parse_value, load_config, to_dict
from kmjax.data import load_cifar10
from kmjax.features import FeatureSpec, extract_features, feature_dim
from kmjax.cluster import kmeans
from kmjax.patches import extract_patches, sample_patches
from kmjax.model import Model
from kmjax.model import save as save_model
from kmjax.preprocess import ZCA, apply_zca, fit_zca, normalize_patches, standardize_dimensions

__all__ = ["run", "sweep", "parse_grid", "new_run_dir", "learn_dictionary", "feature_spec", "summary"]


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


def _progress(label: str, quiet: bool, unit: str = "images"):
    """A progress reporter ``report(done, total, value=None)``: a live line on a terminal, a
    line per 10% in a log file; None when quiet."""
    if quiet:
        return None
    t0 = time.perf_counter()
    live = sys.stderr.isatty()
    last = [-1.0]

    def report(done, total, value=None):
        done, total = int(done), int(total)
        elapsed = time.perf_counter() - t0
        if live:
            if done < total and elapsed - last[0] < 0.5:
                return
        elif done < total and int(10 * done / total) == int(10 * last[0]):
            return
        last[0] = elapsed if live else done / total
        rate = done / max(elapsed, 1e-9)
        extra = "" if value is None else f", objective {float(value):.6g}"
        end = "\n" if done == total or not live else "\r"
        print(f"  {label}: {done}/{total} {unit} ({rate:.3g}/s{extra})", end=end, file=sys.stderr, flush=True)

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


def learn_dictionary(cfg: Config, images, key, progress=None):
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
        chunk_size=km.chunk_size or None, precision=km.precision, progress=progress,
    )
    return zca, result, x.shape[0]


def _validation_split(cfg: Config, rows: int, key):
    """(fit rows, held-out rows, held-out rows to score) of the training features.

    With flipped copies, rows i and i + n hold one image: the split is by image, so that no
    image's mirror is fitted while the image itself is validated; only the originals are scored.
    """
    copies = 2 if cfg.features.train_flip else 1
    n = rows // copies
    perm = np.asarray(jax.random.permutation(key, n))
    n_val = max(1, int(round(cfg.classifier.val_fraction * n)))
    val, fit = (np.sort(np.concatenate([idx + j * n for j in range(copies)])) for idx in (perm[:n_val], perm[n_val:]))
    return fit, val, np.sort(perm[:n_val])


def _search_C(grid, score, quiet):
    """(best C, {C: validation accuracy}) over ``grid``, ``score(C)`` giving the accuracy; ties go
    to the stronger regularization (the smaller C)."""
    scores = {}
    for C in grid:
        scores[float(C)] = score(float(C))
        _log(f"  C = {C:g}: validation accuracy {scores[float(C)]:.4f}", quiet)
    return max(scores, key=lambda C: (scores[C], -C)), scores


def _choose_C(cfg: Config, x, labels, key, quiet):
    """Pick C for an L-BFGS classifier on a held-out part of the training features (never the test set)."""
    c = cfg.classifier
    fit, _, val = _validation_split(cfg, x.shape[0], key)
    std = fit_standardizer(x[fit])
    xf, xv = standardize(std, x[fit]), standardize(std, x[val])

    def score(C):
        model, _ = train_linear(xf, labels[fit], loss=c.loss, C=C, num_classes=10, max_iter=c.max_iter, tol=c.tol)
        return accuracy(model, xv, labels[val])

    return _search_C(c.C_grid, score, quiet)


def _ridge(cfg: Config, x, labels, key, quiet):
    """Ridge regression from the Gram matrix of the training features, read from disk in blocks;
    C chosen on a held-out split when ``C_grid`` is given. Returns (C, scores, std, model)."""
    c = cfg.classifier
    if not c.C_grid:
        stats = gram_stats(x, labels, 10, progress=_progress("Gram", quiet, "rows"))
        return c.C, {}, *fit_ridge(stats, c.C)
    fit, val, scored = _validation_split(cfg, x.shape[0], key)
    stats = gram_stats(x, labels, 10, rows=fit, progress=_progress("Gram", quiet, "rows"))
    xv = np.asarray(x[scored])
    best, scores = _search_C(c.C_grid, lambda C: float(np.mean(predict_features(*fit_ridge(stats, C), xv)
                                                                  == labels[scored])), quiet)
    stats = gram_stats(x, labels, 10, rows=val, into=stats)  # the held-out rows join the final fit
    return best, scores, *fit_ridge(stats, best)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def stage_keys(cfg: Config) -> dict[str, str]:
    """A hash per stage of everything that determines its output (and its inputs' stages)."""
    c = to_dict(cfg)
    feats = {k: v for k, v in c["features"].items() if k != "memory_mb"}  # memory_mb: speed, not result
    parts = {
        "dictionary": [c["seed"], c["data"]["train_batches"], c["data"]["n_train"], c["patches"],
                       c["preprocess"], c["kmeans"]],
    }
    parts["features"] = [parts["dictionary"], feats, c["data"]["n_test"]]
    parts["classifier"] = [parts["features"], c["classifier"]]
    return {name: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
            for name, v in parts.items()}


class _Store:
    """Finished stages saved in a folder, each tagged with its stage key: a later run of a config
    whose key matches loads the stage instead of recomputing it (resume, or reuse across runs)."""

    def __init__(self, folder: Path, quiet: bool):
        self.folder, self.quiet = folder, quiet

    def _path(self, stage, key, ext):
        return self.folder / f"{stage}-{key}.{ext}"

    def load(self, stage, key, names):
        if not self._path(stage, key, "done").is_file():
            return None
        _log(f"[{stage}] reusing {self.folder / stage}-{key}.*", self.quiet)
        return {n: np.load(self._path(f"{stage}.{n}", key, "npy"), mmap_mode="r") for n in names}

    def create(self, stage, key, name, shape):
        """A float32 array on disk for a large output of a stage, to fill in place; ``save`` gives
        it its final name. Until then it is a ``.partial`` file that no later run reads."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(f"{stage}.{name}", key, "npy.partial")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))

    def save(self, stage, key, arrays):
        self.folder.mkdir(parents=True, exist_ok=True)
        for n, a in arrays.items():
            path = self._path(f"{stage}.{n}", key, "npy")
            if isinstance(a, np.memmap) and str(a.filename).endswith(".partial"):  # from create()
                a.flush()
                os.replace(a.filename, path)
            else:
                atomic_write(path, lambda f, a=a: np.save(f, np.asarray(a)))
        # written last: a stage without its marker was interrupted and is recomputed
        atomic_write(self._path(stage, key, "done"), lambda f: f.write(" ".join(arrays).encode()))


def _dictionary_stage(cfg, images, key, store, stage_key, timer):
    names = ("centroids", "objective", "counts", "info") + (("zca_mean", "zca_matrix") if cfg.preprocess.whiten else ())
    saved = store.load("dictionary", stage_key, names)
    if saved is None:
        with timer.stage("dictionary"):
            zca, km, n_patches = learn_dictionary(cfg, images, key, _progress("k-means", timer.quiet, "iterations"))
            info = np.array([n_patches, int(km.n_iter), int(km.converged), float(km.inertia)], np.float64)
            saved = {"centroids": km.centroids, "objective": km.objective, "counts": km.counts, "info": info}
            if zca is not None:
                saved.update(zca_mean=zca.mean, zca_matrix=zca.matrix)
            saved = {k: np.asarray(v) for k, v in saved.items()}
        store.save("dictionary", stage_key, saved)
    zca = ZCA(jnp.asarray(saved["zca_mean"]), jnp.asarray(saved["zca_matrix"])) if cfg.preprocess.whiten else None
    return zca, saved


def _features_stage(cfg, train_images, test_images, zca, centroids, store, stage_key, timer, quiet):
    names = ("train",) + (("test",) if test_images is not None else ())
    saved = store.load("features", stage_key, names)
    if saved is None:
        spec = feature_spec(cfg)
        with timer.stage("features"):
            if cfg.features.train_flip:  # mirror images are as likely as the originals
                train_images = np.concatenate([train_images, train_images[:, :, ::-1]])
            parts = {"train": train_images} if test_images is None else {"train": train_images, "test": test_images}
            dim = feature_dim(spec, centroids.shape[0])
            # written straight to disk: the features of a large dictionary need not fit in memory
            saved = {name: extract_features(images, centroids, zca, spec, memory_mb=cfg.features.memory_mb,
                                            precision=cfg.features.precision, progress=_progress(name, quiet),
                                            out=store.create("features", stage_key, name, (len(images), dim)))
                     for name, images in parts.items()}
        store.save("features", stage_key, saved)
    return saved["train"], saved.get("test")


def _classifier_stage(cfg, f_train, labels, key, store, stage_key, timer, quiet, results):
    saved = store.load("classifier", stage_key, ("std_mean", "std_scale", "weights", "info", "C_grid"))
    if saved is None:
        with timer.stage("classifier"):
            if cfg.classifier.loss == "ridge":
                C, scores, std, model = _ridge(cfg, f_train, labels, key, quiet)
                info = TrainInfo(np.nan, np.nan, 0)
            else:
                C, scores = cfg.classifier.C, {}
                if cfg.classifier.C_grid:
                    C, scores = _choose_C(cfg, f_train, labels, key, quiet)
                std = fit_standardizer(f_train)
                model, info = train_linear(standardize(std, f_train), labels, loss=cfg.classifier.loss, C=C,
                                           num_classes=10, max_iter=cfg.classifier.max_iter,
                                           tol=cfg.classifier.tol, progress=_progress("L-BFGS", quiet, "iterations"))
            saved = {"std_mean": np.asarray(std.mean), "std_scale": np.asarray(std.scale),
                     "weights": np.asarray(model.weights),
                     "info": np.array([C, float(info.n_iter), float(info.loss), float(info.grad_norm)]),
                     "C_grid": np.array(list(scores.items()), np.float64).reshape(-1, 2)}
        store.save("classifier", stage_key, saved)
    std = Standardizer(jnp.asarray(saved["std_mean"]), jnp.asarray(saved["std_scale"]))
    model = LinearModel(jnp.asarray(saved["weights"]))
    C, n_iter, loss, grad_norm = (float(v) for v in saved["info"])
    results["classifier"] = {"loss": cfg.classifier.loss, "C": C}
    if cfg.classifier.loss != "ridge":  # a direct solve: no iterations, objective or gradient to report
        results["classifier"].update(n_iter=int(n_iter), objective=loss, grad_norm=grad_norm)
    if len(saved["C_grid"]):
        results["C_validation"] = {f"{c:g}": float(a) for c, a in saved["C_grid"]}
    return std, model


def run(cfg: Config, *, data_dir=None, out: str | os.PathLike = "runs", resume: str | os.PathLike | None = None,
        cache: str | os.PathLike | None = None, quiet: bool = False) -> dict:
    """Run one experiment; write its folder; return the results dict (also ``results.json``).

    Args:
      cfg: the validated config.
      data_dir: the CIFAR-10 folder (default: KMJAX_DATA_DIR, else the download cache).
      out: parent of the new run folder ``out/NAME`` (``NAME-2``, ... if taken).
      resume: an existing run folder to continue in instead: stages whose config is unchanged
        are loaded from it, the rest recomputed (and results.json rewritten).
      cache: a folder for finished stages shared between runs (a sweep's); default: the run folder.
      quiet: print nothing but errors.
    """
    if cfg.features.enabled and cfg.preprocess.normalize == "dimension":
        raise ValueError("preprocess.normalize = 'dimension' is for dictionaries only (features.enabled = false);"
                         " the dense features use per-patch normalization: set it to 'patch' or 'none'")
    if resume is not None and not (Path(resume) / "config.json").is_file():
        raise ValueError(f"{resume} is not a run folder (no config.json); pass the folder a run wrote")
    t_start = time.perf_counter()
    timer = _Timer(quiet)
    key_dict, key_val = jax.random.split(jax.random.key(cfg.seed))
    keys = stage_keys(cfg)
    with timer.stage("load"):
        train = load_cifar10(data_dir, "train", batches=cfg.data.train_batches)
        train_images, train_labels = train.images, train.labels
        if cfg.data.n_train:
            train_images, train_labels = train_images[: cfg.data.n_train], train_labels[: cfg.data.n_train]
        test = None
        if cfg.features.enabled and cfg.data.n_test != -1:
            test = load_cifar10(data_dir, "test")
            if cfg.data.n_test:
                test = test._replace(images=test.images[: cfg.data.n_test], labels=test.labels[: cfg.data.n_test])
    run_dir = new_run_dir(Path(out), cfg.name) if resume is None else Path(resume)
    store = _Store(Path(cache) if cache is not None else run_dir / "stages", quiet)
    _log(f"run folder: {run_dir}", quiet)
    results: dict = {"name": cfg.name, "seed": cfg.seed, "config": to_dict(cfg), "run_dir": str(run_dir),
                     "stage_keys": keys}
    _write_json(run_dir / "config.json", results["config"])

    zca, d = _dictionary_stage(cfg, train_images, key_dict, store, keys["dictionary"], timer)
    centroids = np.asarray(d["centroids"])
    n_patches, n_iter, converged, inertia = d["info"]
    results["kmeans"] = {
        "n_patches": int(n_patches), "n_iter": int(n_iter), "converged": bool(converged), "inertia": float(inertia),
        "objective": [float(v) for v in np.asarray(d["objective"])[: int(n_iter)]],
        "empty_clusters": int((np.asarray(d["counts"]) == 0).sum()),
    }
    channels = train_images.shape[-1]
    plots.save_filters(run_dir / "filters.png", centroids, cfg.patches.size, channels,
                       title=f"{cfg.name}: {cfg.kmeans.k} centroids")
    plots.save_objective(run_dir / "objective.png", d["objective"])
    # the dictionary on its own, also for runs without a classifier (the blog post's)
    dictionary = {"centroids": centroids, "objective": np.asarray(d["objective"]),
                  "patch_shape": np.array([cfg.patches.size, cfg.patches.size, channels])}
    if zca is not None:
        dictionary.update(zca_mean=np.asarray(zca.mean), zca_matrix=np.asarray(zca.matrix))
    atomic_write(run_dir / "dictionary.npz", lambda f: np.savez(f, **dictionary))

    if cfg.features.enabled:
        f_train, f_test = _features_stage(cfg, train_images, None if test is None else test.images, zca,
                                          centroids, store, keys["features"], timer, quiet)
        if cfg.features.train_flip:
            train_labels = np.concatenate([train_labels, train_labels])
        std, model = _classifier_stage(cfg, f_train, train_labels, key_val, store, keys["classifier"], timer,
                                       quiet, results)
        with timer.stage("evaluate"):  # in blocks: no standardized copy of all the features
            results["train_accuracy"] = float(np.mean(predict_features(std, model, f_train) == train_labels))
            if f_test is not None:
                pred = predict_features(std, model, f_test)
                conf = np.zeros((10, 10), np.int64)
                np.add.at(conf, (test.labels, pred), 1)
                results["test_accuracy"] = float((pred == test.labels).mean())
                results["per_class_accuracy"] = {
                    name: float(conf[i, i] / max(conf[i].sum(), 1)) for i, name in enumerate(test.class_names)}
                results["confusion"] = conf.tolist()
                plots.save_confusion(run_dir / "confusion.png", conf, test.class_names)
        save_model(run_dir / "model.npz", Model(feature_spec(cfg), zca, jnp.asarray(centroids), std, model,
                                                train.class_names, tuple(train_images.shape[1:])))

    results["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - t_start, 3)}
    results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["environment"] = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "jax": jax.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
        "cpu_count": os.cpu_count(),
    }
    _write_json(run_dir / "results.json", results)
    return results


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["kmeans.k=100,200", "preprocess.whiten=true,false"]`` -> {"kmeans.k": [100, 200], ...}."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"grid {item!r} must look like section.key=value1,value2,...")
        key, values = item.split("=", 1)
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ConfigError(f"grid {item!r} lists no values")
    return grid


def sweep(config_path, grid: dict[str, list], *, overrides: list[str] = (), data_dir=None,
          out: str | os.PathLike = "runs", quiet: bool = False) -> list[dict]:
    """Run every combination of ``grid`` values on top of a config; one table and one plot.

    Runs share one stage cache, so a stage that a grid key does not affect (the dictionary when
    only the encoder changes, the features when only the classifier does) is computed once.
    ``sweep.csv`` / ``sweep.json`` are rewritten after each run: an interrupted sweep keeps
    every finished row, and rerunning it with ``--resume`` reuses every finished stage.
    """
    import itertools

    base = load_config(config_path, list(overrides))  # validate before any work
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys)))
    configs = []
    for combo in combos:
        sets = list(overrides) + [f"{k}={v}" for k, v in zip(keys, combo)]
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        configs.append((combo, load_config(config_path, sets + [f"name={_safe_name(base.name + '_' + label)}"])))
    sweep_dir = new_run_dir(Path(out), f"{base.name}-sweep")
    _log(f"sweep folder: {sweep_dir} ({len(configs)} runs)", quiet)
    rows = []
    for i, (combo, cfg) in enumerate(configs):
        _log(f"=== sweep run {i + 1}/{len(configs)}: {cfg.name}", quiet)
        res = run(cfg, data_dir=data_dir, out=sweep_dir / "runs", cache=sweep_dir / "cache", quiet=quiet)
        rows.append({**dict(zip(keys, _typed(combo))), "train_accuracy": res.get("train_accuracy"),
                     "test_accuracy": res.get("test_accuracy"), "seconds": res["seconds"]["total"],
                     "run_dir": res["run_dir"]})
        _write_sweep(sweep_dir, keys, rows)
    plots.save_sweep(sweep_dir / "sweep.png", keys, rows)
    return rows


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)


def _typed(values):
    return [_parse_value(v) for v in values]


def _write_sweep(sweep_dir: Path, keys, rows) -> None:
    import csv
    import io

    _write_json(sweep_dir / "sweep.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys + ["train_accuracy", "test_accuracy", "seconds", "run_dir"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / "sweep.csv", lambda f: f.write(buf.getvalue().encode()))


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
