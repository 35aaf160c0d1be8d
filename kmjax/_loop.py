"""The one driver of the library's iterative solvers (Lloyd, L-BFGS, conjugate gradients): a loop
given as ``advance(state, until) -> state`` run whole, or in pieces with a report between them."""

from __future__ import annotations

from typing import Callable, TypeVar

S = TypeVar("S")

# The one shape of a progress callback: progress(done, total, value), value a float or None.
Progress = Callable[[int, int, "float | None"], None]
# The one shape of a checkpoint callback: checkpoint(state) -> None, or the state to go on with.
Checkpoint = Callable[[S], "S | None"]


def run_in_pieces(advance: Callable[[S, int], S], state: S, total: int, *, done: Callable[[S], int],
                  stopped: Callable[[S], bool] = lambda s: False, value: Callable[[S], float] | None = None,
                  progress: Progress | None = None, every: int | None = None,
                  checkpoint: Checkpoint | None = None) -> S:
    """Run ``advance(state, until)``, which steps the loop until step ``until`` (or an earlier stop).

    Without ``progress``, ``every`` or ``checkpoint``: one call, ``advance(state, total)``, and no host
    reads (so it works on traced values inside ``jax.jit``). Otherwise: calls of at most ``every``
    steps (default 1), each followed by ``checkpoint(state)`` and ``progress(done(state), total,
    value(state))`` when given, until ``total`` steps or ``stopped(state)``. What ``checkpoint``
    returns, when not None, is the state the loop goes on with (the same values, e.g. read back
    from the file it wrote). A compiled ``advance`` takes ``until`` as a traced number, so both
    ways run the same program (the same numbers; nothing compiled again; no host callback inside
    it, which would keep JAX's persistent cache from storing it).
    """
    if progress is None and every is None and checkpoint is None:
        return advance(state, total)
    while (step := done(state)) < total and not stopped(state):
        state = advance(state, min(step + (every or 1), total))
        if checkpoint is not None:
            kept = checkpoint(state)
            state = state if kept is None else kept
        if progress is not None:
            progress(done(state), total, None if value is None else value(state))
    return state
