"""Placing data on a mesh of devices: what ``kmeans(..., mesh=)`` and ``extract_features(..., mesh=)``
use to split their rows over several devices (and hosts).

One host, several GPUs or TPU cores
-----------------------------------
Pass a mesh: ``data_mesh()`` is a 1-D mesh over every device JAX sees, ``data_mesh(n)`` over the
first n::

    from kmjax.parallel import data_mesh

    mesh = data_mesh()
    res = kmjax.kmeans(jax.random.key(0), patches, 1600, init="randn", empty="zero", mesh=mesh)
    feats = kmjax.extract_features(images, res.centroids, zca, spec, mesh=data_mesh(local=True))

k-means gives the result of one device up to float32 rounding (each pass's sums are added over the
devices in another order); the features are those of one device. On a CPU-only machine
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts; ``split_cpu(8)``)
splits the host into 8 devices, which is how the tests exercise this, and what ``kmjax run`` does
with a config's ``devices`` (docs/scaling.md gives the speed-ups measured).

Several hosts (multi-process)
-----------------------------
Start one process per host and call ``jax.distributed.initialize()`` in each before any other JAX
call. Build the mesh over the *global* device list (``data_mesh()`` uses ``jax.devices()``,
which then spans every host) and give each process only its own rows: every process loads a
different slice of the points and ``jax.make_array_from_process_local_data`` stitches the slices
into one global array, sharded along the mesh axis (tests/test_parallel.py runs this with two
processes and a localhost coordinator)::

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kmjax.parallel import data_mesh

    jax.distributed.initialize()  # coordinator address etc. from the cluster environment
    mesh = data_mesh()
    # This process's rows: (N_local, D) float32, the same N_local in every process and a
    # multiple of jax.local_device_count(), so that no padding (a cross-host reshuffle) is needed.
    local = my_patch_loader(jax.process_index(), jax.process_count())
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    res = kmjax.kmeans(jax.random.key(0), x, 1600, init="randn", mesh=mesh)
    centroids = np.asarray(res.centroids)  # replicated on every device: readable in any process

Use the same ``key`` in every process. Feature extraction needs no communication between images:
on several hosts each process extracts the features of its own images on a mesh of its own devices
(``data_mesh(local=True)``; a mesh that spans other processes is refused, because the features are
returned as one host NumPy array).
"""

from __future__ import annotations

from functools import partial

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kmjax._checks import positive_int
from kmjax._jax import backends_started
from kmjax.errors import InputError, InputTypeError

__all__ = ["data_mesh", "resolve_mesh", "shard_rows", "unit_weights", "replicate", "split_cpu", "MAX_CPU_DEVICES"]


def split_cpu(count: int) -> None:
    """Ask XLA to split the CPU into ``count`` devices (0: one per hardware thread this process may
    use, at most ``MAX_CPU_DEVICES``), if JAX has not started yet, ``XLA_FLAGS`` names no device count
    and ``JAX_PLATFORMS`` does not leave the CPU out; otherwise nothing (a GPU's devices are what
    they are, and a started backend keeps its count)."""
    platforms = [p for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p]
    if backends_started() or (platforms and "cpu" not in platforms) or \
            "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if count == 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        count = min(threads, MAX_CPU_DEVICES)
    if count > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


# devices = 0 on a CPU: at most 8, since the features' fixed-size batches of 128 images per device
# outgrow the runner's 2,048-image segments past a few devices per batch (docs/scaling.md: the
# speed-up was measured on 2 cores only)
MAX_CPU_DEVICES = 8


def data_mesh(n_devices: int | None = None, axis_name: str = "data", *, local: bool = False) -> Mesh:
    """A 1-D mesh over the first ``n_devices`` devices (default: all of them).

    ``local=True`` restricts it to this process's devices (``jax.local_devices()``); otherwise the
    devices of every process (``jax.devices()``), which on one host is the same list. The axis
    is of type ``AxisType.Auto`` (jax.make_mesh's default is Explicit).
    """
    devices = jax.local_devices() if local else jax.devices()
    n = len(devices) if n_devices is None else positive_int(n_devices, "n_devices")
    if n > len(devices):
        raise InputError(f"asked for {n} devices, only {len(devices)} available")
    return jax.make_mesh((n,), (axis_name,), (AxisType.Auto,), devices=devices[:n])


def resolve_mesh(mesh, axis_name: str) -> Mesh:
    """``mesh`` checked (a ``Mesh`` with the axis ``axis_name``), with Auto axes."""
    if not isinstance(mesh, Mesh):
        raise InputTypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise InputError(f"mesh has axes {mesh.axis_names}, not {axis_name!r}; pass axis_name=")
    # The same devices with Auto axes: arrays placed on an Explicit mesh carry their sharding in
    # their type, and the init's gathers (x[indices]) then refuse to run without out_sharding=.
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


@partial(jax.jit, static_argnames="pad")
def _pad_rows_jit(a, pad):
    return jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])


def shard_rows(a, n_pad: int, sharding, dtype=np.float32):
    """(N, ...) -> (N + n_pad, ...) with zero rows appended, placed with ``sharding``.

    Host arrays are padded on the host and each device gets its rows from them, never the whole
    array (a process whose devices are part of a mesh spanning several processes places its own
    devices' rows; a process-local device array is placed from the host likewise).
    """
    if isinstance(a, jax.Array) and a.is_fully_addressable and not sharding.is_fully_addressable:
        a = np.asarray(a)
    if isinstance(a, jax.Array):
        a = a.astype(dtype)
        if n_pad:
            a = _pad_rows_jit(a, pad=n_pad)
        return jax.device_put(a, sharding)
    a = np.asarray(a, dtype)
    if n_pad:
        a = np.concatenate([a, np.zeros((n_pad,) + a.shape[1:], dtype)])
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


@partial(jax.jit, static_argnums=(0, 1, 2))
def unit_weights(n, n_pad, sharding):
    """(n + n_pad,) float32 weights, 1 for the n real rows and 0 for the padding, made on the devices."""
    return jax.lax.with_sharding_constraint((jnp.arange(n + n_pad) < n).astype(jnp.float32), sharding)


def replicate(tree, mesh: Mesh):
    """``tree``'s arrays placed whole on every device of ``mesh`` (every process must hold the same values)."""
    sharding = NamedSharding(mesh, P())

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(place, tree)
