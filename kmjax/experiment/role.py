"""The part a process plays in a run: ``Main`` or ``Worker``.

With one process it is the main one. With several, process 0 is the main one: it owns the run
folder and its stage store, makes every decision that depends on them (is a stage saved, where
does an interrupted one resume) and tells the others; every other process is a worker, which
computes its share and reads or writes no file. The runner asks its role (``decide``, ``send``,
``local``, ``checkpoints``) instead of testing which process it is.
"""

from __future__ import annotations

from typing import Callable

from kmjax.experiment import processes

__all__ = ["Main", "Worker"]


class Main:
    """The main process's role: ``store`` is the run's ``StageStore``."""

    is_main = True

    def __init__(self, store):
        self.store = store
        self.folder = store.folder

    def decide(self, value: Callable):
        """``value()`` (anything JSON can hold), computed here and given to every process."""
        return processes.agree(value())

    def send(self, tree: Callable, like):
        """``tree()`` (a pytree of arrays or None, structured as ``like``), computed here, in every process."""
        return processes.broadcast(tree(), like)

    def send_array(self, array: Callable, shape, dtype):
        """``array()`` (e.g. columns of a memory map) of ``shape`` and ``dtype``, in every process."""
        return processes.send(array(), shape, dtype)

    def local(self, value: Callable):
        """``value()`` here (a file read or written: the main process's alone); None in a worker."""
        return value()

    def checkpoints(self, stage: str, key: str, log=None):
        """The stage's checkpoints (``StageCheckpoints``)."""
        return self.store.checkpoints(stage, key, log)


class _NoCheckpoints:
    """A worker's checkpoints: it saves nothing, and resumes from what the main process sends."""

    def get(self, name):
        return None

    def save(self, name, tree):
        return None

    def checkpoint(self, state):
        return None

    def clear(self):
        pass


class Worker:
    """The role of every process but the main one: no store, no files."""

    is_main = False
    store = folder = None

    def decide(self, value: Callable):
        return processes.agree(None)

    def send(self, tree: Callable, like):
        return processes.broadcast(None, like)

    def send_array(self, array: Callable, shape, dtype):
        return processes.send(None, shape, dtype)

    def local(self, value: Callable):
        return None

    def checkpoints(self, stage: str, key: str, log=None):
        return _NoCheckpoints()

