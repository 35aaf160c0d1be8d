"""What ``fit_classifier`` is asked and where it stands: ``ClassifierSpec``, its options with their
defaults (defined here once: the config's classifier section reads them too), and
``ClassifierState``, the pytree of the intermediate states it hands its ``checkpoint`` and
continues from (``state=``)."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from kmjax.classify.cg import CGRidge, CGState
from kmjax.classify.dual import KernelStats
from kmjax.classify.ridge import GramStats

__all__ = ["ClassifierSpec", "ClassifierState"]

_SEARCH = "cg-search-C"  # the parts of ``cg_search``: one per C


class ClassifierSpec(NamedTuple):
    """The options of a classifier fit, one hashable value; the defaults are ``fit_classifier``'s.

    loss: one of ``CLASSIFIERS``. C: the C of the fit without a grid. C_grid: the Cs to choose from
    on held-out rows (empty: none). val_fraction: the held-out share of the images. max_iter, tol:
    L-BFGS's iterations at most and gradient norm to stop at (the CG solver: passes at most).
    solver: how ridge is solved, one of ``SOLVERS``. rank: the CG solver's preconditioner rank.
    storage: the dtype L-BFGS holds its features in, one of ``STORAGES``. mirror_scoring: score a
    held-out image by its and its mirror's summed scores. (See ``fit_classifier``.)
    """

    loss: str = "svm"
    C: float = 100.0
    C_grid: tuple = ()
    val_fraction: float = 0.1
    max_iter: int = 1000
    tol: float = 1e-3
    solver: str = "auto"
    rank: int = 1024
    storage: str = "float32"
    mirror_scoring: bool = False


def _c_name(C: float) -> str:
    """C as written in a part's name: short ("1", "0.1", "1e-05") where that reads back exactly."""
    short = f"{C:g}"
    return short if float(short) == C else repr(float(C))


class ClassifierState(NamedTuple):
    """Where a ``fit_classifier`` stands: the intermediate states it has reached (None: not yet), a
    pytree that ``fit_classifier(state=)`` continues from. Only the ridge solvers have any.

    gram: ``GramStats`` of the fitted rows (solver "gram"). kernel: ``KernelStats``, complete or
    growing (solver "dual"). cg_prep_search, cg_prep_final: the CG solver's set-up (``CGRidge``)
    for the C search and for the final fit. cg_search: {C: ``CGState``} of the C search's solves.
    cg_final: the final solve's ``CGState``.

    ``parts()`` names each state reached, as a caller saves them one file each ("gram", "kernel",
    "cg-prep-search", "cg-prep-final", "cg-search-C<C>", "cg-final"), ``from_parts`` reads them back.
    """

    gram: GramStats | None = None
    kernel: KernelStats | None = None
    cg_prep_search: CGRidge | None = None
    cg_prep_final: CGRidge | None = None
    cg_search: dict | None = None
    cg_final: CGState | None = None

    @staticmethod
    def search_part(C: float) -> str:
        """The name of the part ``cg_search[C]``."""
        return f"{_SEARCH}{_c_name(C)}"

    def parts(self) -> dict[str, Any]:
        """{name: state} of the states reached."""
        out = {name.replace("_", "-"): part for name, part in zip(self._fields, self)
               if part is not None and name != "cg_search"}
        out.update({self.search_part(C): part for C, part in (self.cg_search or {}).items()})
        return out

    @classmethod
    def from_parts(cls, parts: Mapping[str, Any]) -> "ClassifierState":
        """The state of ``parts`` (as ``parts()`` names them; other names are ignored)."""
        search = {float(name[len(_SEARCH):]): part for name, part in parts.items() if name.startswith(_SEARCH)}
        fields = {name.replace("-", "_"): part for name, part in parts.items()}
        return cls(**{name: fields.get(name) for name in cls._fields if name != "cg_search"},
                   cg_search=search or None)
