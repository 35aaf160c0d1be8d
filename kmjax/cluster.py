"""Lloyd's k-means and its spherical (gain-shape, OMP-1) variant: the host-side API.

``kmeans`` checks its arguments, picks the defaults for the backend, places the points (on one
device, or split over the devices of a mesh) and runs the compiled loop of ``kmjax.lloyd``. Squared
distances use ||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2): the nearest centroid maximizes
x.c - ||c||^2 / 2 (``kmjax.nearest``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kmjax import lloyd
from kmjax._checks import check_matrix, choice, integer, is_tracer, number, positive_int
from kmjax._loop import run_in_pieces
from kmjax._ops import check_precision
from kmjax.errors import InputError
from kmjax.lloyd import KMeansResult, LloydSpec, LoopState
from kmjax.nearest import KERNELS, check_kernel
from kmjax.parallel import replicate, resolve_mesh, shard_rows, unit_weights

__all__ = ["KMeansResult", "kmeans", "assign", "init_centroids", "check_kmeans", "point_weights", "default_chunk",
           "INITS", "EMPTY_POLICIES", "UPDATES", "KERNELS"]

INITS = ("k-means++", "random", "randn")
EMPTY_POLICIES = ("reseed", "zero")
# How a pass adds the points to their centroids' sums: "scatter" (segment_sum; a sequential loop on
# CPUs, atomic adds on GPUs, whose order varies from run to run) or "matmul" (one-hot^T @ points:
# GEMM-shaped, and deterministic on every backend).
UPDATES = ("scatter", "matmul")
# Scores per chunk: on a CPU about 8 MB of float32 (cache-sized); on an accelerator as wide as
# 256 MB allows (at K = 1600, 40,000 rows per product instead of hundreds of small products).
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "accelerator": 1 << 26}


def default_chunk(n: int, k: int) -> int:
    """Rows per distance product of ``kmeans``/``assign`` on the default backend (``chunk_size=None``)."""
    elements = _CHUNK_ELEMENTS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
    return int(min(max(256, elements // max(k, 1)), n))


def _default_update() -> str:
    """"scatter" on CPUs (the faster of the two there, BENCHMARKS.md; deterministic), "matmul" on
    accelerators (same seed, same bits: GPU scatter-adds are atomic and their order varies)."""
    return "scatter" if jax.default_backend() == "cpu" else "matmul"


def _check_k(x, k) -> int:
    k = positive_int(k, "k")
    n = np.shape(x)[0]
    if k > n:
        raise InputError(f"k={k} is larger than the number of points ({n}); use k <= {n}")
    return k


@partial(jax.jit, static_argnums=0)
def _ones(n: int):
    return jnp.ones((n,), jnp.float32)  # made on the device: no host array sent


def _until(until: int):
    """The loop's stopping iteration, a traced number (one program for any split of the loop), sent
    to the device explicitly: the loop's one host-to-device transfer per piece."""
    return until if is_tracer(until) else jax.device_put(np.int32(until))


@jax.jit
def _valid_weights(w):
    return jnp.all(jnp.isfinite(w) & (w >= 0)) & (jnp.sum(w) > 0)


def point_weights(n: int, weights):
    """(n,) float32 point weights, ones by default; values checked on concrete arrays."""
    if weights is None:
        return _ones(n)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (n,):
        raise InputError(f"weights must have shape ({n},) to match x, got {w.shape}")
    if not is_tracer(w) and not jax.device_get(_valid_weights(w)):  # one pull, of one bool
        raise InputError("weights must be finite, >= 0 and not all zero")
    return w


def init_centroids(key, x, k: int, method: str = "k-means++", *, weights=None, spherical: bool = False):
    """Starting centroids for ``kmeans``.

    Args:
      key: a ``jax.random`` key.
      x: (N, D) points.
      k: number of centroids.
      method: "k-means++" (D^2 sampling), "random" (k distinct points) or "randn" (the
        authors' 0.1 * standard normal; independent of the data).
      weights: optional (N,) non-negative point weights.
      spherical: normalize the centroids to unit length.

    Returns:
      (k, D) float32.
    """
    check_matrix(x)
    x = jnp.asarray(x)
    k = _check_k(x, k)
    choice(method, INITS, "init", " or pass a (k, D) array")
    return lloyd.draw_init(key, x, point_weights(x.shape[0], weights), k=k, method=method, spherical=spherical)


def check_kmeans(x, k, *, init, max_iter, tol, chunk_size, empty, spherical, weights, precision,
                 update=None, kernel: str = "xla", shards: int = 1):
    """Check the arguments of a k-means call; return (k, init array or name, tol, LloydSpec).

    ``shards``: the devices the rows are split over (each pass sees one device's rows, which sets
    the default chunk).
    """
    check_matrix(x)
    n, d = np.shape(x)
    k = _check_k(x, k)
    max_iter = integer(max_iter, "max_iter", minimum=0)
    check_precision(precision)
    choice(empty, EMPTY_POLICIES, "empty-cluster policy")
    update = choice(_default_update() if update is None else update, UPDATES, "update")
    check_kernel(kernel)
    rows = -(-n // shards)
    chunk_size = default_chunk(rows, k) if chunk_size is None else positive_int(chunk_size, "chunk_size")
    if isinstance(init, str):
        choice(init, INITS, "init", " or pass a (k, D) array")
    else:
        init = jnp.asarray(init, jnp.float32) if is_tracer(init) else np.asarray(init, np.float32)
        if init.shape != (k, d):
            raise InputError(f"init array must have shape (k, D) = ({k}, {d}), got {init.shape}")
        check_matrix(init, "init")
    if tol is not None and not is_tracer(tol):
        number(tol, "tol (or None)", at_least=0)
    # sent to the device explicitly (jax.device_put), not implicitly (jnp.float32): see tests/test_residency.py
    tol = jnp.asarray(tol, jnp.float32) if is_tracer(tol) else jax.device_put(np.float32(-np.inf if tol is None else tol))
    spec = LloydSpec(max_iter=max_iter, chunk_size=int(min(chunk_size, rows)), empty=empty,
                     spherical=bool(spherical), precision=precision, weighted=weights is not None,
                     m=min(k, n), update=update, kernel=kernel)
    return k, init, tol, spec


_start = jax.jit(lloyd.start, static_argnames=("spec",))  # its constants made on the device, not sent from the host
_iterate = jax.jit(lloyd.iterate, static_argnames=("spec", "axis_name"))
_finish = jax.jit(lloyd.finish, static_argnames=("spec", "axis_name"))


@partial(jax.jit, static_argnames=("spec", "sharding"))
def _start_sharded(centroids, *, spec, sharding):
    return jax.lax.with_sharding_constraint(lloyd.start(centroids, spec), sharding)


@partial(jax.jit, static_argnames=("spec", "mesh", "axis_name"))
def _iterate_sharded(x, w, state, tol, until, *, spec, mesh, axis_name):
    # the loop of one device on each device's rows; its passes psum over axis_name, so every output
    # is replicated
    local = partial(lloyd.iterate, spec=spec, axis_name=axis_name)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P(), P(), P()),
                         out_specs=P())(x, w, state, tol, until)


@partial(jax.jit, static_argnames=("spec", "mesh", "axis_name"))
def _finish_sharded(x, w, state, *, spec, mesh, axis_name):
    local = partial(lloyd.finish, spec=spec, axis_name=axis_name)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P()), out_specs=P())(x, w, state)


def kmeans(
    key,
    x,
    k: int,
    *,
    init="k-means++",
    max_iter: int = 100,
    tol: float | None = 1e-4,
    chunk_size: int | None = None,
    empty: str = "reseed",
    spherical: bool = False,
    weights=None,
    precision: str = "float32",
    update: str | None = None,
    kernel: str = "xla",
    progress=None,
    mesh: Mesh | None = None,
    axis_name: str = "data",
    state: LoopState | None = None,
    checkpoint=None,
) -> KMeansResult:
    """Lloyd's k-means on (N, D) points, in bounded memory.

    Works as it is inside ``jax.jit`` (with ``k`` and the options static); values of traced
    arguments (finiteness, weights) are then not checked.

    Args:
      key: a ``jax.random`` key (used by the init only).
      x: (N, D) points; finite values.
      k: number of centroids, 1 <= k <= N.
      init: "k-means++", "random", "randn" (see ``init_centroids``) or a (k, D) array of
        starting centroids, to compare runs with other libraries.
      max_iter: maximum number of Lloyd iterations; 0 returns the initial centroids (with their
        counts and inertia): with ``init="random"`` and ``spherical=True``, a dictionary of random
        unit-norm data points.
      tol: stop when the objective decreased by at most ``tol`` times its previous value in an
        iteration (0 stops at a fixed point); None never stops early.
      chunk_size: points per matrix product; memory is O(chunk_size * k). Default: about 2M
        scores per chunk on a CPU (cache-sized), 64M (256 MB) on an accelerator.
      empty: "reseed" moves an empty cluster onto the point worst served by the current
        centroids (distinct points for distinct clusters); "zero" sets it to the origin, as
        the authors' code does.
      spherical: the gain-shape / OMP-1 variant of the authors' later work: unit-norm
        centroids, assignment by the largest |c.x|, update c <- normalize(sum (c.x) x).
      weights: optional (N,) non-negative point weights.
      precision: of the distance products: "float32" (default), "tf32" (the backend's default:
        TF32 on recent NVIDIA GPUs) or "bfloat16" (bf16 operands, float32 accumulation).
      update: how each pass sums the points per centroid: "scatter" or "matmul" (see ``UPDATES``);
        default "scatter" on CPUs, "matmul" on accelerators (deterministic there).
      kernel: how each pass finds the nearest centroids: "xla" (default: a chunk's scores from one
        product, then their row maximum) or "pallas" (one fused kernel that never writes the
        scores; see ``kmjax.nearest``: interpreted, slowly, on a CPU; compiled with Triton on GPUs;
        refused on TPUs).
      progress: optional ``progress(iteration, max_iter, objective)`` called after each iteration
        (the loop then runs one iteration per call of the same compiled program: the same numbers;
        see ``kmjax._loop.run_in_pieces``).
      mesh: a ``jax.sharding.Mesh`` to split the points over (along ``axis_name``; other axes hold
        replicas), or None: one device. On a mesh every pass runs on each device's rows and its sums
        are added over the devices: the same result as on one device up to float32 rounding (an init
        string draws the same starting centroids). ``x`` may then be a host array or a global
        ``jax.Array`` (on several hosts: from ``jax.make_array_from_process_local_data``); when N is
        not a multiple of the number of devices, zero-weight zero rows are appended. The default
        ``chunk_size`` is then that of one device's rows. See ``kmjax.parallel`` for several hosts.
      axis_name: the mesh axis the points are split along.
      state: a ``kmjax.lloyd.LoopState`` that ``checkpoint`` was given by an interrupted call with
        the same arguments: the loop continues from it (the init is not drawn again).
      checkpoint: optional ``checkpoint(state) -> LoopState | None``, given the ``LoopState`` (a
        pytree made by ``kmjax.lloyd.start``: centroids, objective so far, iteration, converged)
        after each iteration, to persist it; what it returns, when not None (the same values), is
        the state the loop goes on with.
        On a mesh that spans several processes, pass ``progress`` and ``checkpoint`` in every process
        or in none (they may do nothing in some): they split the loop into pieces, and every piece is
        a collective that all processes must run alike.

    Returns:
      ``KMeansResult``.
    """
    mesh = None if mesh is None else resolve_mesh(mesh, axis_name)
    shards = 1 if mesh is None else mesh.shape[axis_name]
    k, init, tol, spec = check_kmeans(x, k, init=init, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                                      empty=empty, spherical=spherical, weights=weights, precision=precision,
                                      update=update, kernel=kernel, shards=shards)
    if mesh is None:
        x = jnp.asarray(x)
        w = point_weights(x.shape[0], weights)
        if state is None:
            # the checked arguments drawn from directly (init_centroids would check the weights again)
            c0 = lloyd.draw_init(key, x, w, k=k, method=init, spherical=spherical) if isinstance(init, str) else init
            state = _start(jnp.asarray(c0), spec)
        else:
            state = LoopState(*map(jnp.asarray, _check_state(state, k, np.shape(x)[1], spec)))

        def advance(state, until):
            return _iterate(x, w, state, tol, _until(until), spec)

        def final(state):
            return _finish(x, w, state, spec)
    else:
        n = np.shape(x)[0]
        n_pad = -(-n // shards) * shards - n
        spec = spec._replace(weighted=spec.weighted or n_pad > 0)
        rows = NamedSharding(mesh, P(axis_name))
        x = shard_rows(x, n_pad, rows)
        # unit weights are made in place on the devices: no host array, and global on several hosts
        w = unit_weights(n, n_pad, rows) if weights is None else shard_rows(point_weights(n, weights), n_pad, rows)
        if state is not None:
            state = replicate(LoopState(*_check_state(state, k, np.shape(x)[1], spec)), mesh)
        else:
            if isinstance(init, str):  # on the unpadded rows, so that the draws are those of one device
                xv, wv = (x[:n], w[:n]) if n_pad else (x, w)
                init = init_centroids(key, xv, k, init, weights=wv, spherical=spherical)
            # made on the devices from replicated centroids (equal in every process)
            state = _start_sharded(replicate(init, mesh), spec=spec, sharding=NamedSharding(mesh, P()))
        tol = replicate(tol, mesh)

        def advance(state, until):
            return _iterate_sharded(x, w, state, tol, replicate(np.int32(until), mesh), spec=spec, mesh=mesh,
                                    axis_name=axis_name)

        def final(state):
            return _finish_sharded(x, w, state, spec=spec, mesh=mesh, axis_name=axis_name)

    pulled = _Pulled()
    state = run_in_pieces(advance, state, spec.max_iter, done=lambda s: int(pulled(s)[0]),
                          stopped=lambda s: bool(pulled(s)[1]), value=lambda s: float(pulled(s)[2][pulled(s)[0] - 1]),
                          progress=progress, checkpoint=checkpoint)
    return final(state)


class _Pulled:
    """What the loop's driver reads of a state between pieces (iteration, converged, objective so far),
    pulled to the host in one explicit transfer per state: one pull per piece (tests/test_residency.py),
    none without ``progress`` and ``checkpoint`` (the loop then runs whole)."""

    def __init__(self):
        self.state, self.values = None, None

    def __call__(self, s: LoopState):
        if s is not self.state:
            self.state, self.values = s, jax.device_get((s.it, s.converged, s.objective))
        return self.values


def _check_state(state, k: int, d: int, spec: LloydSpec) -> tuple:
    """A saved ``LoopState`` as host arrays, checked against this call's shapes."""
    state = tuple(np.asarray(a) for a in state)
    if len(state) != 4 or state[0].shape != (k, d) or state[1].shape != (spec.max_iter,):
        raise InputError(f"state is not a k-means loop state of this call: it holds {k} x {d} centroids and "
                         f"{spec.max_iter} objective values only if it came from a call with the same k, data "
                         f"and max_iter; got shapes {[a.shape for a in state]}")
    return state


@partial(jax.jit, static_argnames=("spec",))
def _assign(x, centroids, spec):
    return lloyd.assign_rows(x.astype(jnp.float32), centroids.astype(jnp.float32), spec)


def assign(x, centroids, *, chunk_size: int | None = None, spherical: bool = False,
           precision: str = "float32"):
    """Nearest centroid of each point, in bounded memory.

    Args:
      x: (N, D) points.
      centroids: (K, D).
      chunk_size: points per matrix product (memory O(chunk_size * K)).
      spherical: assign by the largest |c.x| (unit-norm centroids) instead of distance.

    Returns:
      index: (N,) int32, the nearest centroid (lowest index on ties).
      sqdist: (N,) float32, squared distance to it (spherical: ||x||^2 - (c.x)^2).
    """
    check_matrix(x)
    check_matrix(centroids, "centroids")
    check_precision(precision)
    x, centroids = jnp.asarray(x), jnp.asarray(centroids)
    if centroids.shape[1] != x.shape[1]:
        raise InputError(f"centroids have dimension {centroids.shape[1]} but x has {x.shape[1]}")
    if chunk_size is None:
        chunk_size = default_chunk(x.shape[0], centroids.shape[0])
    chunk_size = min(positive_int(chunk_size, "chunk_size"), x.shape[0])
    spec = LloydSpec(max_iter=1, chunk_size=chunk_size, empty="zero", spherical=bool(spherical),
                     precision=precision, weighted=False, m=1)
    return _assign(x, centroids, spec)
