"""Every public function of kmjax either works inside ``jax.jit`` or says, in one line, that it is a
host-level entry point and what to use inside jit instead. A new public function must be added to
one of the lists below (the last test fails otherwise)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kmjax

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
X = RNG.normal(size=(64, 12)).astype(np.float32)
C = RNG.normal(size=(5, 12)).astype(np.float32)
LABELS = np.arange(64) % 3
GRAM = kmjax.gram_stats(X, LABELS, 3)
SPEC = kmjax.FeatureSpec(patch_size=2, grid=2)
PATCH_C = RNG.normal(size=(5, 12)).astype(np.float32)
STD = kmjax.Standardizer(np.zeros(20, np.float32), np.ones(20, np.float32))
MODEL = kmjax.LinearModel(np.zeros((21, 3), np.float32))
ZCA = kmjax.fit_zca(X)

# name -> (function of traced arrays, its concrete arguments)
JITTABLE = {
    "extract_patches": (lambda im: kmjax.extract_patches(im, 3), (IMAGES,)),
    "sample_patches": (lambda im: kmjax.sample_patches(KEY, im, 10, 3), (IMAGES,)),
    "normalize_patches": (kmjax.normalize_patches, (X,)),
    "standardize_dimensions": (kmjax.standardize_dimensions, (X,)),
    "fit_zca": (kmjax.fit_zca, (X,)),
    "apply_zca": (lambda x: kmjax.apply_zca(ZCA, x), (X,)),
    "kmeans": (lambda x: kmjax.kmeans(KEY, x, 5, max_iter=3, init="k-means++").centroids, (X,)),
    "init_centroids": (lambda x: kmjax.init_centroids(KEY, x, 5), (X,)),
    "assign": (lambda x, c: kmjax.assign(x, c), (X, C)),
    # 64 patches of 12 pixels, 3 iterations: the shapes of "kmeans" above, whose operations, compiled one
    # by one on the eager side of test_works_inside_jit, are reused here
    "learn_dictionary": (lambda im: kmjax.learn_dictionary(KEY, im, 5, patch_size=2, n_patches=64, max_iter=3,
                                                           empty="reseed").centroids, (IMAGES,)),
    "encode": (lambda x, c: kmjax.encode(x, c, "soft_threshold"), (X, C)),
    "triangle": (kmjax.triangle, (X, C)),
    "hard": (kmjax.hard, (X, C)),
    "soft_threshold": (kmjax.soft_threshold, (X, C)),
    "nearest_q": (lambda x, c: kmjax.nearest_q(x, c, 2), (X, C)),
    "mirror": (kmjax.mirror, (IMAGES,)),
    "close_dictionary": (lambda c: kmjax.close_dictionary(c, 2), (PATCH_C,)),
    "pair_sums": (lambda x: kmjax.pair_sums(x, (np.arange(6), np.arange(6, 12))), (X,)),
    "random_crops": (lambda im: kmjax.random_crops(KEY, im, 2), (IMAGES,)),
    "pool": (lambda m: kmjax.pool(m, 2), (IMAGES,)),
    "batch_features": (lambda im: kmjax.batch_features(im, None, PATCH_C, spec=SPEC), (IMAGES,)),
    "standardize": (lambda f: kmjax.standardize(STD, f), (np.ones((4, 20), np.float32),)),
    "predict": (lambda f: kmjax.predict(MODEL, f), (np.ones((4, 21), np.float32),)),
    "svm_loss": (lambda w, x: kmjax.svm_loss(w, x, LABELS, 1.0), (np.zeros((12, 3), np.float32), X)),
    "softmax_loss": (lambda w, x: kmjax.softmax_loss(w, x, LABELS, 1.0), (np.zeros((12, 3), np.float32), X)),
    "train_linear": (lambda x, y: kmjax.train_linear(x, y, num_classes=3, max_iter=5)[0].weights, (X, LABELS)),
}

# name -> (function of traced arrays, its concrete arguments): must refuse with the one-line message
HOST_LEVEL = {
    "extract_features": (lambda im: kmjax.extract_features(im, PATCH_C, None, SPEC), (IMAGES,)),
    "fit_standardizer": (kmjax.fit_standardizer, (X,)),
    "accuracy": (lambda x: kmjax.accuracy(kmjax.LinearModel(jnp.zeros((12, 3))), x, LABELS), (X,)),
    "predict_features": (lambda f: kmjax.predict_features(STD, MODEL, f), (np.ones((4, 20), np.float32),)),
    "gram_stats": (lambda x: kmjax.gram_stats(x, LABELS, 3), (X,)),
    # their statistics are made outside the traced function: on an accelerator gram_stats's products
    # are jitted, and a jitted call inside a trace is traced too, whatever its arguments
    "accumulate_gram": (lambda x: kmjax.accumulate_gram(kmjax.classify.empty_gram_stats(np.zeros(12), 3), x, LABELS), (X,)),
    "fit_ridge": (lambda c: kmjax.fit_ridge(GRAM, c), (np.float32(1.0),)),
    "fit_classifier": (lambda x: kmjax.fit_classifier(x, LABELS, num_classes=3), (X,)),
    "validation_split": (lambda k: kmjax.validation_split(64, k), (KEY,)),
    "predict_images": (lambda im: kmjax.predict_images(kmjax.Model(SPEC, None, PATCH_C, kmjax.Standardizer(
        np.zeros(20, np.float32), np.ones(20, np.float32)), MODEL, ("a", "b", "c"), (8, 8, 3)), im), (IMAGES,)),
}

# no array inputs: files, names, sizes, callables
NO_ARRAYS = {"init_lbfgs", "load_cifar10", "load_dataset", "download_cifar10", "resolve_data_dir", "save", "load", "save_dictionary",
             "load_dictionary", "feature_dim", "search_C", "feature_mirror_permutation", "mirror_pairs"}


@pytest.mark.parametrize("name", sorted(JITTABLE))
def test_works_inside_jit(name):
    """Traced inside ``jax.jit``, the function gives what it gives run op by op: the eager side runs
    under ``jax.disable_jit()``, so the library's own ``@jax.jit`` bodies, ``lax`` loops and host
    checks run unjitted there (called plainly, both sides would run the same compiled program)."""
    fn, args = JITTABLE[name]
    jitted = jax.tree.map(np.asarray, jax.jit(fn)(*args))
    with jax.disable_jit():
        eager = jax.tree.map(np.asarray, fn(*args))
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(HOST_LEVEL))
def test_host_level_functions_say_so_in_one_line(name):
    fn, args = HOST_LEVEL[name]
    fn(*args)  # works outside jit
    with pytest.raises(TypeError) as e:
        jax.jit(fn)(*args)
    msg = str(e.value)
    assert msg.startswith(f"kmjax.{name} is a host-level entry point") and "inside jit use" in msg
    assert "\n" not in msg


def test_every_public_function_is_classified():
    public = {n for n in kmjax.__all__ if callable(getattr(kmjax, n)) and not isinstance(getattr(kmjax, n), type)}
    assert public == set(JITTABLE) | set(HOST_LEVEL) | NO_ARRAYS
