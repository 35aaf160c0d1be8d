"""Tests for kmjax.encoders against loop-based float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from kmjax.encoders import ENCODERS, encode, hard, num_outputs, soft_threshold, triangle

M, K, D = 23, 7, 12


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, D)).astype(np.float32)
    c = rng.normal(size=(K, D)).astype(np.float32)
    return x, c


def triangle_ref(x, c):
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    out = np.zeros((len(x), len(c)))
    for i, xi in enumerate(x):
        z = np.array([np.sqrt(np.sum((xi - ck) ** 2)) for ck in c])
        out[i] = np.maximum(0.0, z.mean() - z)
    return out


def hard_ref(x, c):
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    out = np.zeros((len(x), len(c)))
    for i, xi in enumerate(x):
        d = [np.sum((xi - ck) ** 2) for ck in c]
        out[i, int(np.argmin(d))] = 1.0
    return out


def soft_ref(x, c, alpha):
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    k = len(c)
    out = np.zeros((len(x), 2 * k))
    for i, xi in enumerate(x):
        for j, cj in enumerate(c):
            p = float(xi @ cj)
            out[i, j] = max(0.0, p - alpha)
            out[i, k + j] = max(0.0, -p - alpha)
    return out


def test_triangle_matches_reference():
    x, c = _data()
    got = np.asarray(triangle(x, c))
    assert got.shape == (M, K) and got.dtype == np.float32
    # distances ~5 from the expanded ||x||^2 - 2x.c + ||c||^2 in float32: cancellation costs
    # ~1e-6 relative of ~25 in the square, i.e. well under 1e-4 absolute in the distance
    np.testing.assert_allclose(got, triangle_ref(x, c), atol=1e-4)


def test_triangle_properties():
    x, c = _data(1)
    got = np.asarray(triangle(x, c))
    assert (got >= 0).all()
    # the nearest centroid is always below the mean distance (so positive) and the farthest
    # always above it (so zero): every row has at least one of each on generic data
    assert ((got > 0).sum(axis=1) >= 1).all()
    assert ((got == 0).sum(axis=1) >= 1).all()
    frac_zero = (got == 0).mean()
    assert 0.2 < frac_zero < 0.8  # "about half": loose on 23 x 7 random entries


def test_hard_matches_reference():
    x, c = _data(2)
    got = np.asarray(hard(x, c))
    assert got.shape == (M, K) and got.dtype == np.float32
    # exact: one-hot codes; random gaussian data has no near ties at this size
    np.testing.assert_array_equal(got, hard_ref(x, c))
    np.testing.assert_array_equal(got.sum(axis=1), np.ones(M))


def test_hard_uses_distance_not_dot_product():
    # a long centroid has the larger dot product but is farther away
    x = np.array([[1.0, 0.0]], np.float32)
    c = np.array([[1.0, 0.0], [10.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(hard(x, c)), [[1.0, 0.0]])


@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.5])
def test_soft_threshold_matches_reference(alpha):
    x, c = _data(3)
    got = np.asarray(soft_threshold(x, c, alpha))
    assert got.shape == (M, 2 * K)
    # float32 dot products of 12 terms of magnitude ~1: ~1e-6 rounding, 1e-5 is ample
    np.testing.assert_allclose(got, soft_ref(x, c, alpha), atol=1e-5)
    assert (got >= 0).all()
    # the two halves can't both be positive for alpha >= 0
    assert not ((got[:, :K] > 0) & (got[:, K:] > 0)).any()


@pytest.mark.parametrize("name", ENCODERS)
def test_encode_dispatch(name):
    x, c = _data(4)
    direct = {"triangle": lambda: triangle(x, c), "hard": lambda: hard(x, c),
              "soft_threshold": lambda: soft_threshold(x, c, 0.5)}[name]()
    got = encode(x, c, name, alpha=0.5)
    # same computation: identical
    np.testing.assert_array_equal(np.asarray(got), np.asarray(direct))
    assert got.shape[1] == num_outputs(name, K)


def test_encode_default_is_triangle():
    x, c = _data(5)
    np.testing.assert_array_equal(np.asarray(encode(x, c)), np.asarray(triangle(x, c)))


def test_num_outputs():
    assert num_outputs("triangle", 5) == 5
    assert num_outputs("hard", 5) == 5
    assert num_outputs("soft_threshold", 5) == 10


def test_encode_unknown_name():
    x, c = _data()
    with pytest.raises(ValueError, match="unknown encoder"):
        encode(x, c, "triangel")


def test_hard_picks_the_first_of_equal_centroids():
    # the authors' empty-cluster policy leaves several centroids at exactly zero: a tie
    x = np.array([[0.1, -0.2], [5.0, 5.0]], np.float32)
    c = np.array([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(hard(x, c)), [[0, 1, 0], [1, 0, 0]])
