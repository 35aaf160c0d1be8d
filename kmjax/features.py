"""Dense single-layer features over a whole data set, in fixed-size batches.

Per batch (one jit-compiled function): every patch at ``stride`` -> per-patch normalization ->
whitening -> encoding against the dictionary -> pooling. Only the batch's (B, H', W', F) map
lives in memory at once, and its size is what ``batch_size`` (or ``memory_mb``) bounds.

Augmented copies of a data set (``kmjax.augment``) are just other images: the features of the
mirror images are ``extract_features(mirror(images), ...)``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kmjax._checks import check_images, check_matrix, choice, host_only, integer, positive_int
from kmjax._ops import check_precision, xla_fusions
from kmjax.encoders import ENCODERS, encode, num_outputs
from kmjax.errors import InputError
from kmjax.parallel import replicate, resolve_mesh
from kmjax.patches import grid_size, patch_grid
from kmjax.pooling import POOLS, check_fit, num_regions, pool
from kmjax.preprocess import ZCA, apply_zca, normalize_patches
from kmjax.symmetry import check_flip_closed, check_mirror_symmetric, mirror_pairs, pair_sums

__all__ = ["FeatureSpec", "extract_features", "batch_features", "feature_dim", "check_pooling", "auto_batch_size",
           "prepare_features", "run_batches"]


class FeatureSpec(NamedTuple):
    """How patches become features (everything static: a change recompiles).

    patch_size: window side in pixels. stride: step of the dense grid. eps_norm: per-patch
    normalization eps (None: no normalization). encoder: one of ``ENCODERS``. alpha: the soft
    threshold. grid: pooling regions per side. pool: "sum" or "max".
    pool_size, pool_stride: if pool_size > 0, pool over pool_size x pool_size windows of positions
    every pool_stride positions (0: pool_size) instead of the grid x grid partition (see
    ``kmjax.pool``); 15 / 6 is Recht et al.'s 3 x 3 overlapping windows on a 27 x 27 map (32 x 32
    images), 51 / 20 the same on the 91 x 91 map of 96 x 96 images (``kmjax.pooling.fitting_windows``).
    Any image size: ``check_pooling`` refuses pooling that does not fit, naming a choice that does.
    q: atoms coded per sign by the "nearest_q" encoder (1 <= q < K).
    mirror_sums: for a flip-closed dictionary (``kmjax.close_dictionary``) and mirror-symmetric
    pooling: the F/2 sums (x_a + x_b) / sqrt(2) over the pairs of features that mirroring the
    image swaps, instead of the F features (``kmjax.symmetry``: training on these is training
    on the images and their mirrors, exactly, at half the width and without encoding a mirror).
    """

    patch_size: int = 6
    stride: int = 1
    eps_norm: float | None = 10.0
    encoder: str = "triangle"
    alpha: float = 0.25
    grid: int = 2
    pool: str = "sum"
    # Fields added later go here, with defaults: saved models rebuild FeatureSpec(**dict) from older dicts.
    pool_size: int = 0
    pool_stride: int = 0
    q: int = 0
    mirror_sums: bool = False


def _windows(spec: FeatureSpec) -> tuple:
    """(size, stride) of the pooling windows, or (None, None) for the grid partition."""
    if spec.pool_size == 0:
        return None, None
    return spec.pool_size, spec.pool_stride or spec.pool_size


def _check_patch(spec: FeatureSpec, h: int, w: int) -> None:
    if spec.patch_size > min(h, w):
        raise InputError(f"patch_size {spec.patch_size} is larger than the {h}x{w} images; use a patch_size of at "
                         f"most {min(h, w)}")


def check_pooling(spec: FeatureSpec, image_shape) -> None:
    """``InputError`` naming a setting that fits unless the patches and the pooling regions of
    ``spec`` fit images of ``image_shape`` (H, W[, C]) (any size: the map of positions is
    (H - patch_size) // stride + 1 by (W - patch_size) // stride + 1)."""
    h, w = int(image_shape[0]), int(image_shape[1])
    _check_patch(spec, h, w)
    gh, gw = grid_size(h, w, spec.patch_size, spec.stride)
    size, stride = _windows(spec)
    check_fit(gh, gw, spec.grid, size, stride, names=("grid", "pool_size", "pool_stride"),
              context=f" ({h}x{w} images, patch_size {spec.patch_size}, stride {spec.stride})")


def feature_dim(spec: FeatureSpec, k: int, image_shape=None) -> int:
    """Length of one image's feature vector.

    image_shape: (H, W) or (H, W, C) of the images; needed only with pooling windows
    (``spec.pool_size`` > 0), whose number depends on the size of the map of positions. When
    given, the pooling must fit it (``check_pooling``).
    """
    size, stride = _windows(spec)
    if image_shape is not None:
        check_pooling(spec, image_shape)
    if size is None:
        regions = spec.grid * spec.grid
    elif image_shape is None:
        raise InputError(f"with pooling windows (pool_size = {spec.pool_size}) the number of features depends on "
                         "the image size: pass feature_dim(spec, k, image_shape=(H, W, C))")
    else:
        gh, gw = grid_size(image_shape[0], image_shape[1], spec.patch_size, spec.stride)
        regions = num_regions(gh, gw, spec.grid, size, stride)
    full = regions * num_outputs(spec.encoder, k)
    return full // 2 if spec.mirror_sums else full


def auto_batch_size(spec: FeatureSpec, k: int, image_shape, memory_mb: float = 512.0) -> int:
    """Images whose float32 (B, H', W', F) maps together fit in ``memory_mb``."""
    gh, gw = grid_size(image_shape[0], image_shape[1], spec.patch_size, spec.stride)
    per_image = gh * gw * num_outputs(spec.encoder, k) * 4
    return max(1, int(memory_mb * 2**20 // per_image))


def _default_step(spec, k, image_shape, memory_mb) -> int:
    # On a CPU two images per product: their maps (2 x 729 x 1600 floats at the paper's settings)
    # stay near the cores between the encoder's product and the pooling, and the product is wider
    # than one image's; more images per product, or the whole batch, are slower again
    # (BENCHMARKS.md, "Hot loops on a CPU, second pass": kmjax bench features --batch-wide-step N).
    # An accelerator wants the widest product the memory budget allows.
    if jax.default_backend() == "cpu":
        return 2
    return auto_batch_size(spec, k, image_shape, memory_mb)


_STATIC = ("spec", "step", "precision")


@partial(jax.jit, static_argnames=_STATIC)
def batch_features(images, zca, centroids, *, spec: FeatureSpec, step: int = 1, precision: str = "float32"):
    """(B, H, W, C) images -> (B, feature_dim) float32 features, ``step`` images per encoder product
    (B a multiple of ``step``): the jit-compiled body of ``extract_features``, for use inside
    ``jax.jit`` (no argument checks, the whole batch at once).
    """
    patches = patch_grid(images, spec.patch_size, spec.stride)
    b, gh, gw, d = patches.shape
    x = patches.reshape(-1, d).astype(jnp.float32)
    if spec.eps_norm is not None:
        x = normalize_patches(x, spec.eps_norm)
    if zca is not None:
        x = apply_zca(zca, x)

    def encode_pool(xs):  # (step, gh * gw, D) -> (step, regions * outputs * K)
        codes = encode(xs.reshape(-1, d), centroids, spec.encoder, spec.alpha, precision, q=spec.q)
        return pool(codes.reshape(xs.shape[0], gh, gw, -1), spec.grid, spec.pool, *_windows(spec))

    feats = jax.lax.map(encode_pool, x.reshape(b // step, step, gh * gw, d)).reshape(b, -1)
    if spec.mirror_sums:
        feats = pair_sums(feats, mirror_pairs(spec, centroids.shape[0], images.shape[1:]))
    return feats


def _check_spec(spec: FeatureSpec, images, centroids, zca) -> None:
    choice(spec.encoder, ENCODERS, "encoder")
    choice(spec.pool, POOLS, "pooling")
    _, h, w, c = images.shape
    for name in ("patch_size", "stride", "grid"):
        positive_int(getattr(spec, name), f"FeatureSpec.{name}")
    _check_patch(spec, h, w)
    d = spec.patch_size * spec.patch_size * c
    if centroids.ndim != 2 or centroids.shape[1] != d:
        raise InputError(
            f"centroids must have shape (K, {d}) for {spec.patch_size}x{spec.patch_size}x{c} patches, "
            f"got {centroids.shape}"
        )
    if zca is not None and zca.matrix.shape != (d, d):
        raise InputError(f"the ZCA transform is for dimension {zca.matrix.shape[0]}, patches have {d}")
    for name in ("pool_size", "pool_stride", "q"):
        integer(getattr(spec, name), f"FeatureSpec.{name}", minimum=0)
    if spec.pool_size == 0 and spec.pool_stride:
        raise InputError(f"pool_stride = {spec.pool_stride} needs pooling windows: set pool_size too")
    check_pooling(spec, (h, w))
    if spec.mirror_sums:
        check_mirror_symmetric(spec, images.shape[1:])
        check_flip_closed(centroids, spec.patch_size)
    if "q" in ENCODERS[spec.encoder].params and not 1 <= spec.q < centroids.shape[0]:
        raise InputError(f"the {spec.encoder} encoder codes q atoms per sign, 1 <= q < K = {centroids.shape[0]}; "
                         f"got q = {spec.q} (e.g. q = {max(1, int(0.4 * centroids.shape[0]))}: 0.4 K, Thiry et al.)")


def prepare_features(images, centroids, zca, spec: FeatureSpec, *, precision: str, step, batch_size,
                     memory_mb: float, shards: int = 1):
    """Check the arguments of a feature extraction; return (centroids, step, batch_size).

    ``shards``: the devices a batch is split over (``step`` images per product on each).
    """
    host_only("extract_features", "kmjax.batch_features (one batch, no checks)", images, centroids)
    check_images(images)
    check_precision(precision)
    # host centroids sent explicitly (jnp.asarray would be an implicit transfer); device ones stay put
    centroids = jnp.asarray(centroids if isinstance(centroids, jax.Array) else jax.device_put(
        np.asarray(centroids, np.float32)), jnp.float32)
    check_matrix(centroids, "centroids")
    _check_spec(spec, images, centroids, zca)
    k = centroids.shape[0]
    # Neither size depends on the number of images: one compiled shape for a training set, a test
    # set and a single image alike (the last batch is padded).
    step = positive_int(_default_step(spec, k, images.shape[1:], memory_mb) if step is None else step, "step")
    unit = step * shards
    batch_size = max(step, 128) * shards if batch_size is None else positive_int(batch_size, "batch_size")
    return centroids, step, -(-batch_size // unit) * unit


def extract_features(
    images,
    centroids,
    zca: ZCA | None,
    spec: FeatureSpec = FeatureSpec(),
    *,
    batch_size: int | None = None,
    step: int | None = None,
    memory_mb: float = 512.0,
    precision: str = "float32",
    progress: Callable[[int, int, None], None] | None = None,
    out: np.ndarray | None = None,
    mesh: Mesh | None = None,
    axis_name: str = "data",
) -> np.ndarray:
    """Pooled features of every image.

    Args:
      images: (N, H, W, C) on the scale the dictionary was learned on (0-255 for the paper).
      centroids: (K, D) dictionary, D = patch_size**2 * C, in whitened space.
      zca: the whitening fitted on the training patches, or None for raw patches.
      spec: the ``FeatureSpec``.
      batch_size: images per compiled call (rounded up to a multiple of ``step``; the last batch
        is padded to it, so every data set size compiles one program).
      step: images per encoder matrix product; their (step, H', W', F) map is the largest
        intermediate. Default: 2 on CPU (near the cores), else what ``memory_mb`` allows.
      memory_mb: budget for one step's float32 feature map.
      precision: of the encoder's matrix product: "float32", "tf32" or "bfloat16" (see kmeans).
      progress: called as progress(done, total, None) after each batch (images done).
      out: optional (N, feature_dim) float32 array to write into, e.g. a ``np.memmap`` on disk
        when the features of a data set do not fit in memory.
      mesh: a ``jax.sharding.Mesh`` of this process's devices: each batch is split over them along
        ``axis_name`` (``batch_size`` then defaults to 128 per device, and is rounded up to a multiple
        of devices * ``step``; ``memory_mb`` is per device). The features are those of one device.
        None: one device. See ``kmjax.parallel``.
      axis_name: the mesh axis the images of a batch are split along.

    Returns:
      (N, feature_dim(spec, K, images.shape[1:])) float32 NumPy array (host memory: features of
      a whole data set are the largest array of the pipeline and stay off the accelerator).
    """
    shards = 1
    if mesh is not None:
        mesh = resolve_mesh(mesh, axis_name)
        if not all(dev.process_index == jax.process_index() for dev in mesh.devices.flat):
            raise InputError("extract_features needs a mesh of this process's devices (kmjax.parallel.data_mesh("
                             "local=True)); on several hosts run it in each process on that process's images")
        shards = mesh.shape[axis_name]
    centroids, step, batch_size = prepare_features(images, centroids, zca, spec, precision=precision,
                                                         step=step, batch_size=batch_size, memory_mb=memory_mb,
                                                         shards=shards)
    k = centroids.shape[0]
    options = dict(spec=spec, step=step, precision=precision)
    if mesh is None:
        features = xla_fusions(batch_features, _STATIC, jax.default_backend())
        # the dictionary sent once, explicitly (host arrays would be sent again with every batch)
        centroids, zca = jax.device_put((centroids, zca))

        def compute(batch):
            return features(jax.device_put(batch), zca, centroids, **options)
    else:
        centroids, zca = replicate((centroids, zca), mesh)
        rows = NamedSharding(mesh, P(axis_name))
        features = xla_fusions(_sharded_features, ("mesh", "axis_name") + _STATIC, mesh.devices.flat[0].platform)

        def compute(batch):
            return features(jax.device_put(batch, rows), zca, centroids, mesh=mesh, axis_name=axis_name, **options)

    return run_batches(images, batch_size, feature_dim(spec, k, images.shape[1:]), compute, progress, out)


@partial(jax.jit, static_argnames=("mesh", "axis_name") + _STATIC)
def _sharded_features(images, zca, centroids, *, mesh, axis_name, spec, step, precision):
    f = partial(batch_features, spec=spec, step=step, precision=precision)
    return jax.shard_map(f, mesh=mesh, in_specs=(P(axis_name), P(), P()), out_specs=P(axis_name))(images, zca, centroids)


def run_batches(images, batch_size: int, dim: int, compute, progress=None, out=None) -> np.ndarray:
    """(N, dim) float32 host array from ``compute`` applied to fixed-size batches of images.

    The last batch is padded to ``batch_size`` (one compiled shape for the whole data set), and
    batch i is fetched to the host while batch i + 1 computes (dispatch is asynchronous): per batch,
    ``compute`` sends the images and this pulls the features, each explicitly (tests/test_residency.py).
    ``out``: an (N, dim) float32 array to fill (default: a new one).
    """
    n = images.shape[0]
    if out is None:
        out = np.empty((n, dim), np.float32)
    elif out.shape != (n, dim) or out.dtype != np.float32:
        raise InputError(f"out must be a float32 array of shape {(n, dim)}, got {out.dtype} {out.shape}")

    def store(start, m, feats):
        out[start : start + m] = jax.device_get(feats)[:m]  # the one pull of a batch (explicit)
        if progress is not None:
            progress(start + m, n, None)

    pending = None
    for start in range(0, n, batch_size):
        batch = np.asarray(images[start : start + batch_size])
        m = batch.shape[0]
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m,) + batch.shape[1:], batch.dtype)])
        feats = compute(batch)
        if pending is not None:
            store(*pending)
        pending = (start, m, feats)
    store(*pending)
    return out
