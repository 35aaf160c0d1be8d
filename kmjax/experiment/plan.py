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
from kmjax.datasets import load_dataset
from kmjax.experiment import processes
from kmjax.experiment.store import RunError, data_id
from kmjax.dictionary import patch_key
from kmjax.features import FeatureSpec, check_pooling
from kmjax.patches import extract_patches, sample_positions, windows

__all__ = ["feature_spec", "mirror_sums", "run_mesh", "local_mesh", "training_copies", "training_images",
           "dictionary_patches", "dictionary_options", "classifier_spec", "load_data", "data_ids",
           "data_dir_of", "data_options", "describe_data", "data_line", "data_locations", "dictionary_data",
           "prepare_data"]


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


def data_dir_of(cfg: Config, data_dir):
    """The data dir a config reads: its ``data.dir``, else ``data_dir`` (--data-dir; None: the
    KMJAX_DATA_DIR variable, else the download cache)."""
    return cfg.data.dir or data_dir


def data_options(cfg: Config, split: str) -> dict:
    """The ``load_dataset`` options a config gives for ``split`` (the fold: the training split's only)."""
    d = cfg.data
    options = {"labels": d.labels or None, "fold": d.fold if d.fold >= 0 and split == "train" else None,
               "image_size": tuple(d.image_size) or None}
    return {k: v for k, v in options.items() if v is not None}


def describe_data(cfg: Config, data_dir=None) -> dict:
    """The data set a config reads, as results.json records it."""
    d = cfg.data
    folder = data_dir_of(cfg, data_dir)
    return {"dataset": d.dataset, "dir": None if folder is None else str(folder),
            "options": data_options(cfg, "train"), "dictionary_split": d.dictionary_split or "train"}


def data_line(data) -> str:
    """The data set a run read (``describe_data``, results.json's "data"), in one line."""
    if not data:
        return "cifar10 (a run of an earlier kmjax, before data sets were recorded)"
    where = f" from {data['dir']}" if data.get("dir") else ""
    split = data["dictionary_split"]
    return (data["dataset"] + "".join(f", {k} {v}" for k, v in data["options"].items()) + where
            + ("" if split == "train" else f"; dictionary learned from its {split} split"))


_FILES = {"cifar100": ("cifar-100-python", ["train", "test", "meta"]),
          "stl10": ("stl10_binary", [f"{s}_{x}.bin" for s in ("train", "test") for x in "Xy"]
                    + ["unlabeled_X.bin", "class_names.txt", "fold_indices.txt"]),
          "svhn": ("svhn", [f"{s}_32x32.mat" for s in ("train", "test", "extra")])}


def data_locations(data_dir=None) -> list[str]:
    """Where ``kmjax info`` says each downloadable data set other than CIFAR-10 would be read from,
    and whether its files are there."""
    from kmjax.data import locate_data_dir

    lines = []
    for name, (folder, files) in _FILES.items():
        root, source = locate_data_dir(data_dir, folder)
        missing = [f for f in files if not (root / folder / f).is_file() and not (root / f).is_file()]
        state = ("found" if not missing else f"missing {', '.join(missing)}" if len(missing) < len(files) else
                 "not there: a run downloads it into the cache (checksum verified)" if source == "cache" else
                 "not there: a run stops with an error (put the official files there, see docs/datasets.md)")
        lines.append(f"  {name}: {root / folder}: {state}")
    return lines + ["  folder, npz: your own files, named by data.dir in the config (docs/datasets.md)"]


def _one_process(cfg: Config) -> None:
    if processes.count() > 1 and (cfg.data.dataset != "cifar10" or cfg.data.dictionary_split):
        raise RunError(f"several processes share CIFAR-10 only (each reads every P-th image of its batch files); "
                       f"run data.dataset = {cfg.data.dataset!r}"
                       f"{' with data.dictionary_split' if cfg.data.dictionary_split else ''} in one process")


def _read(cfg: Config, data_dir, split: str, n: int, too_few: str):
    """(the first n images of ``split`` of a data set other than CIFAR-10, all of them held; the split's size)."""
    data = load_dataset(cfg.data.dataset, split, data_dir_of(cfg, data_dir), **data_options(cfg, split))
    if n > len(data.labels):
        raise DataError(too_few.format(len(data.labels)))
    return (data._replace(images=data.images[:n], labels=data.labels[:n]) if n else data), len(data.labels)


def load_data(cfg: Config, data_dir):
    """(train, test or None): the images and labels a config uses, their counts checked. On several
    processes each holds only its share of the images (``processes.owned``: every P-th, from its
    index), read a batch at a time, and the labels of all."""
    return _load(cfg, data_dir)[:2]


def _load(cfg: Config, data_dir):
    """(train, test or None, the size of the whole test split or None)."""
    d = cfg.data
    _one_process(cfg)
    test = size = None
    want_test = cfg.features.enabled and d.n_test != -1
    if d.dataset != "cifar10":
        train, _ = _read(cfg, data_dir, "train", d.n_train,
                         f"data.n_train = {d.n_train} but the training set holds {{}} images; lower n_train")
        if want_test:
            test, size = _read(cfg, data_dir, "test", d.n_test, f"data.n_test = {d.n_test} but the test set holds {{}}"
                               " images")
            if test.class_names != train.class_names:
                raise DataError(f"the test set's classes ({', '.join(test.class_names)}) are not the training set's "
                                f"({', '.join(train.class_names)}): give both splits the same class folders")
        return train, test, size
    data_dir = data_dir_of(cfg, data_dir)
    train, _ = _split(data_dir, "train", d.train_batches, d.n_train,
                   f"data.n_train = {d.n_train} but data.train_batches = {d.train_batches} hold {{}} images; "
                   "lower n_train or list more batches")
    if want_test:
        test, size = _split(data_dir, "test", [None], d.n_test,
                            f"data.n_test = {d.n_test} but the test set holds {{}} images")
    return train, test, size


def dictionary_data(cfg: Config, data_dir, train):
    """The images the dictionary is learned from: ``data.dictionary_split`` of the data set (all of
    it; the training fold's options but the fold), else the training images."""
    split = cfg.data.dictionary_split
    if not split:
        return train
    return load_dataset(cfg.data.dataset, split, data_dir_of(cfg, data_dir), **data_options(cfg, split))


def prepare_data(cfg: Config, data_dir):
    """(train, test or None, dictionary images, {"train", "test", "dictionary": data ids}, the test
    set's size or None): what the runner's load stage reads, refusing early what cannot run on it."""
    if not processes.is_main():  # after the main process, which may download the data set into a shared cache
        processes.wait_for_all("data")
    train, test, size = _load(cfg, data_dir)
    if processes.is_main():
        processes.wait_for_all("data")
    train_id, test_id = data_ids(cfg, data_dir, train, test)
    dictionary = dictionary_data(cfg, data_dir, train)
    ids = {"train": train_id, "test": test_id,
           "dictionary": train_id if dictionary is train else data_id(dictionary.images)}
    if dictionary.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"the dictionary's images (data.dictionary_split = {cfg.data.dictionary_split!r}) are "
                        f"{dictionary.images.shape[1:]}, the training images {train.images.shape[1:]}: they must "
                        "have one size (data.image_size for a folder)")
    try:  # before the dictionary is learned
        if cfg.features.enabled:
            check_pooling(feature_spec(cfg), train.images.shape[1:])
    except ValueError as e:
        raise RunError(f"the pooling does not fit the {train.images.shape[1]} x {train.images.shape[2]} images of "
                       f"data.dataset = {cfg.data.dataset!r}: {e}") from None
    return train, test, dictionary, ids, size


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
                        (part.images[:keep] for part, keep, _ in _batches(data_dir_of(cfg, data_dir), split,
                                                                           batches, n))), data.labels)
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


def _split(data_dir, split: str, batches, n: int, too_few: str) -> tuple[Cifar10, int]:
    """(this process's images of the first ``n`` images of ``batches`` of ``split`` and every label,
    the number of images the batches read hold)."""
    images, labels, held = [], [], 0
    for part, keep, first in _batches(data_dir, split, batches, n):
        images.append(part.images[processes.owned(keep, (processes.index() - first) % processes.count())])
        labels.append(part.labels[:keep])
        names, held = part.class_names, held + len(part.labels)
    labels = np.concatenate(labels)
    if n > len(labels):
        raise DataError(too_few.format(len(labels)))
    return Cifar10(np.concatenate(images), labels, names), held


def local_mesh(cfg: Config):
    """This process's devices for its share of the features (several processes), or None for one."""
    each = _devices_each(cfg)
    return None if each == 1 else _mesh(jax.local_devices()[:each])


def _mesh(devices):
    from jax.sharding import AxisType, Mesh

    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
