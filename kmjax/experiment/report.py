"""What a run tells its user: progress lines, stage timers (run and compile seconds), provenance,
and the closing summary."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import jax

from kmjax.experiment import processes
from kmjax.experiment.compile_cache import CompileCounter
from kmjax.experiment.provenance import source_commit, test_accuracy_of

__all__ = ["log", "Timer", "progress", "environment", "summary", "CompileCounter", "AnonMemoryPeak"]


def log(msg: str, quiet: bool = False) -> None:
    processes.beat()  # quiet or not: each line is progress, which the other processes watch for
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


class AnonMemoryPeak:
    """The peak of the process's anonymous memory (``RssAnon`` of ``/proc/self/status``: its own
    arrays, not the pages of memory-mapped files, which the kernel can drop and re-read), sampled
    every ``interval`` seconds by a thread while the ``with`` block runs. ``peak_mb`` is None where
    there is no ``/proc`` (not Linux). ``ru_maxrss`` counts the mapped pages of the feature files
    too, so it reports more than a run needs."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_mb = interval, None
        self._stop = threading.Event()

    @staticmethod
    def _read():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _sample(self):
        while True:
            mb = self._read()
            if mb is not None:
                self.peak_mb = mb if self.peak_mb is None else max(self.peak_mb, mb)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Timer:
    """Wall seconds, and what was compiled (``compile_cache.Compiles``), per named stage."""

    def __init__(self, quiet: bool):
        self.seconds: dict[str, float] = {}
        self.compiles: dict[str, dict] = {}
        self.quiet = quiet
        self.start = CompileCounter.snapshot()

    @property
    def compile_seconds(self) -> dict[str, float]:
        return {name: c["seconds"] for name, c in self.compiles.items()}

    def total_compiles(self) -> dict:
        """Each stage's compiles and the whole run's, since this timer started (``"total"``)."""
        return {**self.compiles, "total": (CompileCounter.snapshot() - self.start).record()}

    @contextmanager
    def stage(self, name: str):
        log(f"[{name}] ...", self.quiet)
        t0, c0 = time.perf_counter(), CompileCounter.snapshot()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        c = self.compiles[name] = (CompileCounter.snapshot() - c0).record()
        log(f"[{name}] {self.seconds[name]:.1f} s (compiling {c['seconds']:.1f} s: {c['programs']} "
            f"program{'s' * (c['programs'] != 1)}, {c['from_cache']} from the compile cache)", self.quiet)


def progress(label: str, quiet: bool, unit: str = "images", start: int = 0):
    """A reporter ``report(done, total, value=None)``: a live line on a terminal, a line per 10%
    in a log file, with the time remaining; None when quiet. ``start``: the count already done
    before this reporter (a resumed job), left out of the rate. Each report is progress, which the
    other processes of a run on several watch for (``processes.beat``): there, a quiet reporter beats
    and prints nothing."""
    if quiet:
        return (lambda done, total, value=None: processes.beat()) if processes.watching() else None
    t0 = time.perf_counter()
    live = sys.stderr.isatty()
    last = [-1.0]

    def report(done, total, value=None):
        processes.beat()
        done, total = int(done), int(total)
        elapsed = time.perf_counter() - t0
        if live:
            if done < total and elapsed - last[0] < 0.5:
                return
        elif done < total and int(10 * done / total) == int(10 * last[0]):
            return
        last[0] = elapsed if live else done / total
        rate = max(done - start, 1) / max(elapsed, 1e-9)
        extra = "" if value is None else f", objective {float(value):.6g}"
        left = f", {(total - done) / rate:.0f} s left" if 0 < done < total else ""
        end = "\n" if done == total or not live else "\r"
        print(f"  {label}: {done}/{total} {unit} ({rate:.3g}/s{left}{extra})", end=end, file=sys.stderr, flush=True)

    return report


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name and its matrix extensions (AMX, AVX-512), e.g. "Intel(R) Xeon(R)
    Processor (avx512f, amx_bf16)"; the machine type where /proc/cpuinfo is absent."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extensions)})" if extensions else name


def environment() -> dict:
    """Provenance for results.json: package versions, device, the kmjax source commit if any."""
    from kmjax import __version__

    return {
        "kmjax": __version__,
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "optax", "numpy", "matplotlib")},
        "python": platform.python_version(),
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "git": source_commit(),
    }


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{results['name']}: {results['run_dir']}"]
    k = results["kmeans"]
    lines.append(f"  k-means: {k['n_iter']} iterations, objective {k['inertia']:.6g}, "
                 f"{k['empty_clusters']} empty clusters")
    if "train_accuracy" in results:
        lines.append(f"  train accuracy: {100 * results['train_accuracy']:.2f}%")
    tested = test_accuracy_of(results)
    if tested is not None:
        kind, accuracy = tested
        about = {"full": "", "partial": f" (the first {results['test_set']['images']:,} test images only)",
                 "stand-in": " (a STAND-IN test set that shares images with the training set)"}[kind]
        lines.append(f"  test accuracy:  {100 * accuracy:.2f}%{about}")
    s = results["seconds"]
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()))
    total = results.get("compiles", {}).get("total")
    if total:
        lines.append(f"  of which compiling: {total['seconds']:.1f} ({total['programs']} programs, "
                     f"{total['from_cache']} from the compile cache)")
    elif results.get("compile_seconds"):  # a run of older kmjax
        lines.append(f"  of which compiling: {sum(results['compile_seconds'].values()):.1f}")
    anon = results.get("peak_anon_memory_mb")
    lines.append(f"  peak memory: {results['peak_memory_mb']:.0f} MB resident"
                 + ("" if anon is None else f", {anon:.0f} MB without the mapped feature files"))
    return "\n".join(lines)
