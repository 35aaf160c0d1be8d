"""The file templates: the structure, shapes and dtypes of every pytree kmjax writes, in one place
(the ``like`` of ``kmjax.checkpoint.load_tree``; a file that does not match is refused).

The library's functions return their state as pytrees and write no files; the shell (``kmjax.model``
for the files of a run, the runner's stage store for its stages and checkpoints) saves them with
``kmjax.checkpoint.save_tree`` and reads them back with these templates.

A solver state's template is derived from the state itself, never restated: its ``init`` is called
with small, distinct lengths for its named dimensions, and every leaf of what it returns becomes a
``Slot`` of that leaf's kind, each axis named after the dimension whose length it has. A field
added to a state (and made by its ``init``) is in its template with no second edit.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import numpy as np

from kmjax.checkpoint import Slot
from kmjax.classify import LinearModel, Standardizer, empty_gram_stats, empty_kernel_stats, init_lbfgs
from kmjax.classify.cg import init_cg, prepare_cg_ridge
from kmjax.cluster import KMeansResult
from kmjax.dictionary import Dictionary
from kmjax.lloyd import LloydSpec, start
from kmjax.preprocess import ZCA

__all__ = ["zca", "dictionary", "lloyd_state", "lbfgs_state", "gram_state", "kernel_state", "cg_prep", "cg_state",
           "classifier", "classifier_stage", "fit_state", "mapped", "derived"]

_KINDS = {"f": "f", "i": "i", "u": "i", "b": "b"}


def derived(make, **sizes: int):
    """The template of the pytree ``make(**sizes)`` returns. ``sizes``: distinct lengths, one per
    named dimension (e.g. F=7, classes=3); an axis of one of these lengths is that named dimension
    (it must agree wherever the name appears in a file), any other length is kept exact. A float
    leaf that is not all finite in the example (NaN or inf: "not reached yet") may be so in a file."""
    names = {size: name for name, size in sizes.items()}
    if len(names) != len(sizes):
        raise ValueError(f"the sizes of the named dimensions must be distinct, got {sizes}")

    def slot(leaf):
        a = np.asarray(leaf)
        finite = a.dtype.kind != "f" or bool(np.all(np.isfinite(a)))
        return Slot(*(names.get(n, n) for n in a.shape), kind=_KINDS[a.dtype.kind], finite=finite)

    return jax.tree.map(slot, make(**sizes))


# The lengths the states' templates are derived with: small, and distinct from each other and from
# every constant length of a state (none is 1).
_F, _CLASSES, _N, _RANK, _K, _D, _ITERATIONS, _MEMORY = 7, 3, 11, 5, 13, 17, 19, 23


@lru_cache
def lloyd_state() -> object:
    """The k-means loop state ``kmjax.kmeans`` hands its ``checkpoint`` (``kmjax.lloyd.LoopState``)."""
    spec = LloydSpec(max_iter=_ITERATIONS, chunk_size=_N, empty="zero", spherical=False, precision="float32",
                     weighted=False, m=_K)
    return derived(lambda K, D, max_iter: start(np.zeros((K, D), np.float32), spec._replace(max_iter=max_iter)),
                   K=_K, D=_D, max_iter=_ITERATIONS)


@lru_cache
def lbfgs_state() -> object:
    """``train_linear``'s ``LBFGSState``: its weights (F + 1, classes) and optax's L-BFGS state."""
    return derived(lambda F, classes, memory: init_lbfgs(F, classes, memory), F=_F, classes=_CLASSES, memory=_MEMORY)


@lru_cache
def gram_state() -> object:
    """Ridge's ``GramStats``."""
    return derived(lambda F, classes: empty_gram_stats(np.zeros(F), classes), F=_F, classes=_CLASSES)


@lru_cache
def kernel_state() -> object:
    """The dual ridge's ``KernelStats``."""
    return derived(lambda N, F: empty_kernel_stats(N, F), N=_N, F=_F)


def _cg_problem(N, F, classes, rank):
    """The CG solver's set-up on a tiny random problem (the set-up has no cheaper ``init``)."""
    rng = np.random.default_rng(0)
    labels = np.arange(N) % classes
    return prepare_cg_ridge(rng.normal(size=(N, F)), labels, classes, rank=rank), rng.normal(size=(N, F))


@lru_cache
def cg_prep() -> object:
    """The CG solver's set-up, ``CGRidge`` (its rows: any number)."""
    return derived(lambda N, F, classes, rank: _cg_problem(N, F, classes, rank)[0], N=_N, F=_F, classes=_CLASSES,
                   rank=_RANK)


@lru_cache
def cg_state() -> object:
    """A CG solve's ``CGState``."""
    return derived(lambda N, F, classes, rank: init_cg(*_cg_problem(N, F, classes, rank), 1.0), N=_N, F=_F,
                   classes=_CLASSES, rank=_RANK)


def mapped(name: str, tree=None) -> bool:
    """Whether the fit state saved under ``name`` is read back memory-mapped (``load_tree(mmap=True)``):
    the N x N kernel, read once per solve through the page cache instead of held in memory beside
    its factorization. Given the ``tree`` just saved: only once it is complete (a growing kernel
    stays the fit's own, in memory, to grow)."""
    return name == "kernel" and (tree is None or int(tree.columns) == tree.mean.shape[0])


def zca(whitened: bool) -> ZCA | None:
    return ZCA(Slot("D"), Slot("D", "D")) if whitened else None


def dictionary(whitened: bool, max_iter: int | None = None) -> Dictionary:
    """A ``Dictionary`` (``learn_dictionary``)."""
    km = KMeansResult(Slot("K", "D"), Slot("K"), Slot(), Slot(max_iter, finite=False), Slot(kind="i"),
                      Slot(kind="b"))
    return Dictionary(zca(whitened), km, Slot(kind="i"))


def classifier(num_classes: int | None = None) -> tuple[Standardizer, LinearModel]:
    """A fitted linear classifier: its ``Standardizer`` and ``LinearModel`` (F + 1 rows of weights)."""
    return Standardizer(Slot("F"), Slot("F")), LinearModel(Slot(None, num_classes))


def classifier_stage() -> dict:
    """The runner's saved classifier stage: {"standardizer", "model"}."""
    return dict(zip(("standardizer", "model"), classifier()))


def fit_state(name: str):
    """The intermediate state a stage hands its ``checkpoint`` under ``name``: "kmeans" (``LoopState``,
    from ``learn_dictionary``), and the parts of ``fit_classifier``'s ``ClassifierState``: "gram"
    (``GramStats``), "kernel" (``KernelStats``), "cg-prep-*" (``CGRidge``), other "cg-*" (``CGState``)."""
    if name == "kmeans":
        return lloyd_state()
    if name == "gram":
        return gram_state()
    if name == "kernel":
        return kernel_state()
    if name.startswith("cg-prep"):
        return cg_prep()
    if name.startswith("cg-"):
        return cg_state()
    raise ValueError(f"no template for a fit state named {name!r}")
