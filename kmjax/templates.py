"""The file templates: the structure, shapes and dtypes of every pytree kmjax writes, in one place
(the ``like`` of ``kmjax.checkpoint.load_tree``; a file that does not match is refused).

The library's functions return their state as pytrees and write no files; the shell (``kmjax.model``
for the files of a run, the runner's stage store for its stages and checkpoints) saves them with
``kmjax.checkpoint.save_tree`` and reads them back with these templates.
"""

from __future__ import annotations

from kmjax.checkpoint import Slot
from kmjax.classify import GramStats, LinearModel, Standardizer
from kmjax.classify.cg import CGRidge, CGState
from kmjax.classify.dual import KernelStats
from kmjax.cluster import KMeansResult
from kmjax.dictionary import Dictionary
from kmjax.lloyd import LoopState
from kmjax.preprocess import ZCA

__all__ = ["zca", "dictionary", "lloyd_state", "classifier", "classifier_stage", "fit_state", "mapped"]

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


def lloyd_state(max_iter: int | None = None) -> LoopState:
    """The k-means loop state ``kmjax.kmeans`` hands its ``checkpoint``."""
    return LoopState(Slot("K", "D"), Slot(max_iter, finite=False), Slot(kind="i"), Slot(kind="b"))


def classifier(num_classes: int | None = None) -> tuple[Standardizer, LinearModel]:
    """A fitted linear classifier: its ``Standardizer`` and ``LinearModel`` (F + 1 rows of weights)."""
    return Standardizer(Slot("F"), Slot("F")), LinearModel(Slot(None, num_classes))


def classifier_stage() -> dict:
    """The runner's saved classifier stage: {"standardizer", "model"}."""
    return dict(zip(("standardizer", "model"), classifier()))


def fit_state(name: str):
    """The intermediate state a stage hands its ``checkpoint`` under ``name``: "kmeans" (``LoopState``,
    from ``learn_dictionary``), and those of ``fit_classifier``: "gram" (``GramStats``), "kernel"
    (``KernelStats``), "cg-prep-*" (``CGRidge``), other "cg-*" (``CGState``)."""
    if name == "kmeans":
        return lloyd_state()
    if name == "gram":
        return GramStats(Slot(), Slot("F"), Slot("F"), Slot("F", "F"), Slot("F", "classes"), Slot("classes"))
    if name == "kernel":
        return KernelStats(Slot(kind="i"), Slot("F"), Slot("F"), Slot("N", "N"))
    if name.startswith("cg-prep"):
        return CGRidge(Slot(None, kind="i"), Slot("F"), Slot("F"), Slot("F", "classes"), Slot("classes"),
                       Slot("F", "rank"), Slot("rank"))
    if name.startswith("cg-"):
        return CGState(Slot("F", "classes"), Slot("F", "classes"), Slot("F", "classes"), Slot("classes"),
                       Slot("classes"), Slot(kind="i"))
    raise ValueError(f"no template for a fit state named {name!r}")
