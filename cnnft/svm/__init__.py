"""Linear SVMs: one-vs-rest (squared-)hinge SVMs for many classes, C values and folds at once.

- ``config``: ``SVMConfig`` (``conf/svm/``: ``probe.yaml`` for the probes and units per class,
  ``rcnn.yaml`` for R-CNN's detectors) and the solver's precision (``dtype="auto"``);
- ``solver``: the batched truncated-Newton solver (squared hinge, smoothed hinge);
- ``cv``: folds, held-out AP and the best C per class;
- ``scorer``: ``LinearScorer`` (weights, bias, feature normalisation) that scores probes, units
  per class and detectors, and the mean-norm scale;
- ``train``: ``train_svms``, ``select_c``, ``fit_probe`` (a ``Probe``).

The scikit-learn reference (``LinearSVC`` one problem at a time) is a test helper,
``tests/svm_reference.py``, passed as ``solver=`` to the entry points of ``train``.
"""

from cnnft.svm.config import SVMConfig, relative_spread, resolved, solver_dtype
from cnnft.svm.cv import fold_ids
from cnnft.svm.scorer import LinearScorer, mean_norm_scale, normalize_features
from cnnft.svm.solver import GridSolver, SolveLabel, solve_grid
from cnnft.svm.train import Probe, fit_probe, select_c, train_svms

__all__ = [
    "GridSolver", "LinearScorer", "Probe", "SVMConfig", "SolveLabel", "fit_probe", "fold_ids",
    "mean_norm_scale", "normalize_features", "relative_spread", "resolved", "select_c", "solve_grid",
    "solver_dtype", "train_svms",
]
