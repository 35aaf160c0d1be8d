"""What a config asks of the library: its feature spec, dictionary options, devices, data and
training copies, read from a ``Config`` (used by the runner and by ``export_features``)."""

from __future__ import annotations

import jax
import numpy as np

from kmjax.augment import mirror, random_crops
from kmjax.config import Config
from kmjax.data import DataError, load_cifar10
from kmjax.experiment import processes
from kmjax.experiment.store import RunError
from kmjax.features import FeatureSpec

__all__ = ["feature_spec", "mirror_sums", "run_mesh", "local_mesh", "training_copies", "training_images", "dictionary_options",
           "load_data"]


def feature_spec(cfg: Config) -> FeatureSpec:
    return FeatureSpec(
        patch_size=cfg.patches.size,
        stride=cfg.features.stride,
        eps_norm=cfg.preprocess.eps_norm if cfg.preprocess.normalize == "patch" else None,
        encoder=cfg.features.encoder,
        alpha=cfg.features.alpha,
        grid=cfg.features.grid,
        pool=cfg.features.pool,
        pool_size=cfg.features.pool_size,
        pool_stride=cfg.features.pool_stride,
        q=cfg.features.q,
        mirror_sums=mirror_sums(cfg),
    )


def mirror_sums(cfg: Config) -> bool:
    """Whether mirrored training rows come free (``kmjax.symmetry``): a flip-closed dictionary and
    train_flip; the features are then the pair sums of the originals', and no mirror is encoded."""
    return cfg.kmeans.flip_closed and cfg.features.train_flip


def _devices_each(cfg: Config) -> int:
    """The devices a config asks of each process (``devices``; 0: all of them), checked."""
    available = len(jax.local_devices())
    if cfg.devices > available:
        raise RunError(f"devices = {cfg.devices} but this process sees {available} "
                       f"({jax.local_devices()[0].platform}); on a CPU, start with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={cfg.devices} (kmjax run --devices does)")
    return cfg.devices or available


def run_mesh(cfg: Config):
    """The 1-D mesh of the local devices a config asks for, or None for one device; on several
    processes, the mesh of the first ``devices`` devices of every process."""
    each = _devices_each(cfg)
    if processes.count() == 1:
        return None if each == 1 else _mesh(jax.local_devices()[:each])
    return _mesh([d for p in range(processes.count())
                  for d in sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[:each]])


def training_copies(cfg: Config) -> int:
    """Training rows per image: the image, its mirror with ``train_flip`` (rows i and i + N), then
    ``train_crops`` random crops (rows i + 2N, ...)."""
    if mirror_sums(cfg):
        return 1  # the mirrors are in the features of the originals (pair sums)
    return 1 + cfg.features.train_flip + cfg.features.train_crops


def training_images(cfg: Config, images):
    """The training images and their augmented copies, in the order of ``_copies``."""
    copies = [images] + ([mirror(images)] if cfg.features.train_flip else [])
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)  # a stream of its own: the other draws stay as they were
    copies += [random_crops(k, images) for k in jax.random.split(key, cfg.features.train_crops)]
    return np.concatenate(copies) if len(copies) > 1 else images


def dictionary_options(cfg: Config) -> dict:
    """The keyword arguments of ``learn_dictionary`` a config asks for."""
    p, pre, km = cfg.patches, cfg.preprocess, cfg.kmeans
    return dict(k=km.k, patch_size=p.size, n_patches=p.num, sampling=p.sampling, stride=p.stride,
                normalize=pre.normalize, eps_norm=pre.eps_norm, whiten=pre.whiten, eps_zca=pre.eps_zca,
                init=km.init, max_iter=km.max_iter, tol=None if km.tol < 0 else km.tol, empty=km.empty,
                spherical=km.spherical, chunk_size=km.chunk_size or None, precision=km.precision,
                flip_closed=km.flip_closed)


def load_data(cfg: Config, data_dir):
    """(train, test or None): the images and labels a config uses, their counts checked."""
    d = cfg.data
    train = load_cifar10(data_dir, "train", batches=d.train_batches)
    if d.n_train > len(train.labels):
        raise DataError(f"data.n_train = {d.n_train} but data.train_batches = {d.train_batches} hold "
                        f"{len(train.labels)} images; lower n_train or list more batches")
    if d.n_train:
        train = train._replace(images=train.images[: d.n_train], labels=train.labels[: d.n_train])
    test = None
    if cfg.features.enabled and d.n_test != -1:
        test = load_cifar10(data_dir, "test")
        if d.n_test > len(test.labels):
            raise DataError(f"data.n_test = {d.n_test} but the test set holds {len(test.labels)} images")
        if d.n_test:
            test = test._replace(images=test.images[: d.n_test], labels=test.labels[: d.n_test])
    return train, test


def local_mesh(cfg: Config):
    """This process's devices for its share of the features (several processes), or None for one."""
    each = _devices_each(cfg)
    return None if each == 1 else _mesh(jax.local_devices()[:each])


def _mesh(devices):
    from jax.sharding import AxisType, Mesh

    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
