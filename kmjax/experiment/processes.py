"""A run on several processes (hosts): JAX's multi-controller runtime, seen from the runner.

Every process runs the same ``kmjax run`` (the same config and flags). Process 0 is the *main*
one: it alone touches the run folder (creates it, locks it, reads and writes its stages), makes
every decision that depends on it (which stages are saved, where an interrupted stage resumes)
and tells the others (``agree``, ``broadcast``). The others read only the data set and write
nothing. Each process holds only its share of the images (``owned``: every P-th image, from its
index; the labels of all). The work is shared where it is parallel: the patch sample is cut from
each process's images and assembled in every process (``gather_rows(everywhere=True)``), k-means
runs on a mesh of every device of every process (each pass's sums added across processes), and each
process computes the features of its rows of every segment of images, which the main process
gathers (``gather_rows``) and writes.
For ridge regression from the Gram matrix, each process also sums the Gram statistics of its own
training rows, and the main process adds them up (``total``); from the N x N kernel, the main
process sends the feature columns of each process's share (``send``, a broadcast), and adds up the
kernels of their shares. The classifier is solved by the main
process; the others wait for it at a barrier of JAX's coordination service (``wait_for_all``: a
device collective would give up after Gloo's 30 minutes), then receive its results.

Failures: ``start`` sets JAX's heartbeat timeout; a process that dies (killed, or out of memory)
stops sending heartbeats, and JAX then stops every other process with a message that names the
missing task, within that timeout. A process that fails with an error exits at once without
JAX's shutdown barrier (``abort``), which the others then see as a missing process. The run folder
holds what the main process saved: rerun the same command with ``--resume RUN_DIR`` on every process.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import jax
import numpy as np

__all__ = ["start", "count", "index", "is_main", "owned", "owner", "agree", "broadcast", "gather_rows", "total", "send", "wait_for_all",
           "abort"]


def start(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
          heartbeat_timeout: int = 60) -> None:
    """``jax.distributed.initialize``: with the three values given, or any of them None, from the
    environment of a cluster JAX recognizes (SLURM, Open MPI, Cloud TPU). Call before any JAX work."""
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout)


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_main() -> bool:
    return jax.process_index() == 0


def owned(n: int, process: int | None = None) -> slice:
    """The items of ``n`` (images, rows) that this process (or ``process``) holds: every
    ``count()``-th from its index, so that any run of consecutive rows is shared evenly."""
    return slice(index() if process is None else process, n, count())


def owner(rows) -> np.ndarray:
    """The process that holds each of ``rows`` (ints) of a set held as ``owned`` gives."""
    return np.asarray(rows) % count()


def _wire(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes as a 1-D uint8 array: what crosses between processes is exact whatever the dtype
    (JAX would turn 64-bit values into 32-bit ones without ``jax_enable_x64``)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _unwire(b, like: np.ndarray) -> np.ndarray:
    return np.asarray(b).view(like.dtype).reshape(like.shape).copy()


def _broadcast_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    from jax.experimental import multihost_utils

    sent = multihost_utils.broadcast_one_to_all([_wire(a) for a in arrays], is_source=is_main())
    return [_unwire(b, a) for a, b in zip(arrays, sent)]


def agree(value):
    """The main process's ``value`` (anything JSON can hold), in every process."""
    if count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = _broadcast_arrays([np.array([data.size], np.int64)])[0][0]
    if not is_main():
        data = np.zeros(int(size), np.uint8)
    return json.loads(_broadcast_arrays([data])[0].tobytes().decode())


def broadcast(tree, like):
    """The main process's pytree of arrays (or None), in every process; ``like`` gives its structure
    (a ``kmjax.templates`` template: the other processes do not know the shapes before)."""
    if count() == 1:
        return tree
    leaves = None if tree is None else [np.asarray(a) for a in jax.tree.leaves(tree)]
    meta = agree(None if leaves is None else [[list(a.shape), a.dtype.str] for a in leaves])
    if meta is None:
        return None
    if not is_main():
        leaves = [np.zeros(shape, dtype) for shape, dtype in meta]
    return jax.tree.unflatten(jax.tree.structure(like), _broadcast_arrays(leaves))


def gather_rows(local: np.ndarray, owners, *, everywhere: bool = False) -> np.ndarray | None:
    """The rows of a set, ``owners[i]`` the process that holds row i, each process holding its own
    rows in order as ``local``: all of them, in order, in the main process (None in the others), or
    in every process with ``everywhere``."""
    owners = np.asarray(owners)
    if count() == 1:
        return local
    from jax.experimental import multihost_utils

    sizes = np.bincount(owners, minlength=count())
    if local.shape[0] != sizes[index()]:
        raise ValueError(f"process {index()} holds {local.shape[0]} rows, owners give it {sizes[index()]}")
    padded = np.zeros((int(sizes.max()),) + local.shape[1:], local.dtype)  # the same shape from every process
    padded[: local.shape[0]] = local
    every = multihost_utils.process_allgather(_wire(padded), tiled=False)
    if not (everywhere or is_main()):
        return None
    rows = np.empty((owners.size,) + local.shape[1:], local.dtype)
    for r in range(count()):
        rows[owners == r] = _unwire(every[r], padded)[: sizes[r]]
    return rows


_CHUNK_BYTES = 1 << 26  # what one gather moves from each process: 64 MB


def total(arrays: list[np.ndarray]) -> list[np.ndarray] | None:
    """The element-wise sums over the processes of each of ``arrays`` (C-contiguous, the same shapes
    in every process), in the main process (None in the others), summed into the main process's
    arrays in place. Gathered in chunks of 64 MB, so that an F x F Gram matrix or an N x N kernel is
    never held twice."""
    if count() == 1:
        return arrays
    from jax.experimental import multihost_utils

    if not all(a.flags.c_contiguous and (a.flags.writeable or not is_main()) for a in arrays):
        raise ValueError("total sums C-contiguous arrays, writeable in the main process")  # before any collective
    for a in arrays:
        flat = a.reshape(-1)  # a view: the sums land in ``a``
        step = max(1, _CHUNK_BYTES // max(flat.itemsize, 1))
        for start in range(0, max(flat.size, 1), step):
            part = flat[start : start + step]
            every = np.asarray(multihost_utils.process_allgather(_wire(part), tiled=False))
            if is_main():
                for row in every[1:]:
                    part += _unwire(row, part)
    return arrays if is_main() else None


def send(a, shape, dtype) -> np.ndarray:
    """The main process's array ``a`` (array-like of ``shape`` and ``dtype``, e.g. columns of a
    memory map; ignored in the others) in every process, sent 64 MB at a time."""
    if count() == 1:
        return np.asarray(a, dtype)
    out = np.ascontiguousarray(a, dtype) if is_main() else np.empty(shape, dtype)
    flat = out.reshape(-1)
    step = max(1, _CHUNK_BYTES // max(flat.itemsize, 1))
    for start in range(0, flat.size, step):
        got = _broadcast_arrays([flat[start : start + step]])[0]
        if not is_main():
            flat[start : start + step] = got
    return out


_BARRIERS = itertools.count()  # every process passes the same barriers in the same order
_WAIT_MS = 7 * 24 * 3600 * 1000


def wait_for_all(name: str) -> None:
    """Wait until every process reaches this point, however long that takes (the main process may
    fit a classifier for an hour): a barrier of JAX's coordination service, which the heartbeats
    keep watching, not a device collective (on CPUs Gloo's collectives give up after 30 minutes,
    measured: "Timed out waiting 1800000ms"). JAX has no public API for it (``jax._src``)."""
    if count() == 1:
        return
    from jax._src.distributed import global_state

    global_state.client.wait_at_barrier(f"kmjax-{name}-{next(_BARRIERS)}", _WAIT_MS)


def abort(message: str, code: int) -> None:
    """Print ``message`` and exit now, skipping JAX's shutdown barrier (the other processes may be
    waiting in a collective that will never complete: they stop on the missing heartbeats)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
