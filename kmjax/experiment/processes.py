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
kernels of their shares. The classifier is solved by the main process alone (``done_sharing``):
in ``kmjax run`` the others then leave, in a sweep they wait for its results at a barrier of JAX's
coordination service (``wait_for_all``: a device collective would give up after Gloo's 30 minutes).

Failures are watched by kmjax (docs/scaling.md), not by JAX, whose ``jax_enable_recoverability``
``start`` turns on, so that a process that leaves or dies after its share does not stop process 0:
a thread in each process beats into the coordination service's key-value store, with a progress
count that only the main thread moves (``beat``: each progress and log line, each collective
passed), and reads the others' beats. A process stops (``abort``, naming the other) when another
failed, or died (no beat for ``--heartbeat-timeout`` s; one that died at a barrier only once this
one waits too), or made no progress for ``--hang-timeout`` s while this one waits for it (it hangs:
JAX's heartbeats, in their own thread, go on). Rerun the same command with ``--resume RUN_DIR``.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import sys
import threading
import time
from contextlib import contextmanager

import jax
import numpy as np

from kmjax._jax import distributed_client

__all__ = ["start", "count", "index", "is_main", "owned", "owner", "agree", "broadcast", "gather_rows", "total", "send",
           "wait_for_all", "done_sharing", "beat", "watching", "abort"]


_watch = None  # the _Watch of this process, once started with several processes
_leave_early = False  # kmjax run: a process other than the main one leaves after its share
_progress = 0  # moved by the main thread only (beat); the watch thread publishes it
_doing = "work"  # or "wait" (in a collective), "barrier" (in wait_for_all)


def start(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
          heartbeat_timeout: int = 60, hang_timeout: int = 3600, leave_after_share: bool = False) -> None:
    """``jax.distributed.initialize``: with the three values given, or any of them None, from the
    environment of a cluster JAX recognizes (SLURM, Open MPI, Cloud TPU). Call before any JAX work.
    Starts the watch (a dead process is noticed within ``heartbeat_timeout`` seconds, a hung one
    within ``hang_timeout``); ``leave_after_share``: the processes other than the main one leave
    once their share is done (``done_sharing``; ``kmjax run``, not a sweep, which needs them again)."""
    global _watch, _leave_early
    try:
        distributed_client()
        jax.config.update("jax_enable_recoverability", True)  # one that leaves or dies stops no other
        recoverable = True
    except LookupError:  # no watch: JAX stops every process when one dies; a hung one is not noticed
        recoverable = None
    except (AttributeError, KeyError, ValueError):  # a JAX without the option
        recoverable = False
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout)
    if count() > 1 and recoverable is not None:
        _watch = _Watch(distributed_client(), heartbeat_timeout, hang_timeout)
        _leave_early = leave_after_share and recoverable  # else JAX would stop the others when it leaves
        atexit.register(_at_exit)  # after JAX's own, so run before it: before JAX disconnects


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

    with _waiting("wait"):
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
    with _waiting("wait"):
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
            with _waiting("wait"):
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


def wait_for_all(name: str) -> None:
    """Wait until every process reaches this point, however long (in a sweep, the main process may
    fit a classifier for an hour), while the watch judges the others: each process writes its
    arrival to the coordination service's key-value store and reads the others', a second at a
    time. Not a device collective (on CPUs Gloo's give up after 30 minutes, measured: "Timed out
    waiting 1800000ms"), unless JAX's client is missing (``kmjax._jax.distributed_client``)."""
    if count() == 1:
        return
    try:
        client = distributed_client()
    except LookupError:
        client = None
    barrier = f"kmjax/barrier/{name}-{next(_BARRIERS)}/"
    with _waiting("barrier"):
        if client is None:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(barrier)
            return
        client.key_value_set(f"{barrier}{index()}", "here")
        for q in range(count()):
            while q != index() and not _arrived(client, f"{barrier}{q}"):
                pass


def _arrived(client, key: str) -> bool:
    try:
        return client.blocking_key_value_get(key, 1000) is not None
    except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
            raise
        return False


def done_sharing(results=None):
    """The end of a run's shared work, in every process: the main process's ``results`` (None in the
    others) in every process, after a barrier; with ``leave_after_share`` (``kmjax run``) a process
    other than the main one leaves here instead (``_leave``), and the main one goes on alone."""
    if count() == 1:
        return results
    if _leave_early:
        if is_main():
            return results
        _leave()
    wait_for_all("results")
    return agree(results)


def beat() -> None:
    """This process made progress (a progress or log line): a count, which the watch thread publishes."""
    global _progress
    _progress += 1


def watching() -> bool:
    """Whether the watch runs (several processes): ``kmjax.experiment.report`` then beats when quiet too."""
    return _watch is not None


@contextmanager
def _waiting(doing: str):
    """The main thread waits for the others ("wait": in a collective; "barrier"): the watch judges them."""
    global _doing
    before, _doing = _doing, doing
    beat()
    if doing == "barrier" and _watch is not None:
        _watch.publish(doing)  # at once: a process that dies at a barrier does not stop one that works
    try:
        yield
    finally:
        _doing = before
        beat()


def abort(message: str, code: int) -> None:
    """Print ``message`` and exit now, skipping JAX's shutdown (the other processes may be waiting in
    a collective that will never complete); the watch's last beat tells them that this one failed,
    and they stop within a few seconds."""
    if _watch is not None:
        _watch.stop("failed")
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _leave() -> None:
    print(f"kmjax: process {index()} of {count()}: its share of the run is done; process 0 finishes the run "
          "(its summary, its run folder)", file=sys.stderr, flush=True)
    _watch.stop("left")
    jax.distributed.shutdown()  # recoverable: at once, and without stopping the others
    sys.stdout.flush()
    os._exit(0)


def _at_exit() -> None:
    """A normal exit, before JAX's exit handler disconnects: the main process, which holds the
    coordination service, waits (at most the heartbeat timeout) until the others have left it."""
    _watch.stop("left")
    if is_main():
        def wait():
            try:
                _watch.client.get_live_nodes(list(range(count())))  # returns when the others have gone
            except Exception:  # noqa: BLE001 - nothing to wait for
                pass

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(_watch.heartbeat)


_BEATS = "kmjax/beat/"  # the key-value store's folder of beats: one key per process, "alive progress state"


class _Watch:
    """The thread that beats for this process and judges the others (see the module's docstring)."""

    def __init__(self, client, heartbeat: float, hang: float):
        self.client, self.heartbeat, self.hang = client, heartbeat, hang
        self.tick = max(0.1, min(5.0, heartbeat / 4, hang / 4))
        now = time.monotonic()
        self.seen = {q: (None, None, "work", now, now) for q in range(count()) if q != index()}
        self.mine = (_progress, now)  # this process's progress count, and when it last moved
        self.alive, self.lock = 0, threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kmjax-watch", daemon=True)
        self.thread.start()

    def publish(self, state: str) -> None:
        with self.lock:
            self.alive += 1
            self.client.key_value_set(f"{_BEATS}{index()}", f"{self.alive} {_progress} {state}", allow_overwrite=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.tick):
            try:
                self.publish(_doing)
                entries = self.client.key_value_dir_get(_BEATS)
            except Exception as e:  # noqa: BLE001 - the service is gone with process 0
                reason = f"the coordination service (in process 0) stopped answering: {e}"
            else:
                now = time.monotonic()
                if _progress != self.mine[0]:
                    self.mine = (_progress, now)
                reason = _verdict(entries, self.seen, now, _doing, now - self.mine[1] > self.hang, self.heartbeat,
                                  self.hang)
            if reason is not None and not self.stopped.is_set():
                abort(f"kmjax: error in process {index()} of {count()}: {reason}\nkmjax: the run stops on every "
                      "process. The run folder keeps what process 0 finished: rerun the same command on every "
                      "process with --resume RUN_DIR.", 1)

    def stop(self, state: str) -> None:
        """No more beats, after a last one saying ``state`` ("left", "failed"): given up after 10 s
        (the service may be gone)."""
        self.stopped.set()
        joining = threading.current_thread() is not self.thread

        def last():
            if joining:
                self.thread.join()
            try:
                self.publish(state)
            except Exception:  # noqa: BLE001 - no one left to tell
                pass

        told = threading.Thread(target=last, daemon=True)
        told.start()
        told.join(10)


def _verdict(entries, seen: dict, now: float, doing: str, stalled: bool, heartbeat: float, hang: float) -> str | None:
    """Why this process must stop, or None, from the beats ``entries`` ((key, "alive progress state"))
    and what it had ``seen`` of each other process (updated: alive, progress, state, when each moved).
    ``doing``: what this process's main thread does; ``stalled``: it made no progress for ``hang`` s."""
    for key, value in entries:
        try:
            q, (alive, progress, state) = int(key.rsplit("/", 1)[1]), value.split()
        except ValueError:
            continue
        if q in seen:
            old = seen[q]
            seen[q] = (alive, progress, state, now if alive != old[0] else old[3], now if progress != old[1] else old[4])
    waiting = doing != "work"
    for q, (_, _, state, alive_at, progress_at) in sorted(seen.items()):
        if state == "left":
            continue
        if state == "failed":
            return f"process {q} failed (its own output says why)"
        if now - alive_at > heartbeat and (waiting or state != "barrier"):  # at a barrier: missed at the next wait
            return (f"process {q} stopped answering {now - alive_at:.0f} s ago (--heartbeat-timeout {heartbeat:g} s): "
                    "it died, or its host did")
        if now - progress_at > hang and state == "work" and (waiting or stalled):
            return (f"process {q} made no progress for {now - progress_at:.0f} s (--hang-timeout {hang:g} s): it "
                    "hangs, or one of its steps runs that long without a progress line"
                    + ("" if waiting else "; nor did this process: one of the two hangs, or waits for the other"))
    return None
