"""Progress from inside compiled loops, without compiling anything again for a new reporter.

A function passed to ``jax.jit`` as a static argument is part of the cache key: a new closure per
call (the runner's reporters are closures) means a new compilation. Instead, a compiled loop takes
the static flag ``report`` and calls ``emit(channel, ...)``, which always names the same
module-level function; the caller's reporter is installed for the duration of the call with
``reporting(channel, fn)``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial

import jax

_active: dict[str, object] = {}
_lock = threading.Lock()


def _dispatch(channel: str, *args) -> None:
    fn = _active.get(channel)
    if fn is not None:
        fn(*args)


def emit(channel: str, *args) -> None:
    """Inside a traced function: call the reporter installed for ``channel`` with ``args``."""
    jax.debug.callback(partial(_dispatch, channel), *args)


@contextmanager
def reporting(channel: str, fn):
    """Install ``fn`` for ``channel``; yields whether there is a reporter (the static ``report`` flag).

    The caller must wait for its computation (``jax.block_until_ready``) inside the block: callbacks
    arrive while the device runs, and dispatch is asynchronous.
    """
    if fn is None:
        yield False
        return
    with _lock:
        previous = _active.get(channel)
        _active[channel] = fn
    try:
        yield True
    finally:
        with _lock:
            if previous is None:
                _active.pop(channel, None)
            else:
                _active[channel] = previous
