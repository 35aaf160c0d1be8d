"""Linear classifiers on pooled features, one concern per file:

- ``linear``: standardization, the L-BFGS classifiers (one-vs-all L2-SVM, softmax regression;
  ``LOSSES``), ``train_linear``, prediction.
- ``ridge``: ridge regression from streamed Gram statistics (``gram_stats``, ``accumulate_gram``,
  ``fit_ridge``): the features are read in row blocks, never held in memory at once.
- ``tiled``: the tiled F x F linear algebra under ``ridge`` (whole-matrix OpenBLAS calls crash
  at F = 32,000).
- ``dual``: the same ridge from the N x N kernel, for features that outnumber the rows.
- ``device``: the same ridge (Gram or dual) with every pass on the accelerator, for features
  that fit in its memory: compensated float32 sums, one jit-compiled program per pass.
- ``compensated``: the device path's compensated float32 sums (TwoSum pairs) and refined solve.
- ``cg``: the same ridge objective by conjugate gradients over features read from disk (a
  Nystrom preconditioner), for features too wide for the F x F Gram matrix.
- ``spec``: ``ClassifierSpec`` (the options of a fit, their defaults defined once) and
  ``ClassifierState`` (where a fit stands: what it checkpoints and resumes from).
- ``validation``: the held-out split and the search for C (``validation_split``, ``search_C``).
- ``select``: model selection: ``validation_split``, ``search_C`` and ``fit_classifier``, the one
  entry point that chooses C on held-out rows and fits any of the three classifiers.
"""

from kmjax.classify.linear import (
    LOSSES, STORAGES, LBFGSState, LinearModel, Standardizer, TrainInfo, accuracy, fit_standardizer, init_lbfgs, predict,
    predict_features, softmax_loss, standardize, svm_loss, train_linear,
)
from kmjax.classify.dual import (DualFactor, DualFit, KernelStats, accumulate_kernel, dual_scores, empty_kernel_stats, factor_dual,
                                fit_dual, primal_model)
from kmjax.classify.cg import CGRidge, CGState, cg_iterate, init_cg, prepare_cg_ridge, solve_cg_ridge
from kmjax.classify.ridge import GramStats, accumulate_gram, empty_gram_stats, fit_ridge, gram_stats
from kmjax.classify.select import CLASSIFIERS, SOLVERS, ClassifierFit, fit_classifier, search_C, validation_split
from kmjax.classify.spec import ClassifierSpec, ClassifierState

__all__ = [
    "Standardizer", "fit_standardizer", "standardize",
    "LinearModel", "svm_loss", "softmax_loss", "LOSSES", "STORAGES", "TrainInfo", "LBFGSState", "init_lbfgs", "train_linear",
    "predict", "accuracy",
    "predict_features",
    "GramStats", "empty_gram_stats", "accumulate_gram", "gram_stats", "fit_ridge",
    "CGRidge", "prepare_cg_ridge", "CGState", "init_cg", "cg_iterate", "solve_cg_ridge",
    "KernelStats", "empty_kernel_stats", "accumulate_kernel", "DualFactor", "factor_dual", "DualFit", "fit_dual", "dual_scores", "primal_model",
    "CLASSIFIERS", "SOLVERS", "ClassifierSpec", "ClassifierState", "ClassifierFit", "validation_split", "search_C",
    "fit_classifier",
]
