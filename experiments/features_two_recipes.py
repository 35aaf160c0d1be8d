"""Images per second of ``extract_features`` for two recipes: the soft threshold at K = 4000 with
3x3 pooling windows (15 every 6), and the paper's triangle at K = 1600 with quadrants. It uses
only APIs that older checkouts have too, so a before/after comparison runs the same script
against two checkouts, alternately:

    PYTHONPATH=/path/to/old/checkout python experiments/features_two_recipes.py
    python experiments/features_two_recipes.py
"""

from __future__ import annotations

import time

import numpy as np

import kmjax
from kmjax.features import FeatureSpec, extract_features
from kmjax.preprocess import fit_zca


def main(n_images: int = 256):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    zca = fit_zca(rng.standard_normal((5000, 108)).astype(np.float32), 0.1)
    for encoder, pool_size, k in [("soft_threshold", 15, 4000), ("triangle", 0, 1600)]:
        centroids = rng.standard_normal((k, 108)).astype(np.float32)
        spec = FeatureSpec(encoder=encoder, pool_size=pool_size, pool_stride=6 if pool_size else 0)
        extract_features(images[:128], centroids, zca, spec)  # compile outside the timing
        t = time.perf_counter()
        extract_features(images, centroids, zca, spec)
        rate = n_images / (time.perf_counter() - t)
        print(f"{kmjax.__file__.rsplit('/kmjax/', 1)[0]}: {encoder}, K = {k}, pool_size {pool_size}: "
              f"{rate:.1f} images/s")


if __name__ == "__main__":
    main()
