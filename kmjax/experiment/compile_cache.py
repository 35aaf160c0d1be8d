"""JAX's persistent compilation cache for runs, and a count of what a run compiles.

On a GPU most of a short run is XLA compilation (autotuning the matrix products); with the cache
a second run of the same shapes loads them instead. Default folder: ``$XDG_CACHE_HOME/kmjax/jax``
(``~/.cache/kmjax/jax``); ``KMJAX_COMPILE_CACHE`` (or ``--compile-cache`` / ``compile_cache=``)
names another folder, or ``off`` to disable it.

``CompileCounter`` listens to ``jax.monitoring``'s compile events (one listener per process, read
by difference). A run's ``results.json`` holds, under ``"compiles"``, for each stage (``load``,
``dictionary``, ``features``, ``classifier``, ``evaluate``: those that ran) and for the whole run
(``"total"``, from the start of ``run`` to its results: the work between stages included):

- ``programs``: XLA programs the process built (backend compiles: a jitted function at a new shape,
  dtype or sharding); a program already built in the process is not counted again;
- ``from_cache``: how many of them were read from the persistent cache instead of compiled;
- ``compiled``: ``programs - from_cache``, compiled from scratch (0 on a warm start);
- ``seconds``: seconds spent tracing, lowering and compiling (or reading from the cache) them.

``"compile_seconds"`` (per stage) is the same ``seconds``, kept for the readers of older runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

__all__ = ["ENV_VAR", "default_folder", "use_compile_cache", "CompileCounter", "Compiles"]

ENV_VAR = "KMJAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false", "")

# The three timed events of one compilation: tracing, lowering to MLIR, and the backend's
# compilation or its read from the persistent cache (jax/_src/dispatch.py), which counts programs
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # a program read from the persistent cache (jax/_src/compiler.py)


def default_folder() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "kmjax" / "jax"


def _switch(enabled: bool, folder: str | None) -> None:
    """Set JAX's cache options; JAX opens its cache once per process, at its first compilation, so a
    different folder (or turning it on or off) afterwards also resets that: the next compilation
    opens the one named here."""
    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    jax.config.update("jax_enable_compilation_cache", enabled)
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
    if (enabled, jax.config.jax_compilation_cache_dir) != before:
        _jax_cache.reset_cache()


def use_compile_cache(folder: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``folder`` (None: ``KMJAX_COMPILE_CACHE``, else
    the default folder; "off": disabled). Returns the folder in use, or None."""
    if folder is None:
        folder = os.environ.get(ENV_VAR, str(default_folder()))
    if str(folder).strip().lower() in OFF:
        _switch(False, None)
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs time: run without it
    # every program is written, however fast it compiled or small it is (-1: JAX may not raise the
    # size floor for the file system): a warm start then compiles nothing
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _switch(True, str(path))
    return path


class Compiles(NamedTuple):
    """Compilation so far in this process (``CompileCounter.read``), or between two reads (``-``)."""
    programs: int  # backend compiles: programs built, compiled or read from the persistent cache
    from_cache: int  # of them, read from the persistent cache
    seconds: float  # tracing, lowering and compiling (or reading)

    def __sub__(self, before: "Compiles") -> "Compiles":
        return Compiles(self.programs - before.programs, self.from_cache - before.from_cache,
                        self.seconds - before.seconds)

    def record(self) -> dict:
        """The entry of ``results.json``'s ``"compiles"``."""
        return {"programs": self.programs, "compiled": self.programs - self.from_cache,
                "from_cache": self.from_cache, "seconds": round(self.seconds, 3)}


class CompileCounter:
    """What this process compiled since it started (all threads), from ``jax.monitoring``'s events:
    one listener per process (they cannot be removed in every JAX version); read it before and after
    a piece of work to get that work's share. ``compiled``: the names of the programs built."""

    _lock = threading.Lock()
    seconds = 0.0
    hits = 0
    compiled: list = []
    _installed = False

    @classmethod
    def _duration(cls, event: str, duration: float, fun_name: str = "?", **_) -> None:
        if event in _COMPILE_EVENTS:
            with cls._lock:
                cls.seconds += duration
                if event == _COMPILE_EVENTS[2]:
                    cls.compiled.append(fun_name)

    @classmethod
    def _event(cls, event: str, **_) -> None:
        if event == _CACHE_HIT:
            with cls._lock:
                cls.hits += 1

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._duration)
                jax.monitoring.register_event_listener(cls._event)
                cls._installed = True

    @classmethod
    def snapshot(cls) -> Compiles:
        cls.install()
        with cls._lock:
            return Compiles(len(cls.compiled), cls.hits, cls.seconds)

    @classmethod
    def read(cls) -> tuple[float, int]:
        """(compile seconds, programs built) so far."""
        now = cls.snapshot()
        return now.seconds, now.programs


CompileCounter.install()  # at import: everything the process compiles from then on is counted
