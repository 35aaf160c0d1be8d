"""JAX's persistent compilation cache for runs: compiled programs are kept on disk between processes.

On a GPU most of a short run is XLA compilation (autotuning the matrix products); with the cache
a second run of the same shapes loads them instead. Default folder: ``$XDG_CACHE_HOME/kmjax/jax``
(``~/.cache/kmjax/jax``); ``KMJAX_COMPILE_CACHE`` (or ``--compile-cache`` / ``compile_cache=``)
names another folder, or ``off`` to disable it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["ENV_VAR", "default_folder", "use_compile_cache"]

ENV_VAR = "KMJAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false", "")


def default_folder() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "kmjax" / "jax"


def use_compile_cache(folder: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``folder`` (None: ``KMJAX_COMPILE_CACHE``, else
    the default folder; "off": disabled). Returns the folder in use, or None."""
    if folder is None:
        folder = os.environ.get(ENV_VAR, str(default_folder()))
    if str(folder).strip().lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs time: run without it
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
