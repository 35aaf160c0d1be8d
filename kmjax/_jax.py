"""What kmjax reads of JAX's internals, in one place: two queries JAX has no public API for, each
read from JAX's private package as the sources of jax 0.10.0 to 0.11.1 have it (pyproject.toml bounds jax to
those), each with a fallback for a JAX that lacks it (tested in tests/test_parallel.py and
tests/test_processes.py). Nothing else in kmjax reads JAX's private package (a test checks it)."""

from __future__ import annotations

import jax

__all__ = ["backends_started", "distributed_client"]


def backends_started() -> bool:
    """Whether JAX has started its backends (the CPU's device count is then fixed). JAX has no public
    query: ``jax._src.xla_bridge.backends_are_initialized`` (the sources of jax 0.10.0 to 0.11.1), and
    where a JAX lacks it, the public option ``jax_num_cpu_devices``, which refuses a new value once
    a backend has started (set and put back: nothing changes)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        pass
    before = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", before + 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", before)
    return False


def distributed_client():
    """JAX's distributed runtime client (its key-value store), None before ``jax.distributed.initialize``.
    JAX has no public handle on it (``jax.distributed`` has initialize, is_initialized and shutdown):
    this reads ``jax._src.distributed.global_state.client`` (the sources of jax 0.10.0 to 0.11.1), and
    raises LookupError where a JAX lacks it; the callers then run without the watch (``start``)
    and wait at a device collective (``wait_for_all``)."""
    try:
        from jax._src.distributed import global_state

        return global_state.client
    except (ImportError, AttributeError):
        raise LookupError("this JAX has no jax._src.distributed.global_state.client") from None
