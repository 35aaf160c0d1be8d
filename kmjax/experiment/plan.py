"""What a config asks of the library: its feature spec, dictionary options, classifier spec,
devices, data and training copies, read from a ``Config`` (used by the runner and by
``export_features``)."""

from __future__ import annotations

import jax
import numpy as np

from kmjax.augment import mirror, random_crops
from kmjax.classify import ClassifierSpec
from kmjax.config import Config, word_or_none
from kmjax.data import Cifar10, DataError, load_cifar10
from kmjax.experiment import processes
from kmjax.experiment.store import RunError, data_id
from kmjax.dictionary import patch_key
from kmjax.features import FeatureSpec
from kmjax.patches import extract_patches, sample_positions, windows

__all__ = ["feature_spec", "mirror_sums", "run_mesh", "local_mesh", "training_copies", "training_images",
           "dictionary_patches", "dictionary_options", "classifier_spec", "load_data", "data_ids"]


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


def training_images(cfg: Config, images, among=None):
    """The training images and their augmented copies, in the order of ``training_copies``;
    ``among``: (index, n), the images are rows ``index`` of the n training images (this process's
    share of them), and get the crops those rows get."""
    copies = [images] + ([mirror(images)] if cfg.features.train_flip else [])
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)  # a stream of its own: the other draws stay as they were
    copies += [random_crops(k, images, among=among) for k in jax.random.split(key, cfg.features.train_crops)]
    return np.concatenate(copies) if len(copies) > 1 else images


def dictionary_patches(cfg: Config, key, train):
    """On several processes, the raw patch sample ``learn_dictionary(key, ...)`` draws from all the
    training images, cut from each process's own (``train.images``) and assembled in every process;
    None on one process (``learn_dictionary`` draws it)."""
    if processes.count() == 1:
        return None
    p, n, me = cfg.patches, len(train.labels), processes.index()
    _, h, w, c = train.images.shape
    if p.sampling == "random":
        which, rows, cols = map(np.asarray, sample_positions(patch_key(key), p.num, n, h, w, p.size))
        owners = processes.owner(which)
        mine = owners == me
        local = (np.asarray(windows(train.images, which[mine] // processes.count(), rows[mine], cols[mine], p.size))
                 if mine.any() else np.zeros((0, p.size * p.size * c), train.images.dtype))
    else:  # every window at the stride, image by image
        grid = np.asarray(extract_patches(train.images, p.size, p.stride))
        owners = np.repeat(processes.owner(np.arange(n)), grid.shape[1] * grid.shape[2])
        local = grid.reshape(-1, grid.shape[-1])
    return processes.gather_rows(local, owners, everywhere=True)


def dictionary_options(cfg: Config) -> dict:
    """The keyword arguments of ``learn_dictionary`` a config asks for."""
    p, pre, km = cfg.patches, cfg.preprocess, cfg.kmeans
    return dict(k=km.k, patch_size=p.size, n_patches=p.num, sampling=p.sampling, stride=p.stride,
                normalize=pre.normalize, eps_norm=pre.eps_norm, whiten=pre.whiten, eps_zca=pre.eps_zca,
                init=km.init, max_iter=km.max_iter, tol=word_or_none(km.tol), empty=km.empty,
                spherical=km.spherical, chunk_size=word_or_none(km.chunk_size), precision=km.precision,
                flip_closed=km.flip_closed)


def classifier_spec(cfg: Config) -> ClassifierSpec:
    """The ``ClassifierSpec`` a config asks for (``fit_classifier(**spec._asdict())``): its classifier
    section, with ridge's storage float32 (it sums the features as they are: a sweep over the loss
    may leave a bfloat16 storage in place) and mirror scoring where the mirrored training rows
    and mirrored test images both are."""
    c = cfg.classifier
    return ClassifierSpec(loss=c.loss, C=c.C, C_grid=tuple(c.C_grid), val_fraction=c.val_fraction, max_iter=c.max_iter,
                          tol=c.tol, solver=c.solver, rank=c.rank, storage="float32" if c.loss == "ridge" else c.storage,
                          mirror_scoring=training_copies(cfg) > 1 and cfg.features.train_flip and cfg.features.test_flip)


def load_data(cfg: Config, data_dir):
    """(train, test or None): the images and labels a config uses, their counts checked. On several
    processes each holds only its share of the images (``processes.owned``: every P-th, from its
    index), read a batch at a time, and the labels of all."""
    d = cfg.data
    train = _split(data_dir, "train", d.train_batches, d.n_train,
                   f"data.n_train = {d.n_train} but data.train_batches = {d.train_batches} hold {{}} images; "
                   "lower n_train or list more batches")
    test = None
    if cfg.features.enabled and d.n_test != -1:
        test = _split(data_dir, "test", [None], d.n_test, f"data.n_test = {d.n_test} but the test set holds {{}} images")
    return train, test


def data_ids(cfg: Config, data_dir, train, test) -> tuple[str, str | None]:
    """The ``data_id`` of the whole training and test sets, as one process computes them. On
    several processes, where each holds only its share, the main process reads the batches again
    for them and tells the others."""
    if processes.count() == 1:
        return data_id(train.images, train.labels), None if test is None else data_id(test.images, test.labels)
    ids = None
    if processes.is_main():
        d = cfg.data
        ids = [data_id((np.uint8, (len(data.labels),) + data.images.shape[1:],
                        (part.images[:keep] for part, keep, _ in _batches(data_dir, split, batches, n))), data.labels)
               for data, split, batches, n in ((train, "train", d.train_batches, d.n_train), (test, "test", [None], d.n_test))
               if data is not None]
    ids = processes.agree(ids)
    return ids[0], ids[1] if test is not None else None


def _batches(data_dir, split: str, batches, n: int):
    """(batch, its first images kept, their first index): the first ``n`` images (0: all) of
    ``batches`` of ``split``, a batch at a time."""
    first = 0
    for b in batches:
        part = load_cifar10(data_dir, split, batches=None if b is None else [b])
        keep = len(part.labels) if not n else min(len(part.labels), n - first)
        yield part, keep, first
        first += keep
        if n and first >= n:
            return


def _split(data_dir, split: str, batches, n: int, too_few: str) -> Cifar10:
    """This process's images of the first ``n`` images of ``batches`` of ``split``, and every label."""
    images, labels = [], []
    for part, keep, first in _batches(data_dir, split, batches, n):
        images.append(part.images[processes.owned(keep, (processes.index() - first) % processes.count())])
        labels.append(part.labels[:keep])
        names = part.class_names
    labels = np.concatenate(labels)
    if n > len(labels):
        raise DataError(too_few.format(len(labels)))
    return Cifar10(np.concatenate(images), labels, names)


def local_mesh(cfg: Config):
    """This process's devices for its share of the features (several processes), or None for one."""
    each = _devices_each(cfg)
    return None if each == 1 else _mesh(jax.local_devices()[:each])


def _mesh(devices):
    from jax.sharding import AxisType, Mesh

    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
