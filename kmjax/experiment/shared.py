"""The classifier statistics that the processes of a run on several share (``kmjax run`` across
hosts): ridge's Gram statistics, summed over each process's own training rows, or its N x N kernel,
summed over each process's share of the feature columns. Each is saved as the classifier stage's
checkpoint, where ``fit_classifier`` finds it."""

from __future__ import annotations

import numpy as np

from kmjax import templates
from kmjax.checkpoint import Slot
from kmjax.classify import (ClassifierState, GramStats, KernelStats, accumulate_kernel, empty_gram_stats,
                            empty_kernel_stats, gram_stats, validation_split)
from kmjax.experiment import processes
from kmjax.experiment.plan import training_copies
from kmjax.experiment.report import log, progress

__all__ = ["shared_solver", "shared_gram", "shared_kernel"]


def shared_solver(cfg, rows: int, dim: int) -> str | None:
    """What the processes of a run on several share of ridge regression: "gram" (solver "gram", or
    "auto" with no more features than rows: each sums the Gram statistics of its own rows) or "dual"
    (solver "dual", or "auto" with more: each adds the kernel of its share of the feature columns);
    None on one process or for another classifier."""
    c = cfg.classifier
    if processes.count() == 1 or c.loss != "ridge" or c.solver not in ("auto", "gram", "dual"):
        return None
    return c.solver if c.solver != "auto" else ("gram" if dim <= rows else "dual")


def _unsaved(store, stage_key, quiet, state: str):
    """The classifier's checkpoints, if neither the classifier nor its saved ``state`` is there."""
    checkpoints = store.checkpoints("classifier", stage_key, lambda line: log(line, quiet))
    if checkpoints.has(state) or store.load_tree("classifier", stage_key, templates.classifier_stage()) is not None:
        return None
    return checkpoints


def shared_gram(cfg, features, mine, num_classes, key, role, stage_key, quiet) -> None:
    """Several processes, ridge from the Gram matrix: every process sums the Gram statistics of its
    own training rows (``mine``: their indices, features and labels, kept by the features stage) and
    the main process saves the total as the classifier's "gram" checkpoint, where ``fit_classifier``
    finds it. Decided by the main process (``role``): not when the features were reused (no process
    keeps its rows then), the classifier is saved, or its Gram statistics are."""
    if processes.count() == 1:
        return
    c = cfg.classifier
    checkpoints = role.local(lambda: _unsaved(role.store, stage_key, quiet, "gram"))
    if not role.decide(lambda: mine is not None and shared_solver(cfg, *features.shape) == "gram"
                       and checkpoints is not None):
        return
    n = role.decide(lambda: int(features.shape[0]))
    rows = np.arange(n) if not c.C_grid else validation_split(n, key, val_fraction=c.val_fraction,
                                                               copies=training_copies(cfg))[0]
    # the shift of one process's gram_stats: the mean of the first block of rows, from the main process
    shift = role.send(lambda: np.asarray(features[rows[:8192]], np.float64).mean(axis=0), Slot("F"))
    index, x, y = mine if mine is not None else (np.zeros(0, np.int64), None, None)  # None: no rows of its own
    fitted = np.flatnonzero(np.isin(index, rows))
    part = (empty_gram_stats(shift, num_classes) if not fitted.size else
            gram_stats(x, y, num_classes, rows=fitted, shift=shift))
    summed = processes.total([getattr(part, name) for name in _SUMMED])  # None outside the main process
    if role.is_main:
        stats = part._replace(**dict(zip(_SUMMED, summed)))
        checkpoints.checkpoint(ClassifierState(gram=stats))
        log(f"[classifier] Gram statistics of {int(stats.count):,} rows, summed over {processes.count()} processes",
            quiet)


_SUMMED = tuple(name for name in GramStats._fields if name != "shift")  # every field but the shared shift


_KERNEL_BLOCK = 4096  # feature columns sent to a process at a time: 0.8 GB of float32 at N = 50,000


def shared_kernel(cfg, features, role, stage_key, quiet) -> None:
    """Several processes, ridge from the N x N kernel (``kmjax.classify.dual``, N rows: images times
    their training copies): the feature columns are split evenly between the processes, each adds up
    the kernel of its columns, and process 0 sums the kernels and saves the whole one as the
    classifier's "kernel" checkpoint, where ``fit_classifier`` finds it. In rounds: process 0 reads
    the next block of every other process's columns from its stage files and sends it (a broadcast:
    JAX's collectives have no point-to-point transfer, so every process receives every block and
    its owner keeps it), then every process adds the kernel of its own block. Each process holds an
    N x N float32 kernel; an interrupted share is computed again (only the whole kernel is saved)."""
    if processes.count() == 1:
        return
    checkpoints = role.local(lambda: _unsaved(role.store, stage_key, quiet, "kernel"))
    if not role.decide(lambda: shared_solver(cfg, *features.shape) == "dual" and checkpoints is not None):
        return
    n, f = role.decide(lambda: list(features.shape))
    me, count = processes.index(), processes.count()
    blocks = [[(start, min(start + _KERNEL_BLOCK, (r + 1) * f // count))
               for start in range(r * f // count, (r + 1) * f // count, _KERNEL_BLOCK)] for r in range(count)]
    kernel, mean, scale = np.zeros((n, n), np.float32), np.zeros(f), np.zeros(f)
    report = progress("kernel", quiet, "features")
    for i in range(max(map(len, blocks))):
        mine = None
        for r in range(1, count):  # process 0 sends the others their next block
            if i < len(blocks[r]):
                start, stop = blocks[r][i]
                block = role.send_array(lambda: features[:, start:stop], (n, stop - start), np.float32)
                mine = block if r == me else mine
        if i < len(blocks[me]):
            start, stop = blocks[me][i]
            # the statistics of this block's columns, added to the kernel of the process's earlier blocks
            part = accumulate_kernel(empty_kernel_stats(0, stop - start)._replace(kernel=kernel),
                                     features[:, start:stop] if me == 0 else mine)
            kernel, mean[start:stop], scale[start:stop] = part.kernel, part.mean, part.scale
            if report is not None:
                report(stop, f // count)
    processes.total([kernel, mean, scale])
    if role.is_main:
        stats = KernelStats(columns=np.array(f, np.int64), mean=mean, scale=scale, kernel=kernel)
        checkpoints.checkpoint(ClassifierState(kernel=stats))
        log(f"[classifier] {n:,} x {n:,} kernel of {f:,} features, their columns shared by {count} processes", quiet)
