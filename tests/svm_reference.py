"""scikit-learn's ``LinearSVC`` as a reference solver for ``cnnft.svm`` (tests and bench only).

``sklearn_solver(max_iter)`` is a ``cnnft.svm.GridSolver``: passed as ``solver=`` to
``train_svms``, ``select_c`` or ``fit_probe`` it fits every (C, class, row mask) problem with one
``LinearSVC`` at a time (as VISSL's VOC07 SVMs), ignored rows left out, and returns the solutions
in the torch solver's layout. It never calls the torch solver: a training set with one class
only (which ``LinearSVC`` refuses; a zero-weight row of the other class does not help, liblinear
drops it) is solved in liblinear's dual by SciPy's L-BFGS-B (``one_class_dual``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cnnft.svm import GridSolver, SolveLabel, SVMConfig
from cnnft.svm.solver import report_unconverged


def linear_svc(x64: np.ndarray, y: np.ndarray, c: float, cfg: SVMConfig, max_iter: int
               ) -> tuple[np.ndarray, bool]:
    """LinearSVC on rows ``x64`` [n, D] with bool labels ``y`` [n]: ``[D+1]`` weights with the bias
    weight last (``b = B * w[D]``) and whether it stopped at ``max_iter`` (ConvergenceWarning)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    if y.all() or not y.any():  # one class (module doc)
        return one_class_dual(x64, y, c, cfg, max_iter)
    svc = LinearSVC(C=c, loss=cfg.loss, penalty="l2", dual=True if cfg.loss == "hinge" else "auto",
                    tol=cfg.tol, max_iter=max_iter, class_weight={1: cfg.pos_weight, 0: 1.0},
                    fit_intercept=True,
                    intercept_scaling=cfg.bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(x64, y.astype(np.int64))
    stopped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return np.append(svc.coef_[0], svc.intercept_[0] / cfg.bias), stopped


def one_class_dual(x64: np.ndarray, y: np.ndarray, c: float, cfg: SVMConfig, max_iter: int
                   ) -> tuple[np.ndarray, bool]:
    """liblinear's dual (``max sum a - |sum a_i t_i [x_i, B]|^2 / 2`` minus ``sum a_i^2 / (4 C_i)``
    for the squared hinge; ``0 <= a_i <= C_i`` for the hinge) by L-BFGS-B: the ``[D+1]`` primal
    weights ``w = sum a_i t_i [x_i, B]`` and whether it stopped at ``max_iter``."""
    from scipy.optimize import minimize

    Z = np.hstack([x64, np.full((len(x64), 1), cfg.bias)]) * np.where(y, 1.0, -1.0)[:, None]
    cw = c * np.where(y, cfg.pos_weight, 1.0)
    squared = cfg.loss == "squared_hinge"

    def negative_dual(a: np.ndarray) -> tuple[float, np.ndarray]:
        w = Z.T @ a
        value, grad = 0.5 * w @ w - a.sum(), Z @ w - 1
        if squared:
            value, grad = value + a @ (a / (4 * cw)), grad + a / (2 * cw)
        return value, grad

    res = minimize(negative_dual, np.zeros(len(Z)), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None if squared else u) for u in cw],
                   options={"maxiter": max_iter, "ftol": 0.0, "gtol": 1e-12})
    return Z.T @ res.x, res.status == 1  # 1: iteration limit


def sklearn_solver(max_iter: int = 2000) -> GridSolver:
    """A ``GridSolver`` fitting one ``LinearSVC`` (``max_iter`` iterations) per problem."""

    def solve(x: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float],
              cfg: SVMConfig, *, stats: dict | None = None, columns: Tensor | None = None,
              init: Tensor | None = None, label: SolveLabel | None = None) -> Tensor:
        x64 = x.detach().cpu().numpy().astype(np.float64)
        yn, seen = y.cpu().numpy(), (weight > 0).cpu().numpy()
        mn = masks.cpu().numpy()
        out = np.zeros((len(c_values), y.shape[1], mn.shape[1], x.shape[1] + 1))
        failed = []
        for cls in range(y.shape[1]):
            keep = None if columns is None else np.append(columns[cls].cpu().numpy(), True)  # + bias
            for ci, c in enumerate(c_values):
                for j in range(mn.shape[1]):
                    rows = mn[:, j] & seen[:, cls]
                    if keep is None:
                        out[ci, cls, j], stopped = linear_svc(x64[rows], yn[rows, cls], c, cfg, max_iter)
                    else:
                        out[ci, cls, j, keep], stopped = linear_svc(x64[rows][:, keep[:-1]], yn[rows, cls],
                                                                    c, cfg, max_iter)
                    if stopped:
                        failed.append((cls, c, j))
        report_unconverged(failed, label, stats, limit_name=f"LinearSVC max_iter={max_iter}", cfg=cfg)
        return torch.from_numpy(out).to(x.device, x.dtype)

    return solve
