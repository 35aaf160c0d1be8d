"""Command line: ``kmjax run | sweep | export | predict | filters | bench | info`` (the shell).

Exit codes scripts can rely on: 0 success; 1 an unexpected error, printed with its traceback (a
bug: please report it); 2 bad usage, config, data, input or output folder (the message says what
to fix); 130 interrupted. Exit code 2 is given for exactly the errors a user can fix: a
``kmjax.errors.KmjaxError``, or an ``OSError`` such as a missing file or a full disk
(``_USER_ERRNOS``). Any other exception, a plain ``ValueError`` from inside NumPy or JAX included,
is a bug.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

from kmjax.errors import KmjaxError

__all__ = ["main"]


class _UsageError(KmjaxError):
    """Bad input to a command: exit code 2 with the message."""


def _cmd_run(args) -> int:
    from kmjax.config import load_config
    from kmjax.experiment import run, summary

    from kmjax.experiment.plan import data_line

    cfg = load_config(args.config, args.set)
    results = run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume, cache=args.cache,
                  quiet=args.quiet, compile_cache=args.compile_cache)
    print(summary(results))
    print(f"  data: {data_line(results.get('data'))}")
    return 0


def _cmd_sweep(args) -> int:
    from kmjax.config import load_config
    from kmjax.experiment.plan import data_line, describe_data
    from kmjax.experiment.provenance import TEST_KEYS, test_accuracy_of
    from kmjax.experiment.sweep import FOLD, fold_summary, parse_grid, sweep

    rows = sweep(args.config, parse_grid(args.grid), overrides=args.set, data_dir=args.data_dir, out=args.out,
                 resume=args.resume, quiet=args.quiet, compile_cache=args.compile_cache)
    keys = [k for k in rows[0] if k not in ("train_accuracy", "test_set", *TEST_KEYS.values(), "seconds", "run_dir")]
    print(f"data: {data_line(describe_data(load_config(args.config, args.set), args.data_dir))}")
    for r in rows:
        tested = test_accuracy_of(r)
        acc = "-" if tested is None else f"{100 * tested[1]:.2f}%" + ("" if tested[0] == "full" else f" ({tested[0]})")
        print("  ".join(f"{k}={r[k]}" for k in keys) + f"  test {acc}  ({r['seconds']:.0f} s)")
    for g in fold_summary(rows) if FOLD in keys else []:  # STL-10's protocol: mean +- std over the folds
        std = "" if g["std"] is None else f" +- {100 * g['std']:.2f}"
        others = "  ".join(f"{k}={g[k]}" for k in keys if k in g)
        print(f"{others + '  ' if others else ''}test {100 * g['mean']:.2f}%{std} over {len(g['folds'])} folds "
              f"(mean +- sample std; folds.json)")
    print(f"table and plot: {Path(rows[0]['run_dir']).parent.parent}")
    return 0


def _cmd_export(args) -> int:
    from kmjax.experiment.export import data_of, export_features
    from kmjax.experiment.plan import data_line

    out = export_features(args.run_dir, args.out)
    print(out)
    print(f"data: {data_line(data_of(args.run_dir))}", file=sys.stderr)  # stdout: the file alone
    return 0


def _cmd_bench(args) -> int:
    import importlib

    importlib.import_module(f"kmjax.benchmarks.{args.what}").main(args.args)
    return 0


def _free_path(path: Path) -> Path:
    """``path``, or path-2, path-3, ... with the same suffix: an existing file is never overwritten."""
    candidate, i = path, 1
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return candidate


def _cmd_filters(args) -> int:
    from kmjax import plots
    from kmjax.checkpoint import read_meta
    from kmjax.model import load, load_dictionary

    path = Path(args.source)
    candidates = [path / "model.npz", path / "dictionary.npz"] if path.is_dir() else [path]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise _UsageError(f"{path} is neither a run folder (model.npz or dictionary.npz) nor such a file")
    source = found[0]
    if read_meta(source, "kmjax file").get("kind") == "model":
        model = load(source)
        centroids, size, channels = model.centroids, model.spec.patch_size, model.image_shape[2]
    else:
        dictionary, (size, _, channels) = load_dictionary(source)
        centroids = dictionary.centroids
    # beside the run's own filters.png, never over it (or over an earlier redraw)
    out = Path(args.out) if args.out else _free_path(source.parent / "filters-redrawn.png")
    plots.save_filters(out, centroids, size, channels, title=f"{centroids.shape[0]} centroids")
    print(out)
    return 0


def _read_images(paths, resize: bool, shape):
    """Images from PNG/JPEG files or .npy arrays, as (N, H, W, C) of the model's ``shape`` (its C
    channels: "L" for one, else RGB); ``resize``: every image of another height or width, files and
    arrays alike, resized to the model's (bicubic)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    mode = "L" if shape[2] == 1 else "RGB"

    def sized(im):
        im = im.resize((shape[1], shape[0]), Image.BICUBIC) if resize and im.size != (shape[1], shape[0]) else im
        return np.asarray(im, np.uint8).reshape(im.size[1], im.size[0], -1)

    out = []
    for p in map(Path, paths):
        if p.suffix == ".npy":
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise _UsageError(f"cannot read {p}: {e}") from None
            if a.ndim not in (3, 4):
                raise _UsageError(f"{p} holds an array of shape {a.shape}: one image (H, W, C) or images "
                                  "(N, H, W, C) on the 0-255 scale")
            a = a[None] if a.ndim == 3 else a
            if resize and a.shape[1:3] != tuple(shape[:2]):
                if a.shape[-1] not in (1, 3) or not np.all((a >= 0) & (a <= 255)):
                    raise _UsageError(f"{p}: --resize takes arrays of 1 or 3 channels on the 0-255 scale, "
                                      f"got {a.shape}")
                a = np.stack([sized(Image.fromarray(np.rint(x[..., 0] if x.shape[-1] == 1 else x).astype(np.uint8)))
                              for x in a])
            out.extend(a)
            continue
        try:
            with Image.open(p) as im:
                out.append(sized(im.convert(mode)))  # grayscale / palette / alpha -> the channels of training
        except (OSError, UnidentifiedImageError) as e:
            raise _UsageError(f"cannot read image {p}: {e}") from None
    shapes = {tuple(a.shape) for a in out}
    if shapes != {tuple(shape)}:
        raise _UsageError(f"images must be {shape[0]}x{shape[1]} with {shape[2]} channels like the model's training "
                          f"images, got shapes {sorted(shapes)}; pass --resize to resize them (image files and .npy "
                          "arrays)")
    return np.stack(out)


def _cmd_predict(args) -> int:
    import numpy as np

    from kmjax.model import load, predict_images

    model = load(args.model)
    images = _read_images(args.images, args.resize, model.image_shape)
    if images.dtype != np.uint8:
        print("kmjax: warning: images are not uint8; they must be on the 0-255 scale of training",
              file=sys.stderr)
    labels = predict_images(model, images)
    names = [model.class_names[i] for i in labels]
    if args.json:
        print(json.dumps([{"input": str(p), "class": int(i), "name": n}
                          for p, i, n in zip(_expand(args.images, len(labels)), labels, names)]))
    else:
        for p, n in zip(_expand(args.images, len(labels)), names):
            print(f"{p}\t{n}")
    return 0


def _expand(paths, n):
    """One label per image: a .npy of several images is listed as file[i]."""
    if len(paths) == n:
        return paths
    return [f"{paths[0]}[{i}]" for i in range(n)] if len(paths) == 1 else [f"image {i}" for i in range(n)]


def _cmd_info(args) -> int:
    import os

    import jax

    from kmjax import __version__
    from kmjax.data import BATCHES_FOLDER, ENV_VAR, locate_data_dir
    from kmjax.experiment.compile_cache import ENV_VAR as CACHE_VAR, default_folder
    from kmjax.experiment.plan import data_locations

    from kmjax.experiment.report import cpu_model

    print(f"kmjax {__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
    print(f"  CPU: {cpu_model()}")
    for d in jax.devices():
        print(f"  device {d.id}: {d.device_kind} ({d.platform})")
    root, source = locate_data_dir(args.data_dir)
    where = {"argument": "from --data-dir", "env": f"from {ENV_VAR}", "cache": "the download cache"}[source]
    folder = root / BATCHES_FOLDER
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if not missing:
        state = "CIFAR-10 found"
    elif source == "cache":
        state = "no CIFAR-10 yet: kmjax run downloads it here (163 MB, checksum verified)"
    elif not folder.is_dir():
        state = (f"no {BATCHES_FOLDER}/ here: kmjax run will stop with an error; point --data-dir or {ENV_VAR} at "
                 f"the folder that contains {BATCHES_FOLDER}/, or set neither to download into the cache")
    else:
        state = f"incomplete, missing {', '.join(missing)}: runs that need those files will stop with an error"
    print(f"data folder ({where}): {root}\n  {state}")
    print("\n".join(["other data sets (data.dataset in a config; data.dir names their folder):",
                     *data_locations(args.data_dir)]))
    cache = os.environ.get(CACHE_VAR, str(default_folder()))
    print(f"compile cache ({'from ' + CACHE_VAR if CACHE_VAR in os.environ else 'default'}): {cache}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmjax", description="k-means feature learning on CIFAR-10, in JAX",
                                epilog="exit codes: 0 ok, 1 unexpected error (a bug, printed with its traceback), "
                                "2 bad usage/config/data/files (the message says what to fix), 130 interrupted")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp):
        sp.add_argument("--data-dir", help="folder that contains cifar-10-batches-py "
                        "(default: $KMJAX_DATA_DIR, else download into ~/.cache/kmjax)")

    def config_args(sp):
        sp.add_argument("config", help="TOML config: a file, or the name of a shipped config "
                        "(e.g. coates2011_triangle_1600; see kmjax info)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set kmeans.k=400 (repeatable)")
        data_args(sp)
        sp.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
        sp.add_argument("--compile-cache", metavar="DIR|off", help="JAX's persistent compilation cache "
                        "(default: $KMJAX_COMPILE_CACHE, else ~/.cache/kmjax/jax; 'off' disables it)")
        sp.add_argument("--devices", type=int, metavar="N", help="k-means and features data-parallel on N local "
                        "devices (0: all; the config key `devices`); on a CPU, splits it into N devices "
                        "(0: one per hardware thread, at most 8)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output, only the summary")
        d = sp.add_argument_group("several processes (hosts): start the same command in each; see docs/scaling.md")
        d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, where JAX's coordination "
                       "service listens (with --num-processes and --process-id)")
        d.add_argument("--num-processes", type=int, metavar="P", help="number of processes")
        d.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. P-1")
        d.add_argument("--distributed", action="store_true", help="take the three from the cluster's environment "
                       "(SLURM, Open MPI, Cloud TPU: what jax.distributed.initialize detects)")
        d.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S", help="seconds after which the "
                       "processes give up on one that stopped answering (default 60)")
        d.add_argument("--hang-timeout", type=int, default=3600, metavar="S", help="seconds after which the "
                       "processes waiting for one give up on it if it shows no progress (no progress or log line, "
                       "no collective passed; default 3600): a process that hangs rather than dies")

    r = sub.add_parser("run", help="run one experiment from a TOML config",
                       description="Run one experiment: dictionary, features, classifier, evaluation.")
    config_args(r)
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run of the same config in its "
                   "folder; with only classifier settings changed, run them in a new folder beside it that reuses "
                   "its dictionary and features")
    r.add_argument("--cache", metavar="DIR",
                   help="folder of finished stages shared between runs (default: the run folder)")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("sweep", help="run a grid of configs; one table and one plot",
                       description="Run every combination of --grid values on top of CONFIG; stages that a "
                       "grid key does not change are computed once. Writes sweep.csv, sweep.json, sweep.png.")
    config_args(s)
    s.add_argument("--grid", action="append", required=True, metavar="SECTION.KEY=V1,V2,...",
                   help="values to sweep, e.g. --grid kmeans.k=100,400,1600 (repeatable: the grid is the product)")
    s.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep in its folder")
    s.set_defaults(func=_cmd_sweep)

    e = sub.add_parser("export", help="write a finished run's features, labels and split to one .npz",
                       description="Write the training and test features of a finished run, with their labels "
                       "(and which training rows are mirror images), for a classifier of your own.")
    e.add_argument("run_dir", help="a run folder")
    e.add_argument("--out", required=True, help=".npz file to write")
    e.set_defaults(func=_cmd_export)

    pr = sub.add_parser("predict", help="classify images with a trained model",
                        description="Classify PNG/JPEG files or .npy arrays (H, W, C) or (N, H, W, C) on the "
                        "0-255 scale, at the model's own image size: the size of its training images (H x W, "
                        "C channels; model.image_shape, named in the error when the images differ).")
    pr.add_argument("model", help="model.npz of a run folder")
    pr.add_argument("images", nargs="+", help="image files (.png, .jpg) or .npy arrays")
    pr.add_argument("--resize", action="store_true", help="resize images (files and .npy arrays) to the model's "
                    "training size (bicubic) instead of failing")
    pr.add_argument("--json", action="store_true", help="print JSON instead of lines")
    pr.set_defaults(func=_cmd_predict)

    f = sub.add_parser("filters", help="draw a dictionary's filters as an image")
    f.add_argument("source", help="a run folder, or its model.npz or dictionary.npz")
    f.add_argument("--out", help="PNG to write (default: filters-redrawn.png beside the source, never over a file)")
    f.set_defaults(func=_cmd_filters)

    b = sub.add_parser("bench", help="benchmarks: k-means against scikit-learn/faiss/PyTorch, feature extraction",
                       description="Run a benchmark (kmjax.benchmarks.WHAT); arguments after WHAT go to it "
                       "(kmjax bench kmeans --help).")
    b.add_argument("what", choices=["kmeans", "features"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser("info", help="devices, versions, where the data and the compile cache are")
    data_args(i)
    i.set_defaults(func=_cmd_info)
    return p


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR}


def _exit_code(e: BaseException) -> int:
    """130 for an interrupt; 2 for what the user can fix: a ``KmjaxError``, or an ``OSError`` of
    a file or folder (missing, not writable, disk full: ``_USER_ERRNOS``); 1 for anything else,
    which is a bug (a plain ``ValueError`` from inside NumPy or JAX too)."""
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, KmjaxError) or (isinstance(e, OSError) and e.errno in _USER_ERRNOS):
        return 2
    return 1


def _message(e: BaseException) -> str:
    """The one line printed for an error of exit code 2."""
    if isinstance(e, OSError) and not isinstance(e, KmjaxError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    return str(e)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "devices", None) is not None:
        args.set = list(args.set) + [f"devices={args.devices}"]
    if args.command in ("run", "sweep"):
        _split_cpu(args)
    if _several_processes(args):
        return _run_distributed(args)
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        code = _exit_code(e)
        if code == 130:
            print("kmjax: interrupted; finished stages are saved: rerun with --resume RUN_DIR", file=sys.stderr)
        elif code == 2:
            print(f"kmjax: error: {_message(e)}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"kmjax: unexpected error ({type(e).__name__}), a bug: please report it with the traceback "
                  "above", file=sys.stderr)
        return code


def _split_cpu(args) -> None:
    """Before JAX starts, split the CPU into the devices the config asks for (``devices``, or
    ``--devices``; 0: one per hardware thread, at most 8, and one with several processes;
    ``kmjax.parallel.split_cpu``): k-means and the features then run data-parallel over them."""
    from kmjax.config import load_config
    from kmjax.parallel import split_cpu

    try:
        devices = load_config(args.config, args.set).devices
    except (ValueError, OSError):  # the command itself reports it
        return
    if devices == 0 and _several_processes(args):
        return  # processes on different hosts would count different cores: one CPU device each
    split_cpu(devices)


def _several_processes(args) -> bool:
    given = [getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise SystemExit("kmjax: error: --coordinator, --num-processes and --process-id go together "
                         "(or use --distributed to read them from the cluster's environment)")
    return getattr(args, "distributed", False) or given[0] is not None


def _run_distributed(args) -> int:
    """``args.func`` as one of several processes: started together, and stopped together on a
    failure (a process that fails exits at once; the others stop on its missing heartbeats)."""
    from kmjax.experiment import processes

    try:
        processes.start(args.coordinator, args.num_processes, args.process_id,
                        heartbeat_timeout=args.heartbeat_timeout, hang_timeout=args.hang_timeout,
                        leave_after_share=args.command == "run")  # a sweep needs every process for its next run
    except Exception as e:  # a wrong address, a process id out of range, no cluster environment
        print(f"kmjax: error: could not join the other processes: {e}", file=sys.stderr)
        return 2
    where = f"process {processes.index()} of {processes.count()}"
    if not processes.is_main():
        sys.stdout = open(os.devnull, "w")  # one summary, from process 0
    try:
        code = args.func(args)
    except BaseException as e:  # noqa: BLE001 - every failure ends every process
        exit_code = _exit_code(e)
        if exit_code == 1:  # a bug: its traceback, as in one process
            traceback.print_exc()
        processes.abort(f"kmjax: error in {where}: {str(e) or type(e).__name__}\nkmjax: the run stops on every "
                        f"process (one that died or failed ends it; the others stop within --heartbeat-timeout, "
                        f"{args.heartbeat_timeout} s). The run folder keeps what process 0 finished: rerun the same "
                        "command on every process with --resume RUN_DIR.", exit_code)
    return code


if __name__ == "__main__":
    sys.exit(main())
