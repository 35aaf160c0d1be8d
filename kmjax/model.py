"""A trained single-layer system as one object, saved as plain ``.npz`` (arrays + JSON, no pickle).

    model = kmjax.load("runs/coates2011_triangle_1600/model.npz")
    labels = kmjax.predict_images(model, images)      # (N, 32, 32, 3) on the 0-255 scale
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kmjax._io import atomic_write
from kmjax.classify import LinearModel, Standardizer, predict, standardize
from kmjax.features import FeatureSpec, extract_features
from kmjax.preprocess import ZCA

__all__ = ["Model", "save", "load", "predict_images", "FORMAT_VERSION"]

FORMAT_VERSION = 1


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


def save(path, model: Model) -> Path:
    """Write ``model`` to ``path`` (.npz), atomically: a crash never leaves a half-written file."""
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, "spec": model.spec._asdict(),
            "class_names": list(model.class_names), "image_shape": list(model.image_shape),
            "whitened": model.zca is not None}
    arrays = {"centroids": np.asarray(model.centroids), "std_mean": np.asarray(model.standardizer.mean),
              "std_scale": np.asarray(model.standardizer.scale), "weights": np.asarray(model.classifier.weights),
              "meta": np.array(json.dumps(meta))}
    if model.zca is not None:
        arrays.update(zca_mean=np.asarray(model.zca.mean), zca_matrix=np.asarray(model.zca.matrix))
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load(path) -> Model:
    """Read a model written by ``save``; a clear error if the file is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {path} does not exist") from None
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a kmjax model file ({e}); models are the model.npz of a run folder") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has model format {meta.get('format_version')}, this kmjax reads {FORMAT_VERSION}")
    zca = ZCA(jnp.asarray(arrays["zca_mean"]), jnp.asarray(arrays["zca_matrix"])) if meta["whitened"] else None
    return Model(
        spec=FeatureSpec(**meta["spec"]), zca=zca, centroids=jnp.asarray(arrays["centroids"]),
        standardizer=Standardizer(jnp.asarray(arrays["std_mean"]), jnp.asarray(arrays["std_scale"])),
        classifier=LinearModel(jnp.asarray(arrays["weights"])), class_names=tuple(meta["class_names"]),
        image_shape=tuple(meta["image_shape"]),
    )


def predict_images(model: Model, images, **kwargs) -> np.ndarray:
    """Class indices of (N, H, W, C) images on the scale the model was trained on (0-255)."""
    images = np.asarray(images)
    if images.ndim == 3 and tuple(images.shape) == tuple(model.image_shape):
        images = images[None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"images must have shape (N, {', '.join(map(str, model.image_shape))}) like the "
                         f"training images, got {images.shape}")
    feats = extract_features(images, model.centroids, model.zca, model.spec, **kwargs)
    return np.asarray(predict(model.classifier, standardize(model.standardizer, feats)))
