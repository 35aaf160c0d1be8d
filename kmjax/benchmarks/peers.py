"""The libraries the k-means benchmark (``kmjax.benchmarks.kmeans``) times side by side: one runner
per library, each running exactly ``iters`` Lloyd iterations from the same starting centroids."""

from __future__ import annotations

import time
import warnings

import numpy as np

SEED = 0  # the key the kmjax runner passes (its init is an array: the key draws nothing)

__all__ = ["import_libs", "make_runner", "KmjaxRunner", "SklearnRunner", "FaissRunner", "TorchRunner"]


def import_libs(libs):
    """Modules of the importable libraries; a printed note for each one skipped."""
    mods = {}
    for lib in libs:
        try:
            if lib == "kmjax":
                import importlib

                import jax
                # the module, not the function that kmjax/__init__ may re-export as kmjax.cluster
                km = importlib.import_module("kmjax.cluster")
                mods[lib] = (jax, km)
            elif lib == "sklearn":
                import sklearn
                from sklearn.cluster import KMeans
                mods[lib] = (sklearn, KMeans)
            elif lib == "faiss":
                import faiss
                mods[lib] = faiss
            elif lib == "torch":
                import torch
                mods[lib] = torch
            else:
                print(f"note: unknown library {lib!r}, skipped")
        except Exception as e:  # ImportError, or a broken binary
            print(f"note: {lib} not importable ({type(e).__name__}: {e}); skipped")
    return mods


class _Timed:
    """A runner whose ``_call()`` is timed by ``run`` and run once untimed by ``warmup`` (compiling)."""

    def _timed(self):
        t = time.perf_counter()
        out = self._call()
        return time.perf_counter() - t, out

    def warmup(self):
        return self._timed()[0]


class KmjaxRunner(_Timed):
    precision = "float32"  # set from --precision
    update = None  # set from --update (None: the backend's default)
    kernel = "xla"  # set from --kernel
    devices = 1  # set from --devices (0: every local device)

    def __init__(self, mods, x, c0, k, iters):
        jax, km = mods
        from kmjax.parallel import data_mesh

        self.jax, self.km, self.k, self.iters = jax, km, k, iters
        count = self.devices or len(jax.local_devices())
        self.mesh = data_mesh(count, local=True) if count > 1 else None
        self.x = jax.device_put(x)
        self.c0 = jax.device_put(c0)
        self.key = jax.random.key(SEED)
        self.x.block_until_ready()

    def _call(self):
        res = self.km.kmeans(self.key, self.x, self.k, init=self.c0, max_iter=self.iters, tol=None,
                             precision=self.precision, update=self.update, kernel=self.kernel, mesh=self.mesh)
        return self.jax.block_until_ready(res)

    def run(self):
        dt, res = self._timed()
        n_iter = int(res.n_iter)
        if n_iter != self.iters:
            warnings.warn(f"kmjax ran {n_iter} iterations, expected {self.iters}")
        info = {
            "centroids": np.asarray(res.centroids),
            "inertia_reported": float(res.inertia),
            "objective": [float(v) for v in np.asarray(res.objective)],
            "n_iter": n_iter,
        }
        return dt, info


class SklearnRunner:
    def __init__(self, mods, x, c0, k, iters):
        _, self.KMeans = mods
        self.x, self.c0, self.k, self.iters = x, c0, k, iters

    def run(self):
        est = self.KMeans(n_clusters=self.k, init=self.c0, n_init=1, max_iter=self.iters, tol=0,
                          algorithm="lloyd")
        t = time.perf_counter()
        est.fit(self.x)
        dt = time.perf_counter() - t
        n_iter = int(est.n_iter_)
        if n_iter != self.iters:
            warnings.warn(f"scikit-learn stopped after n_iter_={n_iter} iterations (strict "
                          f"convergence?), expected {self.iters}; ms/iter divides by n_iter_")
        info = {
            "centroids": np.asarray(est.cluster_centers_, np.float32),
            "inertia_reported": float(est.inertia_),
            "n_iter": n_iter,
            "dtype": str(est.cluster_centers_.dtype),
        }
        return dt, info


class FaissRunner:
    def __init__(self, faiss, x, c0, k, iters):
        self.faiss, self.x, self.c0, self.k, self.iters = faiss, x, c0, k, iters

    def run(self):
        faiss = self.faiss
        n, d = self.x.shape
        clus = faiss.Clustering(d, self.k)
        clus.niter = self.iters
        clus.nredo = 1
        clus.verbose = False
        clus.spherical = False
        clus.max_points_per_centroid = n  # never subsample: use all points
        clus.min_points_per_centroid = 0
        if hasattr(clus, "early_stop_threshold"):
            clus.early_stop_threshold = -1.0  # never stop early
        if hasattr(clus, "frozen_centroids"):
            clus.frozen_centroids = False  # provided centroids are an init, not fixed
        faiss.copy_array_to_vector(self.c0.ravel(), clus.centroids)
        index = faiss.IndexFlatL2(d)
        t = time.perf_counter()
        clus.train(self.x, index)
        dt = time.perf_counter() - t
        stats = clus.iteration_stats
        stats = [stats.at(i) for i in range(stats.size())]
        if len(stats) != self.iters:
            warnings.warn(f"faiss ran {len(stats)} iterations, expected {self.iters}")
        info = {
            "centroids": faiss.vector_to_array(clus.centroids).reshape(self.k, d),
            # objective of the last assignment, i.e. of the centroids before the last update
            "inertia_reported": float(stats[-1].obj) if stats else float("nan"),
            "objective": [float(s.obj) for s in stats],
            "nsplit": int(sum(s.nsplit for s in stats)),
            "n_iter": len(stats),
        }
        return dt, info


class TorchRunner(_Timed):
    """The plain PyTorch Lloyd loop a GPU user would write: s = x @ c.T - |c|^2 / 2, argmax,
    index_add_ of the points, bincount; empty clusters keep their centroid. Like kmjax and
    scikit-learn it ends with one more assignment pass (the final inertia). The scores of all N
    points at once, as such a loop does, unless they exceed 4 GB (then blocks of rows)."""

    precision = "float32"  # set from --precision: "tf32" allows TF32 products on NVIDIA GPUs

    def __init__(self, torch, x, c0, k, iters):
        self.torch, self.k, self.iters = torch, k, iters
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.x = torch.from_numpy(x).to(self.device)
        self.c0 = torch.from_numpy(c0).to(self.device)
        self.rows = max(1, min(len(x), (1 << 30) // k))

    def _assign(self, c):
        t, best, index = self.torch, [], []
        half = 0.5 * (c * c).sum(1)
        for start in range(0, len(self.x), self.rows):
            s = self.x[start : start + self.rows] @ c.T - half
            b, i = s.max(1)
            best.append(b)
            index.append(i)
        return t.cat(best), t.cat(index)

    def _call(self):
        t = self.torch
        t.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        c = self.c0.clone()
        for _ in range(self.iters):
            _, index = self._assign(c)
            sums = t.zeros_like(c).index_add_(0, index, self.x)
            counts = t.bincount(index, minlength=self.k).to(c.dtype)
            c = t.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        best, _ = self._assign(c)
        inertia = float((self.x * self.x).sum() - 2 * best.sum())
        if self.device == "cuda":
            t.cuda.synchronize()
        return c, inertia

    def run(self):
        dt, (c, inertia) = self._timed()
        return dt, {"centroids": c.cpu().numpy(), "inertia_reported": inertia, "n_iter": self.iters}


def make_runner(lib, mods, x, c0, k, iters):
    cls = {"kmjax": KmjaxRunner, "sklearn": SklearnRunner, "faiss": FaissRunner, "torch": TorchRunner}[lib]
    return cls(mods[lib], x, c0, k, iters)
