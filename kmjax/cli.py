"""Command line: ``kmjax run CONFIG`` and ``kmjax info`` (the shell around the library).

Exit codes: 0 success, 2 bad usage / config / data, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_run(args) -> int:
    from kmjax.config import load_config
    from kmjax.experiment import run, summary

    cfg = load_config(args.config, args.set)
    results = run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume, cache=args.cache,
                  quiet=args.quiet)
    print(summary(results))
    return 0


def _cmd_info(args) -> int:
    import jax

    from kmjax import __version__
    from kmjax.data import BATCHES_FOLDER, resolve_data_dir

    print(f"kmjax {__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
    for d in jax.devices():
        print(f"  device {d.id}: {d.device_kind} ({d.platform})")
    root = resolve_data_dir(args.data_dir)
    found = (root / BATCHES_FOLDER).is_dir()
    print(f"data folder: {root} ({'CIFAR-10 found' if found else 'no CIFAR-10 yet: kmjax run downloads it'})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmjax", description="k-means feature learning on CIFAR-10, in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment from a TOML config",
                       description="Run one experiment: dictionary, features, classifier, evaluation.")
    r.add_argument("config", help="TOML config file (see configs/)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set kmeans.k=400 (repeatable)")
    r.add_argument("--data-dir", help="folder that contains cifar-10-batches-py "
                   "(default: $KMJAX_DATA_DIR, else download into ~/.cache/kmjax)")
    r.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue in an existing run folder: finished stages "
                   "whose config is unchanged are reused (after an interruption, or to retrain only the classifier)")
    r.add_argument("--cache", metavar="DIR", help="folder of finished stages shared between runs (default: the run folder)")
    r.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    r.set_defaults(func=_cmd_run)
    i = sub.add_parser("info", help="devices, versions and where the data is looked for")
    i.add_argument("--data-dir")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    from kmjax.config import ConfigError
    from kmjax.data import DataError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ValueError) as e:
        print(f"kmjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kmjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
