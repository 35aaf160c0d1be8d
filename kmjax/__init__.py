"""kmjax: Coates-Lee-Ng single-layer k-means features on CIFAR-10, as pure JAX functions.

Data flows through the modules in this order: data (CIFAR-10, read through safe_pickle) ->
(augment) -> patches -> preprocess -> nearest -> lloyd -> cluster -> encoders -> pooling ->
symmetry -> dictionary -> features -> classify -> model; parallel places rows on a mesh of devices
for cluster and features. The array functions return pytrees and write no files. The shell around
them does: data downloads the data set; model and the experiment package (the runner, its plan,
stage store, processes, sweep, export and report, one module per concern) save pytrees through
checkpoint, against the file templates of templates; config reads the TOML configs, plots draws
the figures, cli is the command line. sklearn wraps the functions as scikit-learn estimators and
benchmarks times them. errors is the family of errors a user can fix; _checks, _loop, _ops and
_io are shared helpers. docs/design.md describes every module in one line.
"""

__version__ = "0.2.0"  # the one version number (pyproject reads it); part of every stage key

from kmjax.augment import mirror, random_crops
from kmjax.classify import (
    ClassifierFit, ClassifierSpec, ClassifierState, GramStats, LBFGSState, LinearModel, Standardizer, accumulate_gram,
    accuracy, fit_classifier, fit_ridge, init_lbfgs,
    fit_standardizer, gram_stats, predict, predict_features, search_C, softmax_loss, standardize, svm_loss,
    train_linear, validation_split,
)
from kmjax.cluster import KMeansResult, assign, init_centroids, kmeans
from kmjax.data import Cifar10, Dataset, download_cifar10, load_cifar10, resolve_data_dir
from kmjax.datasets import load_dataset
from kmjax.dictionary import Dictionary, learn_dictionary
from kmjax.encoders import encode, hard, nearest_q, soft_threshold, triangle
from kmjax.errors import ConfigError, DataError, FileFormatError, InputError, InputTypeError, KmjaxError, RunError
from kmjax.features import FeatureSpec, batch_features, extract_features, feature_dim
from kmjax.model import Model, load, load_dictionary, predict_images, save, save_dictionary
from kmjax.patches import extract_patches, sample_patches
from kmjax.pooling import pool
from kmjax.preprocess import ZCA, apply_zca, fit_zca, normalize_patches, standardize_dimensions
from kmjax.symmetry import close_dictionary, feature_mirror_permutation, mirror_pairs, pair_sums

__all__ = [
    "Cifar10", "Dataset", "DataError", "download_cifar10", "load_cifar10", "load_dataset", "resolve_data_dir",
    "extract_patches", "sample_patches",
    "normalize_patches", "standardize_dimensions", "ZCA", "fit_zca", "apply_zca",
    "KMeansResult", "kmeans", "assign", "init_centroids",
    "Dictionary", "learn_dictionary",
    "encode", "triangle", "hard", "soft_threshold", "nearest_q", "pool", "mirror", "random_crops",
    "FeatureSpec", "extract_features", "batch_features", "feature_dim",
    "close_dictionary", "feature_mirror_permutation", "mirror_pairs", "pair_sums",
    "Standardizer", "fit_standardizer", "standardize", "LinearModel", "svm_loss", "softmax_loss",
    "train_linear", "predict", "accuracy", "GramStats", "gram_stats", "accumulate_gram", "fit_ridge",
    "predict_features", "ClassifierFit", "ClassifierSpec", "ClassifierState", "LBFGSState", "init_lbfgs", "fit_classifier", "validation_split", "search_C",
    "Model", "save", "load", "predict_images", "save_dictionary", "load_dictionary",
    "KmjaxError", "InputError", "InputTypeError", "ConfigError", "DataError", "FileFormatError", "RunError",
]
