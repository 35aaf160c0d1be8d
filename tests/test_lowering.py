"""Every program that runs on an accelerator, lowered for CUDA, ROCm and TPU from this CPU with
``jax.export`` (which raises when a program does not lower for a platform): k-means with each
kernel and centroid update, ``learn_dictionary``, ``batch_features`` (64 images per product, as
accelerators run it: triangle, soft threshold, 3x3 windows with mirror sums), the ridge classifier's device products and its device path (statistics, kernel, factorization,
solves, scores, primal weights), prediction.
Sizes are those an accelerator run uses (k-means chunks of the accelerator default, a batch of
64 images per product). The fused Pallas kernel is interpreted only where a program is lowered
for a CPU, so exporting it for a GPU compiles it (with Triton): a lowering failure shows here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

import kmjax
from kmjax import cluster
from kmjax.nearest import check_kernel
from kmjax.classify import device, tiled
from kmjax.classify.linear import raw_scores

PLATFORMS = ("cuda", "rocm", "tpu")
KEY = jax.random.key(0)
K, D, N = 1600, 108, 65_536
X = jax.ShapeDtypeStruct((N, D), jnp.float32)
IMAGES = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32)
ATOMS = jax.ShapeDtypeStruct((K, D), jnp.float32)
ROWS = jax.ShapeDtypeStruct((4096, 2048), jnp.float32)
GPU_CHUNK = cluster._CHUNK_ELEMENTS["accelerator"] // K  # the accelerator default, not this CPU's


def _kmeans(kernel, update, spherical):
    return lambda x: kmjax.kmeans(KEY, x, K, init="randn", max_iter=2, chunk_size=GPU_CHUNK, kernel=kernel,
                                  update=update, spherical=spherical).centroids


PROGRAMS = {
    **{f"kmeans-{kern}-{upd}-{'spherical' if sph else 'lloyd'}": (_kmeans(kern, upd, sph), (X,))
       for kern in ("xla", "pallas") for upd in ("scatter", "matmul") for sph in (False, True)},
    "learn_dictionary": (lambda im: kmjax.learn_dictionary(KEY, im, K, n_patches=20_000, max_iter=2,
                                                           chunk_size=GPU_CHUNK).centroids, (IMAGES,)),
    "learn_dictionary-flip_closed": (lambda im: kmjax.learn_dictionary(
        KEY, im, K, n_patches=20_000, max_iter=2, spherical=True, flip_closed=True, chunk_size=GPU_CHUNK).centroids,
        (IMAGES,)),
    "batch_features-triangle": (lambda im, c: kmjax.batch_features(im, None, c, spec=kmjax.FeatureSpec(), step=64),
                                (IMAGES, ATOMS)),
    "batch_features-soft-3x3-mirror_sums": (lambda im, c: kmjax.batch_features(im, None, c, spec=kmjax.FeatureSpec(
        encoder="soft_threshold", pool_size=15, pool_stride=6, mirror_sums=True), step=64), (IMAGES, ATOMS)),
    "batch_features-soft": (lambda im, c: kmjax.batch_features(im, None, c, spec=kmjax.FeatureSpec(
        encoder="soft_threshold"), step=64), (IMAGES, ATOMS)),
    "ridge-gram-tile": (tiled._tn, (ROWS, ROWS)),
    "ridge-factor-update": (tiled._nt, (ROWS, ROWS)),
    "ridge-cg-pass": (tiled._normal, (ROWS, jax.ShapeDtypeStruct((2048, 10), jnp.float32))),
    "predict": (lambda f: raw_scores(kmjax.Standardizer(jnp.zeros(D), jnp.ones(D)),
                                      kmjax.LinearModel(jnp.zeros((D + 1, 10))), f), (X,)),
}
# the classifier's device path (kmjax.classify.device): 4096 rows of 8192 features (several column
# blocks and row blocks, a tail of each), 10 classes
S = jax.ShapeDtypeStruct
FEATURES, LABELS = S((4096, 9000), jnp.float32), S((4096,), jnp.int32)
FIT, HELD, C = S((3600,), jnp.int32), S((496,), jnp.int32), S((), jnp.float32)
GRAM_FEATURES = S((4096, 2100), jnp.float32)


def _dual(x, labels, C, fit, held):
    kern = device.kernel_on_device(x)
    solution = device.fit_dual_on_device(kern, labels, C, fit, num_classes=10)
    std, model = device.primal_on_device(kern, solution, x)
    return device.correct_on_device(device.dual_scores_on_device(kern, solution, held), labels[held]), model.weights


def _gram(x, labels, C, fit, held):
    std, model = device.fit_ridge_on_device(device.gram_on_device(x, labels, fit, num_classes=10), C)
    return device.correct_on_device(device.linear_scores_on_device(std, model, x, held), labels[held]), model.weights


def _streamed(x_rows, labels, keep, x_cols):
    """The block programs of the streamed passes (host features, a block put on the device at a time)."""
    stats = device._gram_block(device._empty_gram(x_rows, num_classes=10), x_rows, labels, keep, num_classes=10)
    kernel, mu, sd = device._kernel_block(device._empty_kernel((4096, 4096)), x_cols, 0.01)
    kern = device._finish_kernel([mu], [sd], kernel, f=4000)
    fit = device.DeviceDualFit(jnp.arange(4096), jnp.zeros((4096, 10)), jnp.zeros(10), jnp.zeros(4096), jnp.zeros(()))
    w, share = device._primal_block(x_cols, mu, sd, device._fitted_weights(fit, n_all=4096), jnp.zeros(10))
    return stats, device._finish_primal(kern, fit, [w], [share], f=4000), device._split(kern.mean, block=4096, fill=0.0)


PROGRAMS["ridge-device-streamed-blocks"] = (_streamed, (S((4096, 2100), jnp.float32), LABELS, S((4096,), jnp.float32),
                                                       S((4096, 4096), jnp.float32)))
PROGRAMS["ridge-device-dual"] = (_dual, (FEATURES, LABELS, C, FIT, HELD))
PROGRAMS["ridge-device-gram"] = (_gram, (GRAM_FEATURES, LABELS, C, FIT, HELD))
# Triton kernels are custom calls without a serialization guarantee: allowed here, since only
# lowering is checked (the exported artifact is not kept)
TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_lowers_for_accelerators(name, platform):
    fn, args = PROGRAMS[name]
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=[TRITON])(*args)
    assert exported.platforms == (platform,)
    text = exported.mlir_module()
    if "pallas" in name and platform in ("cuda", "rocm"):
        assert "triton" in text  # the compiled kernel, not the interpreted one
    if "pallas" in name and platform == "tpu":
        assert "triton" not in text


def test_the_cpu_lowering_interprets_the_kernel():
    fn, args = PROGRAMS["kmeans-pallas-matmul-lloyd"]
    text = export.export(jax.jit(fn), platforms=["cpu"])(*args).mlir_module()
    assert "triton" not in text and "custom_call" not in text.replace("stablehlo.custom_call @Sharding", "")


def test_the_fused_kernel_is_refused_on_a_tpu(monkeypatch):
    check_kernel("pallas")  # fine on this CPU (interpreted)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="on a TPU use kernel='xla'"):
        check_kernel("pallas")
    check_kernel("xla")
