"""Data-parallel k-means and feature extraction over several devices.

``kmeans_sharded`` shards the points over a 1-D ``jax.sharding.Mesh`` (rows split along the mesh
axis ``axis_name``, centroids replicated). Inside ``jax.shard_map`` each device runs the same
chunked Lloyd pass as ``kmjax.kmeans`` on its shard, and the per-centroid sums and weights and the
objective terms are combined with ``jax.lax.psum``; the whole Lloyd loop is one compiled program.
``extract_features_sharded`` splits every batch of images over the devices and runs the
per-batch feature computation of ``kmjax.extract_features`` on each device's part.
Both give the results of their single-device counterparts (to float32 rounding: sums are
added in another order).

One host, several GPUs or TPU cores
-----------------------------------
Nothing to set up: the default mesh is every device JAX sees::

    from kmjax.parallel import kmeans_sharded, extract_features_sharded

    res = kmeans_sharded(jax.random.key(0), patches, 1600, init="randn", empty="zero")
    feats = extract_features_sharded(images, res.centroids, zca, spec)

or pass ``mesh=jax.make_mesh((n,), ("data",))`` to use the first n devices. On a CPU-only machine
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts) splits the host
into 8 devices, which is how the tests exercise this module.

Several hosts (multi-process)
-----------------------------
Start one process per host and call ``jax.distributed.initialize()`` in each before any other JAX
call. Build the mesh over the *global* device list (``jax.make_mesh`` uses ``jax.devices()``,
which then spans every host) and give each process only its own rows: every process loads a
different slice of the points and ``jax.make_array_from_process_local_data`` stitches the slices
into one global array, sharded along the mesh axis (tests/test_parallel.py runs this with two
processes and a localhost coordinator)::

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kmjax.parallel import kmeans_sharded

    jax.distributed.initialize()  # coordinator address etc. from the cluster environment
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    # This process's rows: (N_local, D) float32, the same N_local in every process and a
    # multiple of jax.local_device_count(), so that no padding (a cross-host reshuffle) is needed.
    local = my_patch_loader(jax.process_index(), jax.process_count())
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    res = kmeans_sharded(jax.random.key(0), x, 1600, mesh=mesh, init="randn")
    centroids = np.asarray(res.centroids)  # replicated on every device: readable in any process

Use the same ``key`` in every process. Feature extraction needs no communication between images:
on several hosts let each process call ``extract_features_sharded`` on its own images with the
default mesh, which is the process's local devices (a mesh that spans other processes is
refused, because the features are returned as one host NumPy array).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kmjax._checks import positive_int
from kmjax.cluster import KMeansResult, _lloyd_loop, _weights, init_centroids, prepare_kmeans
from kmjax.features import FeatureSpec, batch_features, feature_dim, prepare_features, run_batches
from kmjax.preprocess import ZCA

__all__ = ["kmeans_sharded", "extract_features_sharded", "data_mesh"]


def data_mesh(n_devices: int | None = None, axis_name: str = "data", *, local: bool = False) -> Mesh:
    """A 1-D mesh over the first ``n_devices`` devices (default: all of them).

    ``local=True`` restricts it to this process's devices (``jax.local_devices()``); otherwise the
    devices of every process (``jax.devices()``), which on one host is the same list. The axis
    is of type ``AxisType.Auto`` (jax.make_mesh's default is Explicit).
    """
    devices = jax.local_devices() if local else jax.devices()
    n = len(devices) if n_devices is None else positive_int(n_devices, "n_devices")
    if n > len(devices):
        raise ValueError(f"asked for {n} devices, only {len(devices)} available")
    return jax.make_mesh((n,), (axis_name,), (AxisType.Auto,), devices=devices[:n])


def _resolve_mesh(mesh, axis_name, local):
    if mesh is None:
        return data_mesh(axis_name=axis_name, local=local)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis_name!r}; pass axis_name=")
    # The same devices with Auto axes: arrays placed on an Explicit mesh carry their sharding in
    # their type, and the init's gathers (x[indices]) then refuse to run without out_sharding=.
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


@partial(jax.jit, static_argnames="pad")
def _pad_rows_jit(a, pad):
    return jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])


def _shard_rows(a, n_pad: int, sharding, dtype):
    """(N, ...) -> (N + n_pad, ...) with zero rows appended, placed with ``sharding``.

    Host arrays are padded on the host and go straight to their devices, never whole to one.
    """
    if isinstance(a, jax.Array):
        a = a.astype(dtype)
        if n_pad:
            a = _pad_rows_jit(a, pad=n_pad)
        return jax.device_put(a, sharding)
    a = np.asarray(a, dtype)
    if n_pad:
        a = np.concatenate([a, np.zeros((n_pad,) + a.shape[1:], dtype)])
    return jax.device_put(a, sharding)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _unit_weights(n, n_pad, sharding):
    return jax.lax.with_sharding_constraint((jnp.arange(n + n_pad) < n).astype(jnp.float32), sharding)


@partial(jax.jit, static_argnames=("mesh", "axis_name", "spec"))
def _lloyd_sharded(x, w, centroids, tol, *, mesh, axis_name, spec):
    # The same loop as on one device; its passes psum over axis_name, so every output is
    # replicated.
    local = partial(_lloyd_loop, spec=spec, axis_name=axis_name)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P(), P()),
                         out_specs=P())(x, w, centroids.astype(jnp.float32), tol)


def kmeans_sharded(
    key,
    x,
    k: int,
    *,
    mesh: Mesh | None = None,
    axis_name: str = "data",
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
) -> KMeansResult:
    """``kmjax.kmeans`` with the points sharded over the devices of ``mesh``.

    Args:
      key, k, init, max_iter, tol, empty, spherical, weights, precision, update, kernel: as in ``kmjax.kmeans``;
        the same arguments give the same result up to float32 rounding (an init string draws
        the same starting centroids as ``kmeans`` does for the same key).
      x: (N, D) points: a host array, or a ``jax.Array`` (on several hosts: a global array from
        ``jax.make_array_from_process_local_data``). Rows are split along ``axis_name``; when N
        is not a multiple of the number of shards, zero-weight zero rows are appended.
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``; default: a 1-D mesh over all
        devices (``jax.devices()``). Axes other than ``axis_name`` hold replicas.
      axis_name: the mesh axis the points are split along.
      chunk_size: points per matrix product on each device (memory O(chunk_size * k) per
        device). Default: as ``kmeans`` for the per-device number of points.

    Returns:
      ``KMeansResult``, its arrays replicated over the mesh.
    """
    mesh = _resolve_mesh(mesh, axis_name, local=False)
    shards = mesh.shape[axis_name]
    k, init, tol, spec = prepare_kmeans(x, k, init=init, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                                        empty=empty, spherical=spherical, weights=weights, precision=precision,
                                        update=update, kernel=kernel, shards=shards)
    n = np.shape(x)[0]
    n_pad = -(-n // shards) * shards - n
    spec = spec._replace(weighted=spec.weighted or n_pad > 0)
    rows = NamedSharding(mesh, P(axis_name))
    xs = _shard_rows(x, n_pad, rows, np.float32)
    if weights is None:  # made in place on the devices: no host array, and global on several hosts
        ws = _unit_weights(n, n_pad, rows)
    else:
        ws = _shard_rows(_weights(x, weights), n_pad, rows, np.float32)
    if isinstance(init, str):
        # on the unpadded rows, so that the draws are those of kmeans
        xv, wv = (xs[:n], ws[:n]) if n_pad else (xs, ws)
        init = init_centroids(key, xv, k, init, weights=wv, spherical=spherical)
    replicated = NamedSharding(mesh, P())
    c0 = jax.device_put(init, replicated)  # an array from the host: every process holds the same value
    return _lloyd_sharded(xs, ws, c0, jax.device_put(tol, replicated), mesh=mesh, axis_name=axis_name, spec=spec)


@partial(jax.jit, static_argnames=("mesh", "axis_name", "spec", "step", "precision", "tile"))
def _sharded_features(images, zca, centroids, *, mesh, axis_name, spec, step, precision, tile):
    f = partial(batch_features, spec=spec, step=step, precision=precision, tile=tile)
    return jax.shard_map(f, mesh=mesh, in_specs=(P(axis_name), P(), P()),
                         out_specs=P(axis_name))(images, zca, centroids)


def extract_features_sharded(
    images,
    centroids,
    zca: ZCA | None,
    spec: FeatureSpec = FeatureSpec(),
    *,
    mesh: Mesh | None = None,
    axis_name: str = "data",
    batch_size: int | None = None,
    step: int | None = None,
    memory_mb: float = 512.0,
    precision: str = "float32",
    progress: Callable[[int, int], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``kmjax.extract_features`` with each batch of images split over the devices of ``mesh``.

    Args:
      images, centroids, zca, spec, precision, progress, out: as in ``extract_features``.
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``, all of whose devices belong to
        this process; default: a 1-D mesh over this process's devices (``jax.local_devices()``).
      axis_name: the mesh axis the images of a batch are split along.
      batch_size: images per compiled call over all devices, rounded up to a multiple of
        (number of shards) * ``step``. Default: 128 per shard.
      step: images per encoder matrix product on each device (default as ``extract_features``).
      memory_mb: per-device budget for one step's float32 feature map.

    Returns:
      (N, feature_dim(spec, K, images.shape[1:])) float32 NumPy array, equal to ``extract_features``'s.
    """
    mesh = _resolve_mesh(mesh, axis_name, local=True)
    if not all(dev.process_index == jax.process_index() for dev in mesh.devices.flat):
        raise ValueError("extract_features_sharded needs a mesh of this process's devices; on several "
                         "hosts run it in each process on that process's images (see kmjax.parallel)")
    shards = mesh.shape[axis_name]
    centroids, step, batch_size, tile = prepare_features(images, centroids, zca, spec, precision=precision,
                                                         step=step, batch_size=batch_size, memory_mb=memory_mb,
                                                         shards=shards)
    k = centroids.shape[0]
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(axis_name))
    centroids = jax.device_put(centroids, replicated)
    if zca is not None:
        zca = jax.device_put(zca, replicated)
    def compute(batch):
        return _sharded_features(jax.device_put(batch, rows), zca, centroids, mesh=mesh,
                                 axis_name=axis_name, spec=spec, step=step, precision=precision, tile=tile)

    return run_batches(images, batch_size, feature_dim(spec, k, images.shape[1:]), compute, progress, out)
