"""Residency of the hot passes, checked on this CPU: the Lloyd loop (``kmeans``), ``learn_dictionary``
whole (patches, normalization, whitening, its Lloyd loop), the argument checks, a features segment
(``batch_features``, and ``extract_features`` over host images), prediction (``raw_scores``,
``predict_features``). (The classifier's device path has its own such tests, in test_device.py.)

Each pass gets its inputs put on the device first (``jax.device_put``) and runs under
``jax.transfer_guard_host_to_device("disallow")`` and ``jax.transfer_guard_device_to_host("disallow")``:
every transfer is explicit (``jax.device_put``, ``jax.device_get``). Its pulls (device-to-host reads)
are counted and asserted, each with what it is; an argument check pulls one flag (one fused pass
over the array on its device), never the data.

What the guard does on JAX's CPU backend (``test_what_the_guard_catches_on_this_cpu``):
- host-to-device, "disallow" raises on every implicit transfer, as on a GPU: a NumPy array or a
  Python scalar given to a jitted function, ``jnp.asarray(np_array)``, ``jnp.float32(1.0)``, an
  eager op with a Python scalar (``x + 1.0``, ``x[0]``: the index is sent). ``jax.device_put`` (explicit)
  passes. Constants made inside a jitted function are no transfer.
- device-to-host, "disallow" catches nothing on a CPU: ``np.asarray(x)``, ``int(x)``, ``x.item()``
  all pass, since a CPU array is host memory (NumPy reads it in place, through the buffer protocol,
  and no transfer happens). On a GPU the same reads raise unless made by ``jax.device_get``.
So the pulls are counted here, not left to the guard: ``_count`` routes every host read of a device
array through ``jax.Array._value`` (the path every read takes on a GPU; on this CPU NumPy's
buffer-protocol reads are turned off for the duration) and records it, explicit (inside
``jax.device_get``) or implicit. An implicit read is what the device-to-host guard would refuse on a
GPU. A pull is one ``jax.device_get`` call (its arrays are copied together) or one implicit read of a
distinct array (a GPU caches an array's host copy, so reading it again is no transfer). The explicit
host-to-device transfers (``jax.device_put`` calls from kmjax) are counted too.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array
from jax._src import config as jax_config

import kmjax
from kmjax import dictionary as kdict
from kmjax.classify.linear import LinearModel, Standardizer, raw_scores, predict, predict_features, standardize
from kmjax.symmetry import close_dictionary

KEY = jax.random.key(0)
N, D, K = 256, 8, 5


class Transfers:
    """What kmjax moved between host and device inside ``_count``."""

    def __init__(self):
        self.reads = []  # (array, explicit, site): every host read of a device array
        self.gets = []  # the site of every jax.device_get call
        self.puts = []  # the site of every jax.device_put of host values

    @property
    def implicit(self) -> list:
        """Sites of the implicit pulls: reads of distinct arrays outside jax.device_get."""
        seen, out = set(), []
        for a, explicit, site in self.reads:
            if not explicit and id(a) not in seen:
                seen.add(id(a))
                out.append(site)
        return out

    @property
    def pulls(self) -> int:
        return len(self.gets) + len(self.implicit)


def _site() -> str:
    """file:function of the innermost kmjax frame calling ("?": none, a call from this test file)."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/kmjax/" in f.filename]
    return f"{frames[-1].filename.rsplit('/kmjax/', 1)[1]}:{frames[-1].name}" if frames else "?"


@contextlib.contextmanager
def _numpy_reads_through_value():
    """NumPy's reads of CPU arrays made through ``__array__`` (hence ``_value``), as on a GPU, by
    clearing the array type's ``tp_as_buffer`` slot (restored after); skipped where that slot is not
    where CPython 3.8-3.13 on 64 bits keeps it."""
    t = jax_array.ArrayImpl
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("reads counted by the CPython type layout")
    name = ctypes.cast(ctypes.c_void_p.from_address(id(t) + 24).value, ctypes.c_char_p).value  # tp_name
    slot = ctypes.c_void_p.from_address(id(t) + 160)  # tp_as_buffer
    probe = jax.device_put(np.zeros(1, np.float32))
    if not name.endswith(b"ArrayImpl") or not slot.value:
        pytest.skip(f"unexpected type layout: {name!r}")
    saved = slot.value
    slot.value = None
    try:
        with pytest.raises(TypeError):
            memoryview(probe)
        yield
    finally:
        slot.value = saved


@contextlib.contextmanager
def _count(monkeypatch):
    """Run the block with implicit transfers disallowed both ways, recording the transfers into the
    ``Transfers`` it yields."""
    record = Transfers()
    value = jax_array.ArrayImpl._value
    device_get, device_put = jax.device_get, jax.device_put

    def read(self):
        explicit = bool(jax_config.guard_lib.thread_local_state().explicit_device_get)
        record.reads.append((self, explicit, _site()))
        return value.fget(self)

    def get(x):
        record.gets.append(_site())
        return device_get(x)

    def put(x, *args, **kwargs):
        site = _site()
        if site != "?" and any(not isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(x)):
            record.puts.append(site)
        return device_put(x, *args, **kwargs)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(read))
    monkeypatch.setattr(jax, "device_get", get)
    monkeypatch.setattr(jax, "device_put", put)
    try:
        with _numpy_reads_through_value(), jax.transfer_guard_host_to_device("disallow"), \
                jax.transfer_guard_device_to_host("disallow"):
            yield record
    finally:
        monkeypatch.undo()


def test_what_the_guard_catches_on_this_cpu(monkeypatch):
    f = jax.jit(lambda a: a * 2)
    x = jax.device_put(np.ones(3, np.float32))
    with jax.transfer_guard("disallow"):
        implicits = [lambda: f(np.ones(3, np.float32)), lambda: f(3.0), lambda: jnp.float32(1.0), lambda: x + 1.0,
                     lambda: x[0]]
        if jax.__version_info__ >= (0, 10, 2):  # jax 0.10.0 (CI's floor) lets jnp.asarray of a NumPy array through
            implicits.append(lambda: jnp.asarray(np.ones(3)))
        for implicit in implicits:
            with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
                implicit()
        jax.block_until_ready((f(x), jax.device_put(np.ones(3)), jax.jit(lambda: jnp.zeros(4))()))
        y = f(x)
        # not caught on a CPU (caught on a GPU): implicit pulls
        assert np.asarray(y).sum() == 6 and int(y.sum()) == 6 and y.sum().item() == 6
    with _count(monkeypatch) as record:  # but counted
        np.asarray(y), int(y.sum()), jax.device_get(y)
    assert len(record.implicit) == 2 and len(record.gets) == 1 and record.pulls == 3


def _points(n=N, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _same(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# The defaults of this CPU, and those of an accelerator (deterministic matmul update, one chunk as
# wide as the budget allows: here all the points; the fused kernel, interpreted here).
SETTINGS = {"default": {}, "accelerator": dict(update="matmul", chunk_size=N),
            "accelerator-pallas": dict(update="matmul", chunk_size=N, kernel="pallas"),
            "spherical": dict(spherical=True, init="random", empty="reseed")}
CHECK = "_checks.py:check_matrix"  # check_matrix: jax.device_get(_all_finite(x)), the points' finiteness flag


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_lloyd_loop_is_resident(monkeypatch, setting):
    options = dict(max_iter=6, **SETTINGS[setting])
    host = kmjax.kmeans(KEY, _points(), K, **options)
    x = jax.device_put(_points())
    with _count(monkeypatch) as record:  # no implicit transfer either way
        result = jax.block_until_ready(kmjax.kmeans(KEY, x, K, **options))
    _same(result, host)
    # one pull: the argument check's finiteness flag (explicit; kmjax/_checks.py). The loop runs whole,
    # as one program: no pull in it, none at its end (the result stays on the device)
    assert record.implicit == [] and record.gets == [CHECK]
    # sent explicitly: tol, and the loop's stopping iteration (traced: one program for any split)
    assert record.puts == ["cluster.py:check_kmeans", "cluster.py:_until"]


@pytest.mark.parametrize("tol", [None, 1e-2])
def test_the_lloyd_loop_with_progress_pulls_once_per_iteration(monkeypatch, tol):
    calls = []
    x = jax.device_put(_points())
    options = dict(max_iter=8, tol=tol, init="random")
    with _count(monkeypatch) as record:
        result = jax.block_until_ready(kmjax.kmeans(KEY, x, K, **options, progress=lambda *a: calls.append(a),
                                                    checkpoint=lambda s: None))
    _same(result, kmjax.kmeans(KEY, _points(), K, **options))
    n_iter = int(result.n_iter)
    assert tol is None or n_iter < 8  # the second one stops early
    # on purpose, for the progress report and the checkpoint: one explicit pull (iteration, converged,
    # objective so far) of the starting state and one after each iteration; after the check's
    assert record.gets == [CHECK] + ["cluster.py:__call__"] * (1 + n_iter) and record.implicit == []
    assert record.puts == ["cluster.py:check_kmeans"] + ["cluster.py:_until"] * n_iter  # tol; each piece's stopping iteration
    assert [c[0] for c in calls] == list(range(1, n_iter + 1))


def test_the_lloyd_loop_with_weights(monkeypatch):
    w = np.random.default_rng(1).uniform(0.5, 2.0, N).astype(np.float32)
    x, wd = jax.device_put((_points(), w))
    with _count(monkeypatch) as record:
        result = jax.block_until_ready(kmjax.kmeans(KEY, x, K, max_iter=4, weights=wd))
    _same(result, kmjax.kmeans(KEY, _points(), K, max_iter=4, weights=w))
    assert record.implicit == [] and record.gets == [CHECK, "cluster.py:point_weights"]  # + the weights' validity flag


def test_learn_dictionarys_lloyd_loop_is_resident(monkeypatch):
    """Its k-means, on the whitened patches the (unguarded) setup leaves on the device."""
    images = np.random.default_rng(2).uniform(0, 255, (6, 12, 12, 3)).astype(np.float32)
    options = dict(k=8, n_patches=300, max_iter=4)
    expected = kmjax.learn_dictionary(KEY, images, **options)
    records = []

    def guarded(*args, **kwargs):
        assert isinstance(args[1], jax.Array)
        with _count(monkeypatch) as record:
            records.append(record)
            return jax.block_until_ready(kmjax.kmeans(*args, **kwargs))

    with monkeypatch.context() as m:
        m.setattr(kdict, "kmeans", guarded)
        result = kmjax.learn_dictionary(KEY, images, **options)
    _same(result, expected)
    assert records[0].implicit == [] and records[0].gets == [CHECK]


LEARN = {"default": {}, "flip-closed": dict(flip_closed=True), "grid": dict(sampling="grid", stride=3),
         "dimension": dict(normalize="dimension"), "raw": dict(normalize="none", whiten=False)}


@pytest.mark.parametrize("on_device", [True, False], ids=["images-on-device", "images-on-host"])
@pytest.mark.parametrize("setting", sorted(LEARN))
def test_learn_dictionary_whole_is_resident(monkeypatch, setting, on_device):
    """The setup too: patches, normalization, whitening (flip-closed: the mirror steps), k-means."""
    images = np.random.default_rng(2).uniform(0, 255, (6, 12, 12, 3)).astype(np.float32)
    options = dict(k=8, n_patches=300, max_iter=2, **LEARN[setting])
    expected = kmjax.learn_dictionary(KEY, images, **options)
    images_ = jax.device_put(images) if on_device else images
    with _count(monkeypatch) as record:  # no implicit transfer either way
        result = jax.block_until_ready(kmjax.learn_dictionary(KEY, images_, **options))
    _same(result, expected)
    whiten = LEARN[setting].get("whiten", True)
    # pulled, explicitly: device images' finiteness flag (host images are checked on the host), then
    # the finiteness flags of the normalized patches (fit_zca's check) and of the whitened ones (kmeans's)
    assert record.implicit == []
    assert record.gets == ["_checks.py:check_images"] * on_device + [CHECK] * (1 + whiten)
    # sent explicitly: host images (one program cuts their patches), eps_norm (weak-typed, as a Python
    # float: one program for any eps), eps_zca, kmeans's tol and stopping iteration, the patch count
    sent = ["patches.py:" + ("extract_patches" if setting == "grid" else "sample_patches")] * (not on_device)
    sent += ["dictionary.py:learn_dictionary"] * (LEARN[setting].get("normalize", "patch") == "patch")
    sent += ["preprocess.py:fit_zca"] * whiten
    assert record.puts == sent + ["cluster.py:check_kmeans", "cluster.py:_until", "dictionary.py:learn_dictionary"]


def test_learn_dictionary_sends_given_patches_once(monkeypatch):
    """A sample assembled on the host (the runner's several-process path), given as ``patches``."""
    images = np.random.default_rng(2).uniform(0, 255, (6, 12, 12, 3)).astype(np.float32)
    patches = np.asarray(kmjax.sample_patches(kdict.patch_key(KEY), images, 300, 6))
    expected = kmjax.learn_dictionary(KEY, images, k=8, n_patches=300, max_iter=2)
    with _count(monkeypatch) as record:
        result = jax.block_until_ready(kmjax.learn_dictionary(KEY, images, k=8, max_iter=2, patches=patches))
    _same(result, expected)
    assert record.implicit == [] and record.gets == [CHECK] * 2
    assert record.puts[0] == "dictionary.py:learn_dictionary"  # the patches, then eps_norm, ... as above
    assert record.puts[1:] == ["dictionary.py:learn_dictionary", "preprocess.py:fit_zca", "cluster.py:check_kmeans",
                               "cluster.py:_until", "dictionary.py:learn_dictionary"]


@pytest.mark.parametrize("on_device", [True, False], ids=["on-device", "on-host"])
def test_the_checks_pull_a_flag_not_the_data(monkeypatch, on_device):
    """check_images and check_matrix on device arrays: one fused reduction each, its flag pulled
    explicitly; the error message's counts (one more reduction, pulled) only when a value is bad."""
    from kmjax._checks import check_images, check_matrix

    images = _images()
    bad = images.copy()
    bad[1, 2, 3, 0] = np.nan
    bad[4, 0, 0, 2] = np.inf
    x, xbad = _points(), _points()
    xbad[3, 1] = np.nan
    put = jax.device_put if on_device else (lambda a: a)
    args = put((images, bad, x, xbad))
    with _count(monkeypatch) as record:
        check_images(args[0])
        check_matrix(args[2])
        with pytest.raises(ValueError, match=r"images hold 2 NaN or Inf values, in 2 of 6 images \(the first: index 1\)"):
            check_images(args[1])
        with pytest.raises(ValueError, match="x contains 1 NaN or Inf values"):
            check_matrix(args[3])
    assert record.implicit == [] and record.puts == []
    flags = ["_checks.py:check_images", CHECK, "_checks.py:check_images", "_checks.py:check_images", CHECK, CHECK]
    assert record.gets == (flags if on_device else [])


def _dictionary(k=8, d=108, seed=3, flip_closed=False):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k // 2 if flip_closed else k, d)).astype(np.float32)
    c = np.asarray(close_dictionary(c, 6)) if flip_closed else c
    a = rng.normal(size=(d, d)).astype(np.float32) / 10
    return c, kmjax.ZCA(rng.normal(size=(d,)).astype(np.float32), a @ a.T + np.eye(d, dtype=np.float32))


def _images(n=6, size=12, seed=4):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


FEATURES = {"default": (kmjax.FeatureSpec(), 2), "accelerator": (kmjax.FeatureSpec(), 6),  # step: images per product
            "soft-3x3-mirror_sums": (kmjax.FeatureSpec(encoder="soft_threshold", pool_size=3, pool_stride=2,
                                                            mirror_sums=True), 6)}


@pytest.mark.parametrize("setting", sorted(FEATURES))
def test_a_features_segment_is_resident(monkeypatch, setting):
    spec, step = FEATURES[setting]
    c, zca = _dictionary(flip_closed=spec.mirror_sums)
    images, cd, zd = jax.device_put((_images(), c, zca))
    expected = kmjax.batch_features(_images(), zca, c, spec=spec, step=step)
    with _count(monkeypatch) as record:
        feats = jax.block_until_ready(kmjax.batch_features(images, zd, cd, spec=spec, step=step))
    _same(feats, expected)
    assert record.pulls == 0 and record.puts == []


@pytest.mark.parametrize("on_device", [True, False], ids=["dictionary-on-device", "dictionary-on-host"])
@pytest.mark.parametrize("setting", ["default", "accelerator"])
def test_extract_features_sends_each_batch_and_pulls_its_features_once(monkeypatch, setting, on_device):
    """Over host images, as the runner's features stage runs it: 7 images, batches of 4 (the last padded)."""
    spec, step = FEATURES[setting]
    c, zca = _dictionary()
    expected = kmjax.extract_features(_images(7), c, zca, spec, batch_size=4, step=min(step, 4))
    dictionary = jax.device_put((c, zca)) if on_device else (c, zca)
    with _count(monkeypatch) as record:  # no implicit pull either
        feats = kmjax.extract_features(_images(7), *dictionary, spec, batch_size=4, step=min(step, 4))
    np.testing.assert_array_equal(feats, expected)
    # one pull per batch, explicit: its features, into the host array; after the centroids' finiteness flag
    assert record.gets == [CHECK] + ["features.py:store"] * 2 and record.implicit == []
    # sent explicitly: a host dictionary once (centroids, then centroids and whitening), then each batch
    sent = [] if on_device else ["features.py:prepare_features", "features.py:extract_features"]
    assert record.puts == sent + ["features.py:compute"] * 2


@pytest.mark.parametrize("mirrors", [False, True])
@pytest.mark.parametrize("on_device", [True, False], ids=["model-on-device", "model-on-host"])
def test_prediction_sends_each_block_and_pulls_its_scores_once(monkeypatch, mirrors, on_device):
    rng = np.random.default_rng(5)
    f, fm = rng.normal(size=(2, 50, 6)).astype(np.float32)
    std = Standardizer(rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32))
    model = LinearModel(rng.normal(size=(7, 3)).astype(np.float32))
    expected = predict_features(std, model, f, block=16, mirrors=fm if mirrors else None)
    if not mirrors:
        np.testing.assert_array_equal(expected, predict(model, standardize(std, f)))
    std_, model_ = jax.device_put((std, model)) if on_device else (std, model)
    with _count(monkeypatch) as record:  # no implicit pull either
        pred = predict_features(std_, model_, f, block=16, mirrors=fm if mirrors else None)
    np.testing.assert_array_equal(pred, expected)
    views = 2 if mirrors else 1
    assert record.gets == ["classify/linear.py:scores"] * 4 * views  # 50 rows, 4 blocks: its scores per view
    assert record.implicit == []
    # sent explicitly: a host standardizer and model once, then each block's rows
    assert record.puts == ([] if on_device else ["classify/linear.py:predict_features"]) + ["classify/linear.py:scores"] * 4 * views


def test_scoring_is_resident(monkeypatch):
    """The prediction program alone (the one test_lowering.py lowers for accelerators)."""
    rng = np.random.default_rng(6)
    args = jax.device_put((Standardizer(np.zeros(6, np.float32), np.ones(6, np.float32)),
                           LinearModel(rng.normal(size=(7, 3)).astype(np.float32)),
                           rng.normal(size=(16, 6)).astype(np.float32)))
    with _count(monkeypatch) as record:
        jax.block_until_ready(raw_scores(*args))
    assert record.pulls == 0 and record.puts == []
