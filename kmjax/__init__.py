"""kmjax: Coates-Lee-Ng single-layer k-means features on CIFAR-10, as pure JAX functions.

Data flows through the modules in this order: data -> patches -> preprocess -> kmeans ->
encode -> pool -> features -> classify; experiment, config, plots and cli are the shell.
"""

__version__ = "0.1.0"

from kmjax.classify import (
    GramStats, LinearModel, Standardizer, accuracy, fit_ridge, fit_standardizer, gram_stats, predict,
    predict_features, softmax_loss, standardize, svm_loss, train_linear,
)
from kmjax.data import Cifar10, DataError, download_cifar10, load_cifar10, resolve_data_dir
from kmjax.encoders import encode, hard, soft_threshold, triangle
from kmjax.features import FeatureSpec, extract_features, feature_dim
from kmjax.cluster import KMeansResult, assign, init_centroids, kmeans
from kmjax.patches import extract_patches, sample_patches
from kmjax.pooling import pool
from kmjax.preprocess import ZCA, apply_zca, fit_zca, normalize_patches, standardize_dimensions

__all__ = [
    "Cifar10", "DataError", "download_cifar10", "load_cifar10", "resolve_data_dir",
    "extract_patches", "sample_patches",
    "normalize_patches", "standardize_dimensions", "ZCA", "fit_zca", "apply_zca",
    "KMeansResult", "kmeans", "assign", "init_centroids",
    "encode", "triangle", "hard", "soft_threshold", "pool",
    "FeatureSpec", "extract_features", "feature_dim",
    "Standardizer", "fit_standardizer", "standardize", "LinearModel", "svm_loss", "softmax_loss",
    "train_linear", "predict", "accuracy", "GramStats", "gram_stats", "fit_ridge", "predict_features",
]
