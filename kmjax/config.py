"""Experiment configuration: a TOML file with one table per stage, validated against a schema.

Every key has a default (the authors' settings, docs/design.md), so a config only states what
it changes. An unknown or misspelled key, or a value of the wrong type, is an error that names
the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmjax._checks import choice, integer, number
from kmjax._ops import PRECISIONS
from kmjax.classify import CLASSIFIERS, SOLVERS, STORAGES, ClassifierSpec
from kmjax.cluster import EMPTY_POLICIES, INITS
from kmjax.dictionary import AUTHORS, NORMALIZATIONS, SAMPLINGS
from kmjax.encoders import ENCODERS
from kmjax.features import FeatureSpec
from kmjax.errors import ConfigError
from kmjax.pooling import POOLS

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "apply_overrides", "to_dict", "parse_value",
           "check_name", "resolve_config", "shipped_configs", "word_or_none"]


_SPEC = FeatureSpec._field_defaults  # the features' defaults, defined once with FeatureSpec
_FIT = ClassifierSpec._field_defaults  # the classifier's, defined once with ClassifierSpec


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"  # a name of kmjax.load_dataset: cifar10, cifar100, stl10, svhn, folder, npz
    dir: str = ""  # its data dir, a folder or (npz) the file ("": --data-dir, else KMJAX_DATA_DIR, else the cache)
    labels: str = ""  # cifar100: "fine" (the reader's default) or "coarse"
    fold: int = -1  # stl10: train on predefined training fold 0..9 (-1: all 5,000 training images)
    image_size: list = field(default_factory=list)  # folder: [H, W], every image resized to it (bicubic)
    dictionary_split: str = ""  # learn the dictionary from this split ("unlabeled": STL-10's); "": the training images
    train_batches: list = field(default_factory=lambda: [1, 2, 3, 4, 5])  # cifar10: data_batch_N to train on
    n_train: int = 0  # use only the first n_train training images (0: all)
    n_test: int = 0  # evaluate on the first n_test test images (0: all; -1: no test set)


@dataclass(frozen=True)
class PatchesConfig:
    size: int = AUTHORS["patch_size"]  # receptive field w, in pixels
    sampling: str = AUTHORS["sampling"]  # "random": num windows cycling through the images; "grid": every window at stride
    num: int = AUTHORS["n_patches"]  # random patches
    stride: int = 1  # for sampling = "grid"


@dataclass(frozen=True)
class PreprocessConfig:
    normalize: str = AUTHORS["normalize"]  # "patch": per-patch mean/contrast; "dimension": the blog's std + ptp/20; "none"
    eps_norm: float = AUTHORS["eps_norm"]  # per-patch normalization eps (0-255 pixels)
    whiten: bool = AUTHORS["whiten"]
    eps_zca: float = AUTHORS["eps_zca"]


@dataclass(frozen=True)
class KMeansConfig:
    k: int = AUTHORS["k"]
    init: str = AUTHORS["init"]  # "randn" (authors'), "k-means++", "random"
    max_iter: int = AUTHORS["max_iter"]  # 0: no iterations, the init is the dictionary (init="random": random patches)
    tol: float | str = "none"  # relative objective decrease to stop at; "none" (authors'): always run max_iter
    empty: str = AUTHORS["empty"]  # "zero" (authors') or "reseed"
    spherical: bool = False  # OMP-1 / gain-shape dictionary
    chunk_size: int | str = "auto"  # points per distance product; "auto": as suits the backend
    precision: str = "float32"  # distance products: "float32", "tf32" (GPU default), "bfloat16"
    flip_closed: bool = False  # learn k/2 atoms, add their mirror images (with features.train_flip: mirrors for free)


@dataclass(frozen=True)
class FeaturesConfig:
    enabled: bool = True  # false: stop after the dictionary (the blog post's filters-only run)
    train_flip: bool = False  # add horizontally flipped copies (with kmeans.flip_closed: exactly, never encoded)
    test_flip: bool = False  # classify each test image by its and its mirror's summed scores
    train_crops: int = 0  # add this many copies of the training images, each randomly cropped (zero pad 4)
    encoder: str = _SPEC["encoder"]  # "triangle", "hard", "soft_threshold"
    alpha: float = _SPEC["alpha"]  # soft threshold
    stride: int = _SPEC["stride"]
    grid: int = _SPEC["grid"]  # pooling regions per side
    pool: str = _SPEC["pool"]  # "sum" or "max"
    pool_size: int = 0  # > 0: pool over windows of this many positions (15 with stride 6: a 3x3 overlapping grid)
    pool_stride: int = 0  # the windows' step (0: pool_size)
    q: int = 0  # encoder "nearest_q": atoms coded per sign
    memory_mb: float = 512.0  # budget for one batch's dense feature map
    keep: bool = True  # false: delete the (multi-GB) feature files once the run has finished
    precision: str = "float32"  # encoder products: "float32", "tf32" (GPU default), "bfloat16"


@dataclass(frozen=True)
class ClassifierConfig:
    loss: str = _FIT["loss"]  # "svm" (one-vs-all L2-SVM), "logistic", or "ridge" (least squares from the Gram matrix)
    C: float = _FIT["C"]
    C_grid: list = field(default_factory=lambda: list(_FIT["C_grid"]))  # if given, choose C on a held-out part
    val_fraction: float = _FIT["val_fraction"]  # held-out share used to choose C
    max_iter: int = _FIT["max_iter"]
    tol: float = _FIT["tol"]  # gradient-norm stop
    solver: str = _FIT["solver"]  # ridge: "gram" (F x F Gram matrix), "dual" (N x N kernel), "auto" (the smaller), "cg"
    rank: int = _FIT["rank"]  # ridge with solver "cg": the rank of its Nystrom preconditioner
    storage: str = _FIT["storage"]  # svm / logistic: the dtype L-BFGS holds the features in ("bfloat16": half the bytes);
    #                           ridge (float64 sums of the features as they are) ignores it


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    seed: int = 0
    devices: int = 1  # k-means and features data-parallel on this many local devices (0: all; a CPU is split, <= 8)
    data: DataConfig = field(default_factory=DataConfig)
    patches: PatchesConfig = field(default_factory=PatchesConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


def _choices() -> dict:
    """The valid values of the keys that name a method. The vocabularies are defined once, beside
    the functions that implement them; the schema reads them at validation time."""
    return {
        ("patches", "sampling"): SAMPLINGS,
        ("preprocess", "normalize"): NORMALIZATIONS,
        ("kmeans", "init"): INITS,
        ("kmeans", "empty"): EMPTY_POLICIES,
        ("features", "encoder"): tuple(ENCODERS),
        ("features", "pool"): tuple(POOLS),
        ("kmeans", "precision"): PRECISIONS,
        ("features", "precision"): PRECISIONS,
        ("classifier", "loss"): CLASSIFIERS,
        ("classifier", "solver"): SOLVERS,
        ("classifier", "storage"): STORAGES,
    }


_POSITIVE = {("patches", "size"), ("patches", "num"), ("patches", "stride"), ("kmeans", "k"),
             ("features", "stride"), ("features", "grid"),
             ("features", "memory_mb"), ("classifier", "C"), ("classifier", "max_iter"), ("classifier", "rank")}


# Keys whose value is a number or a word, where the library takes None ("none": no tolerance;
# "auto": the library chooses), which TOML cannot say: {key: (word, the numbers it takes, the number
# that meant the word before there was one, still read as the word)}
_WORDS = {
    "kmeans.tol": ("none", "a number >= 0", lambda v: v < 0),
    "kmeans.chunk_size": ("auto", "an integer >= 1", lambda v: v == 0),
}


def _word_or_number(where: str, value):
    word, numbers, old = _WORDS[where]
    integral = numbers.startswith("an integer")
    if value == word:
        return word
    if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
        raise ConfigError(f"{where} must be {numbers} or {word!r}, got {value!r}")
    if old(value):
        return word
    if not value >= (1 if integral else 0):
        raise ConfigError(f"{where} must be {numbers} or {word!r}, got {value!r}")
    return value if integral else float(value)


def word_or_none(value):
    """A key of ``_WORDS`` as the library takes it: its word ("none", "auto") is None."""
    return None if isinstance(value, str) else value


def _check_type(where: str, value, default):
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool or isinstance(value, bool):
        if type(value) is not expected:
            raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
        return value
    if not isinstance(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    out = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {where!r}; valid keys here: {', '.join(fields)}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table [{key}], got {value!r}")
            out[key] = _build(type(default), value, f"{where}.")
        elif where in _WORDS:
            out[key] = _word_or_number(where, value)
        else:
            out[key] = _check_type(where, value, default)
    return cls(**out)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")


def check_name(name: str) -> str:
    """A run name is one folder name: letters, digits and ``._=,+-``, no separators, no ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or len(name) > 200:
        raise ConfigError(f"name = {name!r} is not a plain folder name: use letters, digits and . _ = , + - "
                          "(no '/', no '..', not starting with '.')")
    return name


def _validate(cfg: Config) -> None:
    check_name(cfg.name)
    try:  # the library's own vocabulary, each message prefixed by the key it is about
        for (section, key), choices in _choices().items():
            where = f"{section}.{key}"
            choice(getattr(getattr(cfg, section), key), choices, where)
        for section, key in _POSITIVE:
            where = f"{section}.{key}"
            number(getattr(getattr(cfg, section), key), where, above=0)
        for b in cfg.data.train_batches:
            where = f"data.train_batches (batch numbers from 1 to 5: {cfg.data.train_batches!r})"
            integer(b, where, minimum=1, maximum=5)
        for c in cfg.classifier.C_grid:
            where = f"classifier.C_grid (a list of numbers > 0: {cfg.classifier.C_grid!r})"
            number(c, where, above=0)
        where = "classifier.val_fraction"
        number(cfg.classifier.val_fraction, where, above=0, below=1)
        for key in ("pool_size", "pool_stride", "q", "train_crops"):
            where = f"features.{key}"
            integer(getattr(cfg.features, key), where, minimum=0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_data(cfg.data)
    if not cfg.data.train_batches:
        raise ConfigError("data.train_batches must be a non-empty list of batch numbers 1..5, got []")
    if cfg.kmeans.flip_closed and cfg.kmeans.k % 2:
        raise ConfigError(f"kmeans.flip_closed = true needs an even kmeans.k (k/2 atoms and their mirrors), "
                          f"got {cfg.kmeans.k}")
    if cfg.kmeans.flip_closed and cfg.features.train_flip and cfg.features.train_crops:
        raise ConfigError("kmeans.flip_closed with features.train_flip trains on the mirrors without encoding them, "
                          "which covers the images and their mirrors only: set features.train_crops = 0, or "
                          "train_flip = false to add crops with explicit features")
    if cfg.devices < 0:
        raise ConfigError(f"devices must be >= 0 (0: every local device), got {cfg.devices}")
    if cfg.kmeans.max_iter < 0:
        raise ConfigError(f"kmeans.max_iter must be >= 0 (0: the initial centroids are the dictionary), "
                          f"got {cfg.kmeans.max_iter}")
    if cfg.data.n_train < 0 or cfg.data.n_test < -1:
        raise ConfigError("data.n_train must be >= 0 and data.n_test >= -1")
    if cfg.preprocess.eps_norm < 0 or cfg.preprocess.eps_zca < 0:
        raise ConfigError("preprocess.eps_norm and preprocess.eps_zca must be >= 0")


_DATA_OPTIONS = {"labels": ("cifar100", ""), "fold": ("stl10", -1), "image_size": ("folder", [])}


def _validate_data(d: DataConfig) -> None:
    from kmjax.datasets import NAMES

    if d.dataset not in NAMES:
        raise ConfigError(f"data.dataset = {d.dataset!r} is not a data set kmjax reads; valid: {', '.join(NAMES)}")
    for key, (dataset, unset) in _DATA_OPTIONS.items():
        if getattr(d, key) != unset and d.dataset != dataset:
            raise ConfigError(f"data.{key} is an option of the {dataset} data set, not of data.dataset = "
                              f"{d.dataset!r}; remove it")
    if d.labels not in ("", "fine", "coarse"):
        raise ConfigError(f"data.labels must be 'fine' or 'coarse' (CIFAR-100's 100 classes or 20 superclasses), "
                          f"got {d.labels!r}")
    if not -1 <= d.fold <= 9:
        raise ConfigError(f"data.fold must be one of STL-10's training folds 0..9 (or -1: all), got {d.fold}")
    if d.image_size and (len(d.image_size) != 2 or not all(isinstance(v, int) and v > 0 for v in d.image_size)):
        raise ConfigError(f"data.image_size must be [height, width] in pixels, got {d.image_size!r}")
    if d.dataset != "cifar10" and d.train_batches != DataConfig().train_batches:
        raise ConfigError(f"data.train_batches picks CIFAR-10's batch files; data.dataset = {d.dataset!r} has none: "
                          "remove it (data.n_train keeps the first images)")
    if d.dictionary_split == "test" or "/" in d.dictionary_split or ".." in d.dictionary_split:
        raise ConfigError(f"data.dictionary_split names a split other than the test set to learn the dictionary "
                          f"from (e.g. 'unlabeled' with stl10, 'extra' with svhn), got {d.dictionary_split!r}; "
                          "leave it unset to learn it from the training images")


def parse_config(values: dict) -> Config:
    """A validated ``Config`` from a dict shaped like the TOML file."""
    cfg = _build(Config, values, "")
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The full resolved config, every default filled in (round-trips through ``parse_config``)."""
    return dataclasses.asdict(cfg)


def parse_value(text: str):
    """A value in TOML syntax (``100``, ``[1, 2]``, ``true``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: --set features.encoder=hard


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values in TOML syntax) to a config dict."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, text = item.split("=", 1)
        *tables, key = path.strip().split(".")
        node = values
        for t in tables:
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {t!r} is not a table")
        node[key] = parse_value(text.strip())
    return values


def shipped_configs() -> dict[str, Path]:
    """{name: file} of the configs that come with kmjax (the package's ``kmjax.configs`` when
    installed, the clone's ``configs/`` in a source checkout)."""
    try:
        folder = importlib.resources.files("kmjax.configs")
    except ModuleNotFoundError:  # an editable install of a clone: the folder beside the package
        folder = Path(__file__).resolve().parents[1] / "configs"
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".toml")}


def resolve_config(path_or_name) -> Path:
    """A config file: the path if it exists, else the shipped config of that name (``quick``,
    ``coates2011_triangle_1600``, or a missing ``configs/quick.toml`` outside a clone)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.stem in shipped and path.suffix in ("", ".toml"):
        return shipped[path.stem]
    raise ConfigError(f"config file {path} does not exist, and kmjax ships no config of that name "
                      f"(shipped: {', '.join(sorted(shipped))})")


def load_config(path, overrides: list[str] = ()) -> Config:
    """Read, override and validate a TOML config: a file, or the name of a shipped config."""
    path = resolve_config(path)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    values.setdefault("name", path.stem)
    return parse_config(apply_overrides(values, list(overrides)))
