"""A trained single-layer system as one object, and the files of a run: ``model.npz`` and
``dictionary.npz`` (arrays + JSON metadata through ``kmjax.checkpoint``: no pickle).

    model = kmjax.load("runs/coates2011_triangle_1600/model.npz")
    labels = kmjax.predict_images(model, images)      # (N, H, W, C) on the 0-255 scale

A model records the (H, W, C) of the images it was trained on (``Model.image_shape``: 32 x 32 x 3
for CIFAR-10, 96 x 96 x 3 for STL-10, any size); it classifies images of that shape only (its
features' length, with pooling windows, and their meaning depend on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kmjax._checks import host_only
from kmjax.checkpoint import Slot, load_tree, read_meta, save_tree
from kmjax.classify import LinearModel, Standardizer, predict, standardize
from kmjax import templates
from kmjax.dictionary import Dictionary
from kmjax.errors import FileFormatError, InputError
from kmjax.features import FeatureSpec, extract_features, feature_dim
from kmjax.preprocess import ZCA

__all__ = ["Model", "save", "load", "predict_images", "save_dictionary", "load_dictionary", "FORMAT_VERSION"]

FORMAT_VERSION = 2


class Model(NamedTuple):
    """Everything needed to classify images: features spec, ZCA, dictionary, standardizer, weights.

    spec: FeatureSpec. zca: ZCA or None (raw patches). centroids: (K, D). standardizer:
    Standardizer. classifier: LinearModel. class_names: tuple of str. image_shape: (H, W, C)
    the system was trained on.
    """

    spec: FeatureSpec
    zca: ZCA | None
    centroids: jnp.ndarray
    standardizer: Standardizer
    classifier: LinearModel
    class_names: tuple
    image_shape: tuple


def _arrays(model: Model) -> Model:
    """The array part of a model (its other fields travel as metadata)."""
    return model._replace(spec=None, class_names=None, image_shape=None)


def save(path, model: Model) -> Path:
    """Write ``model`` to ``path`` (.npz), atomically: a crash never leaves a half-written file."""
    meta = {"kind": "model", "format_version": FORMAT_VERSION, "spec": model.spec._asdict(),
            "class_names": list(model.class_names), "image_shape": list(model.image_shape),
            "whitened": model.zca is not None}
    return save_tree(path, jax.tree.map(np.asarray, _arrays(model)), meta)


def _check_version(path: Path, meta: dict, what: str) -> None:
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise FileFormatError(f"{path} is a {what} of format {meta.get('format_version')}; this kmjax reads format "
                              f"{FORMAT_VERSION}: rerun its config to write a new one")


def load(path) -> Model:
    """Read a model written by ``save``; a ``FileFormatError`` saying what is wrong if it is not one."""
    path = Path(path)
    what = "model file"
    meta = read_meta(path, what, kind="model")
    _check_version(path, meta, what)
    try:
        spec = FeatureSpec(**meta["spec"])
        class_names, image_shape = tuple(map(str, meta["class_names"])), tuple(int(s) for s in meta["image_shape"])
        whitened = bool(meta["whitened"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{what} {path} has incomplete metadata ({type(e).__name__}: {e})") from None
    like = Model(None, templates.zca(whitened), Slot("K", "D"), *templates.classifier(len(class_names)), None, None)
    arrays, _ = load_tree(path, like, what)
    k, d = arrays.centroids.shape
    if len(image_shape) != 3 or d != spec.patch_size ** 2 * image_shape[2]:
        raise FileFormatError(f"{what} {path}: centroids of dimension {d} do not fit {spec.patch_size}x"
                              f"{spec.patch_size} patches of {image_shape} images")
    try:
        f = feature_dim(spec, k, image_shape)
    except InputError as e:  # a spec that no extraction could run (an unknown encoder, windows that do not fit)
        raise FileFormatError(f"{what} {path} has an unusable feature spec: {e}") from None
    if arrays.standardizer.mean.shape != (f,) or arrays.classifier.weights.shape[0] != f + 1:
        raise FileFormatError(f"{what} {path}: {k} centroids with the {spec.encoder} encoder make {f} features, but "
                              f"the standardizer has {arrays.standardizer.mean.shape[0]} and the weights "
                              f"{arrays.classifier.weights.shape[0]} rows (expected {f + 1})")
    arrays = jax.tree.map(jnp.asarray, arrays)
    return arrays._replace(spec=spec, class_names=class_names, image_shape=image_shape)


def save_dictionary(path, dictionary: Dictionary, patch_shape) -> Path:
    """Write a learned dictionary (``dictionary.npz`` of a run: also runs without a classifier)."""
    meta = {"kind": "dictionary", "format_version": FORMAT_VERSION, "patch_shape": [int(s) for s in patch_shape],
            "whitened": dictionary.zca is not None}
    return save_tree(path, jax.tree.map(np.asarray, dictionary), meta)


def load_dictionary(path) -> tuple[Dictionary, tuple]:
    """(Dictionary, patch shape (h, w, C)) from a file written by ``save_dictionary``."""
    path = Path(path)
    what = "dictionary file"
    meta = read_meta(path, what, kind="dictionary")
    _check_version(path, meta, what)
    try:
        patch_shape, whitened = tuple(int(s) for s in meta["patch_shape"]), bool(meta["whitened"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{what} {path} has incomplete metadata ({type(e).__name__}: {e})") from None
    tree, _ = load_tree(path, templates.dictionary(whitened), what)
    if len(patch_shape) != 3 or tree.kmeans.centroids.shape[1] != int(np.prod(patch_shape)):
        raise FileFormatError(f"{what} {path}: centroids of dimension {tree.kmeans.centroids.shape[1]} do not fit "
                              f"patches of shape {patch_shape}")
    return tree, patch_shape


def predict_images(model: Model, images, **kwargs) -> np.ndarray:
    """Class indices of (N, H, W, C) images (or one (H, W, C) image) on the scale the model was trained
    on (0-255), (H, W, C) = ``model.image_shape``."""
    host_only("predict_images", "kmjax.predict(model.classifier, kmjax.standardize(model.standardizer, "
              "kmjax.batch_features(images, model.zca, model.centroids, spec=model.spec)))", images)
    images = np.asarray(images)
    if images.ndim == 3 and tuple(images.shape) == tuple(model.image_shape):
        images = images[None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
        raise InputError(f"images must have shape (N, {', '.join(map(str, model.image_shape))}) like the "
                         f"training images, got {images.shape}: resize them to {model.image_shape[0]}x"
                         f"{model.image_shape[1]} first (kmjax predict --resize does)")
    feats = extract_features(images, model.centroids, model.zca, model.spec, **kwargs)
    return np.asarray(predict(model.classifier, standardize(model.standardizer, feats)))
