"""``run``: one experiment from a config, stage by stage, into one run folder.

Stages: load data -> dictionary (``learn_dictionary``) -> dense features (``extract_features``,
written to disk) -> classifier (``fit_classifier``: C chosen on a held-out split if asked) ->
evaluation. Everything random comes from ``jax.random.key(config.seed)``: the same config and seed
give the same numbers on the same machine.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kmjax import __version__, plots
from kmjax.augment import mirror
from kmjax.classify import ClassifierState, LinearModel, Standardizer, fit_classifier, predict_features
from kmjax.config import Config, parse_config, to_dict
from kmjax import templates
from kmjax.dictionary import Dictionary, learn_dictionary
from kmjax.experiment import processes
from kmjax.experiment.plan import (classifier_spec, describe_data, dictionary_options, dictionary_patches,
                                   feature_spec, local_mesh, mirror_sums, prepare_data, run_mesh, training_copies,
                                   training_images)
from kmjax.experiment.compile_cache import use_compile_cache
from kmjax.experiment.provenance import stage_code, start_record, test_set
from kmjax.experiment.report import AnonMemoryPeak, Timer, log, progress
from kmjax.experiment.role import Main, Worker
from kmjax.experiment.report import environment as report_environment
from kmjax.experiment.shared import shared_gram, shared_kernel, shared_solver
from kmjax._io import read_json, remove_stale_temporaries
from kmjax.experiment.store import (RunError, RunLock, StageStore, config_differences, new_run_dir,
                                    stage_keys, write_json)
from kmjax.features import extract_features, feature_dim
from kmjax.model import Model, save_dictionary
from kmjax.symmetry import check_mirror_symmetric
from kmjax.model import save as save_model

__all__ = ["run"]

_SEGMENT = 2048  # images between two records of the feature rows written (resume points)
_SAVE_KMEANS = 30.0  # seconds between two checkpoints of the k-means loop


def _plan_resume(cfg: Config, resume: Path):
    """(run folder, finished results or None) for ``--resume``; refuses another experiment's folder."""
    config_file = resume / "config.json"
    if not config_file.is_file():
        raise RunError(f"{resume} is not a run folder (no config.json); pass the folder a run wrote")
    before = read_json(config_file, "start a new run instead of resuming")
    try:  # read as a config of today's kmjax (spellings that changed, defaults added since)
        before = to_dict(parse_config(before))
    except ValueError:
        pass  # compared as written: the differences name the keys
    diffs = config_differences(before, to_dict(cfg))
    if not diffs:
        results = resume / "results.json"
        return resume, (read_json(results, "the run finished but its results are damaged: delete results.json to "
                                  "compute them again from the saved stages") if results.is_file() else None)
    listed = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in ((k, *v) for k, v in diffs.items()))
    if all(k.startswith("classifier.") for k in diffs):
        return None, None  # a new folder beside it, sharing its stages
    raise RunError(f"the config differs from the one in {config_file} ({listed}); --resume continues the same "
                   "experiment, and only classifier settings may change (into a new folder beside it). "
                   "Run without --resume to start a new experiment.")


def _record_start(run_dir: Path, code: dict, keys: dict, quiet: bool) -> list[dict]:
    """Append this start (or resume) to the run folder's ``provenance.json``; say which stages the
    code changed since the last start (their keys differ: they are computed again). Returns every
    start recorded."""
    path = run_dir / "provenance.json"
    starts = read_json(path, "the run's record of its starts is damaged: start a new run instead of resuming",
                       keys=["starts"]) if path.is_file() else []
    record = {**start_record(code), "stage_keys": keys}
    if starts:
        changed = [stage for stage, code in record["code"].items() if starts[-1].get("code", {}).get(stage) != code]
        if changed:
            log(f"resuming with other kmjax code than the last start ({(starts[-1].get('git') or {}).get('commit')} "
                f"-> {(record['git'] or {}).get('commit')}): the {', '.join(changed)} stage{'s' * (len(changed) > 1)} "
                "and those after are computed again, not read from files other code wrote", quiet)
    starts.append(record)
    write_json(path, {"starts": starts})
    return starts


def run(cfg: Config, *, data_dir=None, out: str | os.PathLike = "runs", resume: str | os.PathLike | None = None,
        cache: str | os.PathLike | None = None, quiet: bool = False, compile_cache=None) -> dict:
    """Run one experiment; write its folder; return the results dict (also ``results.json``).

    Args:
      cfg: the validated config.
      data_dir: the data dir when the config's ``data.dir`` is empty (default: KMJAX_DATA_DIR, else the cache).
      out: parent of the new run folder ``out/NAME`` (``NAME-2``, ... if taken).
      resume: an existing run folder of the same config: its finished stages are loaded and the
        rest computed; a finished run is returned as it is. A config that differs only in the
        classifier section runs in a new folder beside it that reuses its stages; any other
        difference is an error (``RunError``).
      cache: a folder for finished stages shared between runs (a sweep's); default: the run folder.
      quiet: print nothing but errors.
      compile_cache: JAX's persistent compilation cache folder, or "off" (default: ``KMJAX_COMPILE_CACHE``,
        else ``~/.cache/kmjax/jax``; see ``kmjax.experiment.compile_cache``).
    """
    use_compile_cache(compile_cache)
    if cfg.features.enabled and cfg.preprocess.normalize == "dimension":
        raise RunError("preprocess.normalize = 'dimension' is for dictionaries only (features.enabled = false); "
                       "the dense features use per-patch normalization: set it to 'patch' or 'none'")
    run_dir = stages = None
    main = processes.is_main()
    quiet = quiet or not main  # one process reports
    if resume is not None:
        resume = Path(resume)
        plan = _plan_resume(cfg, resume) if main else None
        run_dir, finished = processes.agree(None if plan is None else [None if plan[0] is None else str(plan[0]),
                                                                       plan[1]])
        run_dir = None if run_dir is None else Path(run_dir)
        if finished is not None:
            log(f"{run_dir} has finished already: its results are returned as they are", quiet)
            return finished
        if run_dir is None:  # only the classifier changed
            stages = resume / "stages"
            out = resume.parent
            log(f"only classifier settings differ from {resume}: a new run folder beside it, reusing its stages",
                quiet)
    t_start = time.perf_counter()
    environment = report_environment() if main else None  # the code as it is when the run starts
    timer = Timer(quiet)
    with timer.stage("load"):
        train, test, dictionary_images, ids, test_size = prepare_data(cfg, data_dir)
        if mirror_sums(cfg):
            try:
                check_mirror_symmetric(feature_spec(cfg), train.images.shape[1:])
            except ValueError as e:
                raise RunError(f"kmeans.flip_closed with features.train_flip needs mirror-symmetric features: {e}") \
                    from None
        if test is not None and main:  # which kind of test set: its accuracy is reported under that name
            tested_on = test_set(test, train, len(test.labels) == test_size)
        mesh = run_mesh(cfg)
        devices = 1 if mesh is None else mesh.size  # the actual count: float sums depend on it
        code = stage_code()
        keys = stage_keys({**to_dict(cfg), "devices": devices}, ids["train"], ids["test"], __version__, code,
                          dictionary_id=ids["dictionary"])
        if processes.agree(keys) != keys:  # the same config and data: another kmjax source on this host
            raise RunError(f"process {processes.index()} runs other kmjax code than process 0 (its stage keys differ: "
                           f"{keys}); install the same kmjax on every host")
    fresh = run_dir is None
    if fresh:
        run_dir = Path(processes.agree(str(new_run_dir(Path(out), cfg.name)) if main else None))
    if not main:  # the other processes share the work and write nothing
        return _run_stages(cfg, (train, dictionary_images), test, keys, run_dir, Worker(), timer, quiet, mesh)
    try:
        with RunLock(run_dir):
            remove_stale_temporaries(run_dir)
            if fresh:
                link = Path(cache) if cache is not None else stages
                if link is not None:
                    Path(link).mkdir(parents=True, exist_ok=True)
                    os.symlink(os.path.relpath(Path(link).resolve(), run_dir.resolve()), run_dir / "stages")
            starts = _record_start(run_dir, code, keys, quiet)
            with AnonMemoryPeak() as memory, StageStore(run_dir / "stages") as store:
                results = _run_stages(cfg, (train, dictionary_images), test, keys, run_dir, Main(store), timer,
                                      quiet, mesh)
            results["data"] = {**describe_data(cfg, data_dir), "n_dictionary_images": len(dictionary_images.images)}
            results["starts"] = starts
            if "test_accuracy" in results:
                results["test_set"] = tested_on
                results[tested_on["accuracy_key"]] = results.pop("test_accuracy")
                if tested_on["kind"] != "full":
                    log(f"the test set is {'a stand-in: ' if tested_on['kind'] == 'stand-in' else ''}"
                        f"{tested_on['images']:,} images, {tested_on['images_also_in_training']:,} of them training "
                        f"images: its accuracy is reported as {tested_on['accuracy_key']}, not test_accuracy", quiet)
            if resume is not None and fresh:
                results["reused_stages_of"] = str(resume)
            results["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - t_start, 3)}
            results["compile_seconds"] = timer.compile_seconds
            results["compiles"] = timer.total_compiles()  # programs built, read from the compile cache, seconds
            results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            results["peak_anon_memory_mb"] = None if memory.peak_mb is None else round(memory.peak_mb, 1)
            results["environment"] = environment
            write_json(run_dir / "results.json", results)  # last, and still under the lock
            processes.done_sharing(results)  # the others leave (kmjax run), or wait for its results (a sweep)
    except BaseException:
        if fresh and not StageStore(run_dir / "stages").any_finished():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing to resume: the name is free again
        raise
    return results


def _run_stages(cfg, data, test, keys, run_dir, role, timer, quiet, mesh) -> dict:
    """The stages, as ``role`` (``kmjax.experiment.role``) plays them: a worker computes its part of
    the dictionary and the features (and of the shared classifier statistics), then returns the
    main process's results. ``data``: (the training images, the dictionary's)."""
    train, source = data
    key_dict, key_val = jax.random.split(jax.random.key(cfg.seed))
    if not role.is_main:
        dictionary = _dictionary_stage(cfg, source, key_dict, role, keys["dictionary"], timer, mesh)
        if cfg.features.enabled:
            mine = _features_stage(cfg, train, test, dictionary, role, keys["features"], timer, quiet, mesh)
            shared_gram(cfg, None, mine, len(train.class_names), key_val, role, keys["classifier"], quiet)
            shared_kernel(cfg, None, role, keys["classifier"], quiet)
        return processes.done_sharing(None)  # kmjax run: leaves here; a sweep: the main process's results
    log(f"run folder: {run_dir}", quiet)
    results: dict = {"name": cfg.name, "seed": cfg.seed, "config": to_dict(cfg), "run_dir": str(run_dir),
                     "stage_keys": keys, "n_train": len(train.labels),
                     "n_test": 0 if test is None else len(test.labels)}
    write_json(run_dir / "config.json", results["config"])

    store = role.store
    dictionary = _dictionary_stage(cfg, source, key_dict, role, keys["dictionary"], timer, mesh)
    km = dictionary.kmeans
    n_iter = int(km.n_iter)
    results["kmeans"] = {
        "n_patches": int(dictionary.n_patches), "n_iter": n_iter, "converged": bool(km.converged),
        "inertia": float(km.inertia), "objective": [float(v) for v in np.asarray(km.objective)[:n_iter]],
        "empty_clusters": int((np.asarray(km.counts) == 0).sum()),
    }
    channels = train.images.shape[-1]
    centroids = np.asarray(km.centroids)
    plots.save_filters(run_dir / "filters.png", centroids, cfg.patches.size, channels,
                       title=f"{cfg.name}: {cfg.kmeans.k} centroids")
    plots.save_objective(run_dir / "objective.png", km.objective)
    save_dictionary(run_dir / "dictionary.npz", dictionary, (cfg.patches.size, cfg.patches.size, channels))
    if not cfg.features.enabled:
        return results

    copies = training_copies(cfg)
    feats = _features_stage(cfg, train, test, dictionary, role, keys["features"], timer, quiet, mesh)
    f_train, f_test, labels = feats["train"], feats.get("test"), np.asarray(feats["train_labels"])
    f_mirror = feats.get("test_mirror")
    num_classes = len(train.class_names)
    shared_gram(cfg, f_train, feats.pop("mine", None), num_classes, key_val, role, keys["classifier"], quiet)
    shared_kernel(cfg, f_train, role, keys["classifier"], quiet)
    fit = _classifier_stage(cfg, f_train, labels, num_classes, copies, key_val, store, keys["classifier"], timer,
                            quiet)
    results["classifier"] = {"loss": cfg.classifier.loss, "C": fit["C"]}
    if fit.get("n_iter") is not None:  # a direct solve has no iterations, objective or gradient to report
        results["classifier"].update(n_iter=fit["n_iter"], objective=fit["objective"], grad_norm=fit["grad_norm"])
    if fit["scores"]:
        results["C_validation"] = fit["scores"]
    std, model = fit["standardizer"], fit["model"]
    with timer.stage("evaluate"):  # in blocks: no standardized copy of all the features
        results["train_accuracy"] = float(np.mean(predict_features(std, model, f_train) == labels))
        if test is not None:
            pred = predict_features(std, model, f_test, mirrors=f_mirror)
            conf = np.zeros((num_classes, num_classes), np.int64)
            np.add.at(conf, (test.labels, pred), 1)
            results["test_accuracy"] = float((pred == test.labels).mean())
            results["per_class_accuracy"] = {
                name: float(conf[i, i] / max(conf[i].sum(), 1)) for i, name in enumerate(test.class_names)}
            results["confusion"] = conf.tolist()
            plots.save_confusion(run_dir / "confusion.png", conf, test.class_names)
    save_model(run_dir / "model.npz", Model(feature_spec(cfg), dictionary.zca, jnp.asarray(centroids), std, model,
                                            train.class_names, tuple(train.images.shape[1:])))
    if not cfg.features.keep:
        names = list(feats)
        del f_train, f_test, f_mirror, feats
        store.delete_arrays("features", keys["features"], names)
        log("[features] stage files deleted (features.keep = false)", quiet)
    return results


def _first(found):
    return None if found is None else found[0]


def _dictionary_stage(cfg, train, key, role, stage_key, timer, mesh) -> Dictionary:
    like = templates.dictionary(cfg.preprocess.whiten, cfg.kmeans.max_iter)
    saved = role.send(lambda: _first(role.store.load_tree("dictionary", stage_key, like)), like)
    checkpoints = role.checkpoints("dictionary", stage_key, lambda line: log(line, timer.quiet))
    if saved is not None:
        log(f"[dictionary] reusing {role.folder}", timer.quiet)
        checkpoints.clear()  # left by a run killed after it saved the stage
        return saved
    state = role.send(lambda: checkpoints.get("kmeans"), templates.lloyd_state())
    saved_at = [time.monotonic()]

    def checkpoint(state):  # the k-means loop state, every _SAVE_KMEANS seconds (a worker's saves nothing)
        if role.is_main and time.monotonic() - saved_at[0] > _SAVE_KMEANS:
            checkpoints.save("kmeans", jax.tree.map(np.asarray, state))
            saved_at[0] = time.monotonic()

    with timer.stage("dictionary"):
        dictionary = learn_dictionary(key, train.images, **dictionary_options(cfg), mesh=mesh,
                                      progress=progress("k-means", timer.quiet, "iterations"),
                                      state=state, checkpoint=checkpoint,
                                      patches=dictionary_patches(cfg, key, train))
        dictionary = jax.tree.map(np.asarray, dictionary)
    role.local(lambda: role.store.save_tree("dictionary", stage_key, dictionary, {"kind": "dictionary"}))
    checkpoints.clear()
    return dictionary


def _features_stage(cfg, train, test, dictionary, role, stage_key, timer, quiet, mesh):
    """{"train": features, "train_labels": labels, and "test", "test_labels" (and "test_mirror") with a
    test set}: memmaps of the stage files (the labels saved beside the features, so that they can be
    exported alone). On several processes, also "mine": this process's training rows (indices,
    features, labels) when the Gram statistics are shared (``kmjax.experiment.shared.shared_solver``), else None; a
    worker returns only that."""
    copies = training_copies(cfg)
    parts = {"train": train} if test is None else {"train": train, "test": test}
    if test is not None and cfg.features.test_flip and not mirror_sums(cfg):  # else predictions are mirror-invariant
        parts["test_mirror"] = test._replace(images=mirror(test.images))
    names = [n for part in parts for n in (part, f"{part}_labels")]
    store = role.store  # None in a worker, which writes nothing
    found = role.local(lambda: store.load_arrays("features", stage_key, names))
    if role.decide(lambda: found is not None):
        log(f"[features] reusing {role.folder}", quiet)
        return found
    spec = feature_spec(cfg)
    dim = feature_dim(spec, dictionary.centroids.shape[0], train.images.shape[1:])
    if role.is_main:
        store.check_space(4 * dim * sum((copies if name == "train" else 1) * len(d.labels)
                                        for name, d in parts.items()), "features", stage_key)
    saved, kept = {}, []
    keep = shared_solver(cfg, len(train.labels) * copies, dim) == "gram"
    options = dict(memory_mb=cfg.features.memory_mb, precision=cfg.features.precision)
    with timer.stage("features"):
        for name, data in parts.items():
            images, labels = data.images, data.labels  # this process's images, every label
            n, held = len(labels), len(images)
            if name == "train" and copies > 1:  # mirrored and cropped images are as likely as the originals
                images = training_images(cfg, images, among=(np.arange(n)[processes.owned(n)], n))
                labels = np.concatenate([labels] * copies)
            # written straight to disk (the features of a large dictionary need not fit in memory),
            # in segments whose rows are recorded: an interrupted run resumes after the last one
            out, done = role.local(lambda: store.open_array("features", stage_key, name, (len(labels), dim))) \
                or (None, None)
            done = processes.agree(done)
            if name == "train" and done and keep:
                kept.append(None)  # rows computed before: no process holds all of its own
            if done:
                log(f"[features] {name}: resuming after {done} of {len(labels)} rows", quiet)
            report = progress(name, quiet, start=done)
            for start in range(done, len(labels), _SEGMENT):
                stop = min(start + _SEGMENT, len(labels))
                if processes.count() == 1:
                    extract_features(images[start:stop], dictionary.centroids, dictionary.zca, spec, mesh=mesh,
                                     out=out[start:stop], progress=None if report is None else
                                     lambda i, _n, _v, a=start: report(a + i, len(labels)), **options)
                else:  # each process the rows of its images (copy c of image i: row c n + i), gathered by the main one
                    rows = np.arange(start, stop)
                    owners = processes.owner(rows % n)
                    mine = rows[owners == processes.index()]
                    local = np.zeros((0, dim), np.float32) if not mine.size else extract_features(
                        images[mine // n * held + mine % n // processes.count()], dictionary.centroids,
                        dictionary.zca, spec, mesh=local_mesh(cfg), **options)
                    if name == "train" and keep and kept[:1] != [None]:  # for the Gram statistics of its rows
                        kept.append((mine, local, labels[mine]))
                    gathered = processes.gather_rows(local, owners)
                    if not role.is_main:
                        continue
                    out[start:stop] = gathered
                    if report is not None:
                        report(stop, len(labels))
                store.mark_rows(out, stop)
            if not role.is_main:
                continue
            saved[name] = out
            saved[f"{name}_labels"] = store.new_array("features", stage_key, f"{name}_labels", labels.shape, np.int32)
            saved[f"{name}_labels"][:] = labels
    # this process's training rows, features and labels: all of them, or none if the stage resumed
    mine = tuple(np.concatenate(parts) for parts in zip(*kept)) if kept and kept[0] is not None else None
    if not role.is_main:
        return mine
    store.commit_arrays("features", stage_key, saved)
    return {**store.load_arrays("features", stage_key, names), "mine": mine}


def _classifier_stage(cfg, features, labels, num_classes, copies, key, store, stage_key, timer, quiet) -> dict:
    saved = store.load_tree("classifier", stage_key, templates.classifier_stage())
    if saved is not None:
        log(f"[classifier] reusing {store.folder}", quiet)
        store.checkpoints("classifier", stage_key).clear()  # a 10 GB kernel left by a run killed after the save
        tree, meta = saved
    else:
        checkpoints = store.checkpoints("classifier", stage_key, lambda line: log(line, quiet))
        bar = [None]

        def step(line):  # the fit's log: a line as each step starts, whose progress gets a bar of its own
            log(line, quiet)
            bar[0] = progress("classifier", quiet, "done")

        def report(done, total, value):
            if bar[0] is not None:
                bar[0](done, total, value)

        with timer.stage("classifier"):
            fit = fit_classifier(features, labels, num_classes=num_classes, key=key, copies=copies,
                                 **classifier_spec(cfg)._asdict(), progress=report, log=step,
                                 state=checkpoints.state(ClassifierState), checkpoint=checkpoints.checkpoint)
        tree = {"standardizer": jax.tree.map(np.asarray, fit.standardizer), "model": jax.tree.map(np.asarray, fit.model)}
        meta = {"kind": "classifier", "C": fit.C, "scores": {f"{C:g}": a for C, a in fit.scores.items()},
                "n_iter": fit.n_iter, "objective": fit.objective, "grad_norm": fit.grad_norm}
        store.save_tree("classifier", stage_key, tree, meta)
        checkpoints.clear()  # the stage is saved whole: its intermediate results are no longer needed
    std = Standardizer(*map(jnp.asarray, tree["standardizer"]))
    model = LinearModel(*map(jnp.asarray, tree["model"]))
    return {**meta, "standardizer": std, "model": model}
