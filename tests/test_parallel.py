"""k-means and feature extraction on a mesh of devices (``mesh=``) equal their one-device results.

JAX fixes the number of devices when it starts, so the 8-device checks run in a fresh Python
process whose environment splits the CPU into 8 devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from kmjax.cluster import kmeans
from kmjax.features import FeatureSpec, extract_features
from kmjax.parallel import data_mesh

ROOT = Path(__file__).resolve().parents[1]


def run_on_8_devices(body: str, timeout: float = 120.0) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = "import jax\nassert len(jax.devices()) == 8, jax.devices()\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.long
def test_kmeans_on_a_mesh_matches_one_device_on_8_devices():
    out = run_on_8_devices("""
        import numpy as np
        from kmjax.cluster import kmeans
        from kmjax.parallel import data_mesh

        rng = np.random.default_rng(0)
        K = 10
        cases = [  # n, empty, spherical, weighted
            (1024, "zero", False, False),
            (1001, "zero", False, False),
            (1001, "reseed", False, False),
            (1001, "reseed", True, False),
            (1001, "reseed", False, True),
        ]
        results = {}
        for n, empty, spherical, weighted in cases:
            x = rng.normal(size=(n, 6)).astype(np.float32)
            c0 = x[:K].copy()
            c0[7:] = 50.0  # far from every point: three clusters are empty after the first pass
            w = rng.uniform(0.5, 2.0, n).astype(np.float32) if weighted else None
            kw = dict(init=c0, tol=None, max_iter=10, empty=empty, spherical=spherical, weights=w,
                      chunk_size=64)
            a = kmeans(jax.random.key(0), x, K, **kw)
            b = kmeans(jax.random.key(0), x, K, mesh=data_mesh(), **kw)
            assert len(b.centroids.sharding.device_set) == 8
            np.testing.assert_allclose(b.centroids, a.centroids, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(b.objective, a.objective, rtol=1e-5)
            np.testing.assert_allclose(b.inertia, a.inertia, rtol=1e-5)
            np.testing.assert_allclose(b.counts, a.counts, rtol=1e-5, atol=1e-4)
            assert int(b.n_iter) == int(a.n_iter) == 10 and bool(b.converged) == bool(a.converged)
            np.testing.assert_allclose(np.sum(b.counts), n if w is None else w.sum(), rtol=1e-5)
            results[(n, empty, spherical, weighted)] = np.asarray(b.centroids)
            print("ok", n, empty, spherical, weighted)
        # the reseed branch did run: it ends elsewhere than the zero policy from the same start
        assert not np.allclose(results[(1001, "reseed", False, False)], results[(1001, "zero", False, False)])

        # init by name draws what kmeans draws; early stopping agrees
        x = rng.normal(size=(1001, 6)).astype(np.float32)
        a = kmeans(jax.random.key(3), x, K, init="k-means++", max_iter=50)
        reports = []
        b = kmeans(jax.random.key(3), x, K, init="k-means++", max_iter=50, mesh=data_mesh(),
                   progress=lambda *r: reports.append(r))
        np.testing.assert_allclose(b.centroids, a.centroids, rtol=1e-5, atol=1e-5)
        assert int(b.n_iter) == int(a.n_iter)
        # progress on a mesh: one report per iteration, the objective of each
        assert [r[:2] for r in reports] == [(i + 1, 50) for i in range(int(a.n_iter))], reports
        np.testing.assert_allclose([r[2] for r in reports], np.asarray(a.objective)[: int(a.n_iter)], rtol=1e-5)

        # a 4-device mesh with another axis name, Explicit axes (jax.make_mesh's default), and
        # points already sharded on it
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((4,), ("d",))
        xg = jax.device_put(x[:1000], NamedSharding(mesh, P("d")))
        b = kmeans(jax.random.key(1), xg, K, mesh=mesh, axis_name="d", init="random", max_iter=10, tol=None,
                   empty="zero")
        a = kmeans(jax.random.key(1), x[:1000], K, init="random", max_iter=10, tol=None, empty="zero")
        np.testing.assert_allclose(b.centroids, a.centroids, rtol=1e-5, atol=1e-5)
        assert len(b.centroids.sharding.device_set) == 4
        print("ok mesh")
    """)
    assert out.count("ok") == 6


def test_extract_features_on_a_mesh_matches_on_8_devices():
    out = run_on_8_devices("""
        import numpy as np
        from kmjax.features import FeatureSpec, extract_features
        from kmjax.parallel import data_mesh
        from kmjax.preprocess import fit_zca, normalize_patches

        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, size=(16, 12, 12, 3)).astype(np.float32)
        spec = FeatureSpec(patch_size=4, stride=1, grid=2)
        zca = fit_zca(normalize_patches(rng.uniform(0, 255, (500, 48))))
        centroids = rng.normal(size=(8, 48)).astype(np.float32)

        def close(b, a):
            assert b.shape == a.shape and b.dtype == np.float32
            assert np.abs(b - a).max() <= 1e-5 * max(1.0, np.abs(a).max()), np.abs(b - a).max()

        a = extract_features(images, centroids, zca, spec)
        for batch_size in (None, 8, 24):  # one batch; two batches of one image per device
            close(extract_features(images, centroids, zca, spec, batch_size=batch_size, mesh=data_mesh()), a)
        # 13 images: a padded last batch; no whitening; another encoder; two images per product
        spec2 = spec._replace(encoder="soft_threshold", pool="max")
        a = extract_features(images[:13], centroids, None, spec2)
        done = []
        b = extract_features(images[:13], centroids, None, spec2, step=2, batch_size=16, mesh=data_mesh(),
                             progress=lambda d, t, v: done.append((d, t, v)))
        close(b, a)
        assert done == [(13, 13, None)], done
        print("ok features")
    """)
    assert "ok features" in out


def test_one_device_mesh_in_process():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(203, 5)).astype(np.float32)
    c0 = x[:6].copy()
    c0[5] = 40.0
    mesh = data_mesh(1)
    for empty in ("zero", "reseed"):
        kw = dict(init=c0, tol=None, max_iter=8, empty=empty, chunk_size=50)
        a = kmeans(jax.random.key(0), x, 6, **kw)
        b = kmeans(jax.random.key(0), x, 6, mesh=mesh, **kw)
        np.testing.assert_allclose(b.centroids, a.centroids, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.objective, a.objective, rtol=1e-5)


def test_argument_errors():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="axis_name"):
        kmeans(jax.random.key(0), x, 2, mesh=data_mesh(1), axis_name="batch")
    with pytest.raises(TypeError, match="Mesh"):
        kmeans(jax.random.key(0), x, 2, mesh="data")
    with pytest.raises(TypeError, match="Mesh"):
        extract_features(np.zeros((2, 8, 8, 3)), np.zeros((4, 48)), None, mesh="data")


_X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
_BAD_KMEANS = {
    "precision": dict(precision="float16"), "empty": dict(empty="drop"), "k": dict(k=21),
    "init shape": dict(init=np.zeros((3, 3))), "init name": dict(init="kmeans++"), "chunk": dict(chunk_size=0),
    "max_iter": dict(max_iter=-1), "tol": dict(tol=-1.0), "update": dict(update="atomic"),
    "weights shape": dict(weights=np.ones(3)), "weights values": dict(weights=-np.ones(20)),
    "nan points": dict(x=np.where(np.eye(20, 3) > 0, np.nan, _X)), "1-d points": dict(x=_X[:, 0]),
}


@pytest.mark.parametrize("case", sorted(_BAD_KMEANS))
def test_kmeans_on_a_mesh_rejects_what_kmeans_rejects(case):
    # the checks run before the data is placed: the same inputs refused with the same message
    kw = dict(x=_X, k=2, init="random", max_iter=2)
    kw.update(_BAD_KMEANS[case])
    x, k = kw.pop("x"), kw.pop("k")
    with pytest.raises(ValueError) as single:
        kmeans(jax.random.key(0), x, k, **kw)
    with pytest.raises(ValueError) as sharded:
        kmeans(jax.random.key(0), x, k, mesh=data_mesh(1), **kw)
    assert str(sharded.value) == str(single.value)


_IMAGES = np.random.default_rng(1).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
_BAD_FEATURES = {
    "precision": dict(precision="float16"), "step": dict(step=0), "batch": dict(batch_size=0),
    "centroid width": dict(centroids=np.zeros((4, 5), np.float32)),
    "nan image": dict(images=np.where(_IMAGES > 250, np.nan, _IMAGES)), "3-d images": dict(images=_IMAGES[0]),
    "encoder": dict(spec=FeatureSpec(patch_size=2, encoder="cube")),
}


@pytest.mark.parametrize("case", sorted(_BAD_FEATURES))
def test_features_on_a_mesh_reject_what_extract_features_rejects(case):
    kw = dict(images=_IMAGES, centroids=np.zeros((4, 12), np.float32), zca=None, spec=FeatureSpec(patch_size=2))
    kw.update(_BAD_FEATURES[case])
    with pytest.raises(ValueError) as single:
        extract_features(**kw)
    with pytest.raises(ValueError) as sharded:
        extract_features(**kw, mesh=data_mesh(1))
    assert str(sharded.value) == str(single.value)


_TWO_PROCESS_WORKER = """
import sys
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from kmjax.cluster import kmeans
from kmjax.features import FeatureSpec, extract_features
from kmjax.parallel import data_mesh

assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
rng = np.random.default_rng(0)
x = rng.normal(size=(1000, 6)).astype(np.float32)
c0 = x[:5].copy()
c0[4] = 40.0  # an empty cluster: the re-seeding gathers candidates across the processes
mesh = data_mesh()  # every device of both processes
local = x[pid * 500 : (pid + 1) * 500]  # each process holds only its own rows
xg = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
for init, empty in ((c0, "reseed"), ("random", "zero")):
    b = kmeans(jax.random.key(3), xg, 5, mesh=mesh, init=init, max_iter=10, tol=None, empty=empty)
    a = kmeans(jax.random.key(3), x, 5, init=init, max_iter=10, tol=None, empty=empty)
    np.testing.assert_allclose(np.asarray(b.centroids), np.asarray(a.centroids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(b.inertia), float(a.inertia), rtol=1e-5)

# features: each process on its own images, over its own devices
images = rng.uniform(0, 255, size=(10, 10, 10, 3)).astype(np.float32)[pid * 5 : (pid + 1) * 5]
spec = FeatureSpec(patch_size=3, grid=2)
centroids = rng.normal(size=(4, 27)).astype(np.float32)
got = extract_features(images, centroids, None, spec, mesh=data_mesh(local=True))
np.testing.assert_allclose(got, extract_features(images, centroids, None, spec), rtol=1e-5, atol=1e-5)
print("ok", pid)
"""


@pytest.mark.long
def test_two_processes_with_a_localhost_coordinator(tmp_path):
    # the multi-host recipe of kmjax.parallel, on this machine: 2 processes x 2 CPU devices each,
    # rows split between the processes, the same centroids as one device
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS_WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert [out.strip().splitlines()[-1] for out, _ in outs] == ["ok 0", "ok 1"]


# split_cpu asks whether JAX has started its backends: through JAX's private query, or, where a JAX
# lacks it, through the public option jax_num_cpu_devices, which refuses a change once they have

_WITHOUT_THE_PRIVATE_QUERY = """
import types

import jax
import jax._src as private

real, private.xla_bridge = private.xla_bridge, types.SimpleNamespace()  # as a JAX without it
from kmjax._jax import backends_started
from kmjax.parallel import split_cpu

assert not backends_started() and jax.config.jax_num_cpu_devices == -1
split_cpu(3)
assert backends_started() is False
private.xla_bridge = real
assert len(jax.devices()) == 3, jax.devices()
private.xla_bridge = types.SimpleNamespace()
assert backends_started() and jax.config.jax_num_cpu_devices == -1
print("ok")
"""


def test_backends_started_without_jax_s_private_query(monkeypatch):
    import types

    import jax._src as private

    from kmjax._jax import backends_started

    jax.devices()
    assert backends_started()
    monkeypatch.setattr(private, "xla_bridge", types.SimpleNamespace())
    before = jax.config.jax_num_cpu_devices
    assert backends_started() and jax.config.jax_num_cpu_devices == before  # asked, left as it was
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_THE_PRIVATE_QUERY], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
