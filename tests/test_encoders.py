"""Tests for kmjax.encoders against loop-based float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kmjax import encoders
from kmjax.encoders import ENCODERS, Encoder, encode, hard, nearest_q, num_outputs, soft_threshold, triangle

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
              "soft_threshold": lambda: soft_threshold(x, c, 0.5), "nearest_q": lambda: nearest_q(x, c, 3)}[name]()
    got = encode(x, c, name, alpha=0.5, q=3)
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
    assert num_outputs("nearest_q", 5) == 10


def test_encode_unknown_name():
    x, c = _data()
    with pytest.raises(ValueError, match="unknown encoder"):
        encode(x, c, "triangel")


def test_hard_picks_the_first_of_equal_centroids():
    # the authors' empty-cluster policy leaves several centroids at exactly zero: a tie
    x = np.array([[0.1, -0.2], [5.0, 5.0]], np.float32)
    c = np.array([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(hard(x, c)), [[0, 1, 0], [1, 0, 0]])


def nearest_q_ref(x, c, q):
    """Loop reference, float64: for the patch and for its negative, atom k is coded 1 iff at most
    q atoms (k included) are at least as near in squared Euclidean distance."""
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    k = len(c)
    out = np.zeros((len(x), 2 * k))
    for i, xi in enumerate(x):
        for sign, offset in ((1.0, 0), (-1.0, k)):
            dist = [float(np.sum((sign * xi - cj) ** 2)) for cj in c]
            for j in range(k):
                out[i, offset + j] = float(sum(d <= dist[j] for d in dist) <= q)
    return out


@pytest.mark.parametrize("q", [1, 3, K - 1])
def test_nearest_q_matches_reference(q):
    x, c = _data(6)
    got = np.asarray(nearest_q(x, c, q))
    assert got.shape == (M, 2 * K) and got.dtype == np.float32
    # exact: 0/1 codes; Gaussian data has no distances within float32 rounding of each other here
    np.testing.assert_array_equal(got, nearest_q_ref(x, c, q))
    # no ties: exactly q atoms per sign
    np.testing.assert_array_equal(got[:, :K].sum(1), q)
    np.testing.assert_array_equal(got[:, K:].sum(1), q)


def test_nearest_q_ties_follow_the_reference():
    # small integers: every distance and score is exact in float32, so ties are exact ties
    rng = np.random.default_rng(7)
    x = rng.integers(-1, 2, size=(200, 4)).astype(np.float32)
    c = rng.integers(-1, 2, size=(9, 4)).astype(np.float32)
    c[5] = c[2]  # a duplicated atom: always tied with its twin
    for q in range(1, 9):
        got = np.asarray(nearest_q(x, c, q))
        np.testing.assert_array_equal(got, nearest_q_ref(x, c, q))
    # the ties made rows with fewer than q ones: atoms tied across the boundary are all left out
    assert (got[:, :9].sum(1) < 8).any()


def test_nearest_q_tie_rule_by_hand():
    # distances from x = 0 to the atoms are their norms^2: 1, 4, 4, 9 (both signs alike)
    x = np.zeros((1, 2), np.float32)
    c = np.array([[1, 0], [0, 2], [2, 0], [3, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(nearest_q(x, c, 1))[0], [1, 0, 0, 0] * 2)
    # q = 2: the 3rd nearest ties with the 2nd, so only the nearest is strictly nearer than it
    np.testing.assert_array_equal(np.asarray(nearest_q(x, c, 2))[0], [1, 0, 0, 0] * 2)
    np.testing.assert_array_equal(np.asarray(nearest_q(x, c, 3))[0], [1, 1, 1, 0] * 2)
    # all atoms equally near: none is strictly nearer than the (q+1)-th
    np.testing.assert_array_equal(np.asarray(nearest_q(x, c[1:3], 1))[0], [0, 0] * 2)


def test_nearest_q_signs_and_unit_atoms():
    # for unit-norm atoms the nearest atoms of x have the largest projections c.x, those of -x
    # the smallest: the two halves are the top-q and bottom-q projections
    x, c = _data(8)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    got = np.asarray(nearest_q(x, c, 2))
    order = np.argsort(x.astype(np.float64) @ c.T.astype(np.float64), axis=1)
    top, bottom = np.zeros((M, K)), np.zeros((M, K))
    np.put_along_axis(top, order[:, -2:], 1.0, axis=1)
    np.put_along_axis(bottom, order[:, :2], 1.0, axis=1)
    np.testing.assert_array_equal(got, np.concatenate([top, bottom], axis=1))


def test_nearest_q_uses_distance_not_dot_product():
    # a long atom has the larger dot product but is farther away (as for hard assignment)
    x = np.array([[1.0, 0.0]], np.float32)
    c = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 5.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(nearest_q(x, c, 1))[0, :3], [1, 0, 0])


@pytest.mark.parametrize("q", [0, K, -1, 2.0, True])
def test_nearest_q_bad_q(q):
    x, c = _data()
    with pytest.raises(ValueError, match="q"):
        nearest_q(x, c, q)


def test_nearest_q_under_jit():
    x, c = _data(9)
    f = jax.jit(nearest_q, static_argnames="q")
    np.testing.assert_array_equal(np.asarray(f(x, c, q=3)), np.asarray(nearest_q(x, c, 3)))


def _sorted_qth(s, q):
    return np.sort(np.asarray(s, np.float32), axis=-1)[..., q]


@pytest.mark.parametrize("k", [2, 7, 29])
def test_kth_smallest_equals_sorting(k):
    # the (q+1)-th smallest entry per row, ties counted: rows of repeated small integers at several
    # scales (many ties; row minima repeated more than q times), signed zeros, Gaussian rows
    rng = np.random.default_rng(k)
    ints = rng.integers(-2, 3, size=(160, k)).astype(np.float32)
    scales = np.repeat(np.array([1.0, 1e-30, 3e30, 0.5], np.float32), 40)[:, None]
    zeros = np.zeros((4, k), np.float32)
    zeros[0] = -0.0
    zeros[1, ::2] = -0.0
    zeros[2, 0] = -1.0
    s = np.concatenate([ints * scales, zeros, rng.normal(size=(40, k)).astype(np.float32)])
    kth = jax.jit(encoders._kth_smallest, static_argnums=1)
    for q in sorted({1, k // 2, k - 1}):
        np.testing.assert_array_equal(np.asarray(kth(jnp.asarray(s), q)), _sorted_qth(s, q))


def test_kth_smallest_subnormals_as_the_comparisons_see_them():
    s = np.array([[3e-45, 1e-45, 2e-45, 0.0, -1e-45, 1.0]], np.float32)
    flushes = not bool(jax.jit(lambda v: v > 0)(jnp.float32(1e-45)))  # XLA on CPUs: subnormals compare as 0
    expected = np.where(np.abs(s) < np.finfo(np.float32).tiny, 0.0, s) if flushes else s
    for q in range(1, 6):
        np.testing.assert_array_equal(np.asarray(encoders._kth_smallest(jnp.asarray(s), q)), _sorted_qth(expected, q))


def test_kth_smallest_batched_rows():
    s = np.random.default_rng(4).normal(size=(3, 2, 50)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(encoders._kth_smallest(jnp.asarray(s), 20)), _sorted_qth(s, 20))


def test_encode_passes_q_only_to_encoders_that_read_it(monkeypatch):
    # an encoder registered with the four-argument signature keeps working (q is not passed to it)
    x, c = _data(10)
    monkeypatch.setitem(ENCODERS, "project", Encoder(lambda x, c, alpha, precision: x @ c.T, 1))
    np.testing.assert_allclose(np.asarray(encode(x, c, "project", q=3)), x @ c.T, rtol=1e-5, atol=1e-5)
