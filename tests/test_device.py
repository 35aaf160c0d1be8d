"""Ridge on the device (kmjax.classify.device) against float64 NumPy and the host path, and its
residency: the passes run with every implicit host<->device transfer disallowed, and the pulls
``fit_classifier`` makes on that path are counted (one validation accuracy per C).

Here the "device" is JAX's CPU backend, the same programs an accelerator compiles (they are
lowered for CUDA, ROCm and TPU in test_lowering.py). Tolerances: the device path sums its blocks
as compensated float32 pairs and refines its float32 solves with compensated residuals, so its
weights agree with float64 NumPy to about 1e-5 of their largest entry on these well-conditioned
problems; the host path (float64 sums, float64 residuals) agrees as closely."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kmjax.classify import accumulate_kernel, empty_kernel_stats, fit_classifier, fit_ridge, gram_stats
from kmjax.classify import device, tiled
from kmjax.classify.linear import raw_scores

EPS = 0.01


def _problem(n=300, f=120, classes=4, seed=0):
    """Non-negative features with shared factors and a large mean, like pooled codes."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.5, 1.0, (n, 30)) @ rng.uniform(0, 1, (30, f)) / 10
    x = (base + rng.gamma(1.0, 0.5, (n, f)) + 5.0).astype(np.float32)
    return x, rng.integers(0, classes, n), classes


def _ridge64(x, labels, classes, C, rows, scale_rows=None):
    """float64 reference: features standardized over ``scale_rows`` (default ``rows``), ridge on
    ``rows``: W = (Zc^T Zc + n / (2C) I)^-1 Zc^T Yc, bias = mean(Y) - m^T W. Returns (W; b), mean, scale."""
    x = x.astype(np.float64)
    ref = x[rows if scale_rows is None else scale_rows]
    mean = ref.mean(axis=0)
    scale = np.sqrt(ref.var(axis=0, ddof=1) + EPS)
    z = (x[rows] - mean) / scale
    y = 2.0 * np.eye(classes)[labels[rows]] - 1.0
    m = z.mean(axis=0)
    zc = z - m
    w = np.linalg.solve(zc.T @ zc + rows.size / (2 * C) * np.eye(z.shape[1]), zc.T @ (y - y.mean(axis=0)))
    return np.vstack([w, y.mean(axis=0) - m @ w]), mean, scale


def _close(weights, reference, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(weights), reference, rtol=0, atol=rtol * np.abs(reference).max())


def test_two_sum_carries_the_digits_float32_loses():
    """A long float32 sum: the compensated pair is exact to float64's rounding of the same terms
    where the plain float32 sum is off by far more."""
    rng = np.random.default_rng(0)
    terms = (rng.standard_normal(20_000) * 10 ** rng.uniform(-3, 3, 20_000)).astype(np.float32)
    exact = terms.astype(np.float64).sum()
    pair = jax.lax.fori_loop(0, terms.size, lambda i, p: device.two_sum(p, jnp.asarray(terms)[i]),
                             device.Pair(jnp.float32(0), jnp.float32(0)))
    plain = np.cumsum(terms, dtype=np.float32)[-1]
    compensated = float(pair.hi) + float(pair.lo)
    assert abs(compensated - exact) < 1e-6 * np.abs(terms).max()
    assert abs(compensated - exact) * 100 < abs(float(plain) - exact)


@pytest.mark.parametrize("C", [0.1, 10.0, 1000.0])
def test_gram_path_matches_float64_and_the_host_path(C):
    x, labels, classes = _problem()
    rows = np.arange(x.shape[0])
    stats = device.gram_on_device(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(rows), num_classes=classes, block=64)
    std, model = device.fit_ridge_on_device(stats, jnp.float32(C))
    reference, mean, scale = _ridge64(x, labels, classes, C, rows)
    np.testing.assert_allclose(std.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(std.scale, scale, rtol=1e-5)
    _close(model.weights, reference)
    _close(fit_ridge(gram_stats(x, labels, classes, block=64), C)[1].weights, reference)


def test_gram_path_adds_rows_as_one_pass_over_all():
    """Statistics of the fitted rows, then the held-out rows added: those of all rows at once."""
    x, labels, classes = _problem()
    args = jnp.asarray(x), jnp.asarray(labels)
    half = device.gram_on_device(*args, jnp.arange(0, 300, 2), num_classes=classes, block=64)
    both = device.gram_on_device(*args, jnp.arange(1, 300, 2), num_classes=classes, block=64, stats=half)
    reference, _, _ = _ridge64(x, labels, classes, 3.0, np.arange(300))
    _close(device.fit_ridge_on_device(both, jnp.float32(3.0))[1].weights, reference)


def test_kernel_matches_the_host_kernel():
    x, _, _ = _problem(n=200, f=700)
    kern = device.kernel_on_device(jnp.asarray(x), block=256)  # two full blocks and a tail
    host = accumulate_kernel(empty_kernel_stats(*x.shape), x, block=256)
    np.testing.assert_allclose(kern.mean, host.mean, rtol=1e-6)
    np.testing.assert_allclose(kern.scale, host.scale, rtol=1e-5)
    np.testing.assert_allclose(kern.kernel, host.kernel, rtol=0, atol=2e-6 * np.abs(host.kernel).max())


@pytest.mark.parametrize("C", [0.3, 30.0])
def test_dual_path_matches_float64_on_a_subset_and_on_all_rows(C):
    """Fitted on a subset (features standardized over all rows, as the dual does): the primal
    weights equal float64 NumPy's; the held-out scores equal theirs too."""
    x, labels, classes = _problem(n=200, f=500)
    every = np.arange(200)
    fit, held = every[every % 5 != 0], every[every % 5 == 0]
    xd, ld = jnp.asarray(x), jnp.asarray(labels)
    kern = device.kernel_on_device(xd, block=128)
    for rows in (fit, every):
        solution = device.fit_dual_on_device(kern, ld, jnp.float32(C), jnp.asarray(rows), num_classes=classes)
        std, model = device.primal_on_device(kern, solution, xd, block=128)
        reference, mean, scale = _ridge64(x, labels, classes, C, rows, scale_rows=every)
        _close(model.weights, reference)
        if rows is fit:
            scores = device.dual_scores_on_device(kern, solution, jnp.asarray(held))
            expected = np.hstack([(x[held] - mean) / scale, np.ones((held.size, 1))]) @ reference
            np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
            np.testing.assert_allclose(raw_scores(std, model, xd[jnp.asarray(held)]), expected, rtol=0,
                                       atol=1e-4 * np.abs(expected).max())


def _fit(monkeypatch, on_device, x, labels, classes, **kw):
    monkeypatch.setattr(tiled, "ON_DEVICE", on_device)
    return fit_classifier(x, labels, num_classes=classes, loss="ridge", key=jax.random.key(0), **kw)


@pytest.mark.parametrize("solver, f", [("gram", 120), ("dual", 500)])
def test_fit_classifier_on_the_device_is_the_host_fit(monkeypatch, solver, f):
    """The whole search (grid, held-out mirrors scored) on the device: the host path's C, scores
    and model, to float32 rounding."""
    x, labels, classes = _problem(n=200, f=f)
    kw = dict(C_grid=[0.1, 1.0, 10.0], copies=2, mirror_scoring=True, solver=solver)
    host = _fit(monkeypatch, False, x, labels, classes, **kw)
    before = device.pulls()
    on_device = _fit(monkeypatch, True, x, labels, classes, **kw)
    assert device.pulls() - before == 4  # one validation count per C, one finiteness flag of the model
    assert on_device.C == host.C and on_device.scores == host.scores
    w = np.asarray(host.model.weights)
    np.testing.assert_allclose(on_device.model.weights, w, rtol=0, atol=1e-4 * np.abs(w).max())
    np.testing.assert_allclose(on_device.standardizer.scale, host.standardizer.scale, rtol=1e-5)


@pytest.mark.parametrize("dual", [False, True])
def test_the_device_passes_make_no_implicit_transfer(dual):
    """Inputs put on the device explicitly, then every pass (statistics or kernel, factorization
    and solves, scores, primal weights) under a guard that raises on any implicit transfer, in
    either direction; the only pull is the explicit one of ``device.pull``."""
    x, labels, classes = _problem(n=200, f=500 if dual else 120)
    xd, ld = device.put(x), device.put(labels)
    rows, held, C = device.put(np.arange(0, 200, 2)), device.put(np.arange(1, 200, 2)), device.put(3.0, np.float32)
    held_labels = device.put(labels[1::2])
    before = device.pulls()
    with jax.transfer_guard("disallow"):
        if dual:
            kern = device.kernel_on_device(xd, block=128)
            solution = device.fit_dual_on_device(kern, ld, C, rows, num_classes=classes)
            scores = device.dual_scores_on_device(kern, solution, held)
            std, model = device.primal_on_device(kern, solution, xd, block=128)
        else:
            std, model = device.fit_ridge_on_device(device.gram_on_device(xd, ld, rows, num_classes=classes), C)
            scores = device.linear_scores_on_device(std, model, xd, held)
        correct = device.pull(device.correct_on_device(scores, held_labels))
        jax.block_until_ready(model)
    assert device.pulls() - before == 1 and 0 <= correct <= 100


def test_placement_by_the_memory_the_device_reports():
    class Fake:
        def __init__(self, gb):
            self.limit = gb * 2**30

        def memory_stats(self):
            return {"bytes_limit": self.limit, "bytes_in_use": 0}

    # the K = 8000 flip-closed config, dual: 50,000 x 72,000 features (14.4 GB) and 4 x 10 GB of solver
    assert device.placement(50_000, 72_000, True, Fake(80)) == "resident"
    assert device.placement(50_000, 72_000, True, Fake(56)) == "streamed"
    assert device.placement(50_000, 72_000, True, Fake(48)) is None
    assert device.placement(50_000, 6_401, False, Fake(16)) == "resident"  # the paper's config: Gram
    cpu = jax.devices("cpu")[0]
    assert cpu.memory_stats() or device.placement(10, 10, False, cpu) is None


def test_streamed_passes_equal_the_resident_ones():
    """Host features streamed in blocks (the last padded): the statistics, kernel and weights of
    the one-program passes over device features."""
    x, labels, classes = _problem(n=200, f=500)
    rows = np.arange(3, 200, 2)
    xd, ld = jnp.asarray(x), jnp.asarray(labels)
    resident = device.gram_on_device(xd[:, :120], ld, jnp.asarray(rows), num_classes=classes, block=64)
    streamed = device.gram_on_device(x[:, :120], labels, rows, num_classes=classes, block=64)
    for a, b in zip(jax.tree.leaves(resident), jax.tree.leaves(streamed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(a)).max())
    kern, kern_s = device.kernel_on_device(xd, block=128), device.kernel_on_device(x, block=128)
    for a, b in zip(kern, kern_s):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(a)).max())
    solution = device.fit_dual_on_device(kern, ld, jnp.float32(3.0), jnp.asarray(rows), num_classes=classes)
    w = device.primal_on_device(kern, solution, xd, block=128)[1].weights
    np.testing.assert_allclose(device.primal_on_device(kern, solution, x, block=128)[1].weights, w, rtol=0,
                               atol=1e-6 * np.abs(np.asarray(w)).max())


def test_fit_classifier_streams_where_only_the_solver_fits(monkeypatch):
    x, labels, classes = _problem(n=200, f=500)
    kw = dict(C_grid=[0.1, 10.0], copies=2, mirror_scoring=True)
    resident = {s: _fit(monkeypatch, True, x, labels, classes, solver=s, **kw) for s in ("gram", "dual")}
    monkeypatch.setattr(tiled, "on_device", lambda: True)
    monkeypatch.setattr(device, "placement", lambda *args: "streamed")
    for solver, fit in resident.items():
        streamed = _fit(monkeypatch, None, x, labels, classes, solver=solver, **kw)
        assert streamed.C == fit.C and streamed.scores == fit.scores
        w = np.asarray(fit.model.weights)
        # float32 rounding in another order, through the Gram solve at F > N (ill-conditioned): as host vs device
        np.testing.assert_allclose(streamed.model.weights, w, rtol=0, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("dual", [False, True])
def test_the_whole_device_fit_makes_no_implicit_transfer(monkeypatch, dual):
    """fit_classifier's device path itself (grid, held-out mirrors, final fit), under the guard:
    everything it sends is sent explicitly, and it pulls one count per C and one flag."""
    from kmjax.classify import select
    from kmjax.classify.spec import ClassifierSpec

    x, labels, classes = _problem(n=200, f=500 if dual else 120)
    monkeypatch.setattr(tiled, "ON_DEVICE", True)
    spec = ClassifierSpec(loss="ridge", C_grid=(0.1, 1.0, 10.0), solver="dual" if dual else "gram")
    split = select.validation_split(200, jax.random.key(0), copies=2)
    run = select._Run(x, labels, classes, spec, split, 100, None, None, None, None)
    before = device.pulls()
    with jax.transfer_guard("disallow"):
        fit = select._fit_ridge_device(run, dual, "resident")
    assert device.pulls() - before == 4 and fit.C in (0.1, 1.0, 10.0)
