"""Training entry points: ``train_svms`` (given C), ``select_c`` (C by cross-validation) and
``fit_probe`` (normalise, choose C, refit: a ``Probe``).

``train_svms`` and ``select_c`` take the features as they are; ``fit_probe`` normalises them
(``cfg.normalize``) and its ``Probe`` (a ``LinearScorer``) applies the same normalisation to test
features (for ``"mean_norm"`` the scale learned on the training set). Every entry point solves
with ``cnnft.svm.solver.solve_grid`` unless given another ``GridSolver`` (``solver``: the tests'
scikit-learn reference, ``tests/svm_reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from cnnft.svm.config import SVMConfig, solver_dtype
from cnnft.svm.cv import best_c, cv_table, fold_masks
from cnnft.svm.scorer import LinearScorer, mean_norm_scale, normalize_features
from cnnft.svm.solver import GridSolver, SolveLabel, solve_grid


def _matrix(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    return x


def _inputs(x: Tensor, y: Tensor, ignore: Tensor | None, cfg: SVMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Features in the solver's dtype, labels as bool [N, n], class weights [N, n] (0 = ignored)."""
    x = _matrix(x)
    x = x.to(solver_dtype(x, cfg))
    y = torch.as_tensor(y, device=x.device)
    y = y[:, None] if y.dim() == 1 else y
    if y.shape[0] != x.shape[0] or y.dim() != 2:
        raise ValueError(f"labels must be [N, num_classes] with N={x.shape[0]}, got {tuple(y.shape)}")
    if y.dtype != torch.bool:
        if ((y != 0) & (y != 1)).any():
            raise ValueError("labels must be boolean or 0/1")
        y = y != 0
    weight = torch.where(y, cfg.pos_weight, 1.0).to(x.dtype)
    if ignore is not None:
        ignore = torch.as_tensor(ignore, device=x.device)
        ignore = ignore[:, None] if ignore.dim() == 1 else ignore
        if ignore.shape != y.shape:
            raise ValueError(f"ignore mask has shape {tuple(ignore.shape)}, expected {tuple(y.shape)}")
        weight = weight * (ignore == 0)
    return x, y, weight


def _split(W: Tensor, bias: float) -> tuple[Tensor, Tensor]:
    return W[..., :-1], bias * W[..., -1]


@torch.no_grad()
def train_svms(x: Tensor, y: Tensor, c: float | Tensor, *, cfg: SVMConfig, ignore: Tensor | None = None,
               feature_mask: Tensor | None = None, init: tuple[Tensor, Tensor] | None = None,
               stats: dict | None = None, label: SolveLabel | None = None,
               solver: GridSolver = solve_grid) -> tuple[Tensor, Tensor]:
    """One-vs-rest SVMs on all rows of ``x`` [N, D] (used as given, not normalised) for labels
    ``y`` [N, n] (bool or 0/1), with ``c`` one C for all classes or ``[n]`` per class; ``ignore``
    [N, n] marks rows a class must not see; ``feature_mask`` [n, D] (bool) the feature columns
    each class may use (its SVM is the one trained on those columns alone; the others get weight
    0). The columns of ``y`` need not be distinct classes: one label column per (class, subset)
    trains many subsets at once. ``init`` ``(W [n, D], b [n])``: where the torch solver starts
    (a warm start, e.g. the previous round's detectors in hard-negative mining; the solution is
    the same to the solver's tolerance).
    Solves that stop at ``max_iter`` above ``cfg.tol`` are logged as a warning naming them
    (``label``: where, class names) and counted in ``stats["unconverged"]``.
    Returns ``W`` [n, D] and ``b`` [n]."""
    x, y, weight = _inputs(x, y, ignore, cfg)
    n, d = y.shape[1], x.shape[1]
    c = torch.as_tensor(c, dtype=torch.float64).flatten().cpu()
    c = c.expand(n) if c.numel() == 1 else c
    if c.numel() != n:
        raise ValueError(f"c has {c.numel()} values for {n} classes")
    if feature_mask is not None:
        feature_mask = torch.as_tensor(feature_mask, device=x.device).bool()
        if feature_mask.shape != (n, d):
            raise ValueError(f"feature_mask has shape {tuple(feature_mask.shape)}, "
                             f"expected {(n, d)}")
    start = None
    if init is not None:
        W0, b0 = (torch.as_tensor(t, device=x.device, dtype=x.dtype) for t in init)
        if W0.shape != (n, d) or b0.shape != (n,):
            raise ValueError(f"init has shapes {tuple(W0.shape)}, {tuple(b0.shape)}; expected "
                             f"{(n, d)}, {(n,)}")
        start = torch.cat([W0, b0[:, None] / cfg.bias], 1)  # the bias feature's weight
    full = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    W = torch.zeros(n, d + 1, dtype=x.dtype, device=x.device)
    for value in sorted(set(c.tolist())):  # each class solved at its own C only
        cols = torch.nonzero(c == value).squeeze(1).to(x.device)
        sub = None if feature_mask is None else feature_mask[cols]
        names = None if label is None or label.classes is None else [label.classes[i] for i in cols.tolist()]
        sub_label = None if label is None else replace(label, classes=names)
        W[cols] = solver(x, y[:, cols], weight[:, cols], full, [value], cfg, stats=stats, columns=sub,
                         init=None if start is None else start[cols], label=sub_label)[0, :, 0]
    return _split(W, cfg.bias)


def _select(x: Tensor, y: Tensor, weight: Tensor, cfg: SVMConfig, *, full: bool, stats: dict | None,
            label: SolveLabel | None, solver: GridSolver) -> tuple[Tensor, np.ndarray, Tensor | None]:
    """CV table, best C and (with ``full``) the all-rows solutions [nC, n, D+1]."""
    fold, masks = fold_masks(x.shape[0], cfg, x.device, full)
    mask_names = [f"CV fold {f}" for f in range(cfg.folds if cfg.folds >= 2 else 0)] + ["all rows"] * full
    label = replace(label or SolveLabel(), masks=mask_names)
    W = solver(x, y, weight, masks, cfg.c_grid, cfg, stats=stats, label=label)
    n_cv = cfg.folds if cfg.folds >= 2 else 0
    if n_cv:
        Wcv, bcv = _split(W[:, :, :n_cv], cfg.bias)
        scores = torch.einsum("nd,ckfd->ckfn", x, Wcv) + bcv[..., None]
        table = cv_table(scores.double().cpu().numpy(), y.cpu().numpy(), (weight > 0).cpu().numpy(),
                         fold.numpy())
    else:
        table = np.full((y.shape[1], len(cfg.c_grid)), np.nan)
    return best_c(table, cfg.c_grid), table, (W[:, :, -1] if full else None)


@torch.no_grad()
def select_c(x: Tensor, y: Tensor, *, cfg: SVMConfig, ignore: Tensor | None = None,
             stats: dict | None = None, label: SolveLabel | None = None,
             solver: GridSolver = solve_grid) -> tuple[Tensor, Tensor]:
    """Cross-validated choice of C per class on ``x`` as given (``cnnft.svm.cv``).

    Returns ``best_c`` [n] and ``cv_ap`` [n, len(cfg.c_grid)] (mean held-out VOC07 AP; NaN for a
    class without held-out positives, whose C is then the smallest)."""
    x, y, weight = _inputs(x, y, ignore, cfg)
    best, table, _ = _select(x, y, weight, cfg, full=False, stats=stats, label=label, solver=solver)
    return best, torch.from_numpy(table)


@dataclass(kw_only=True)
class Probe(LinearScorer):
    """A fitted probe: the scorer (``W`` [n, D], ``b`` [n], ``normalize``, ``scale``), the chosen
    ``c`` [n] and ``cv_ap`` [n, len(c_grid)]."""

    c: Tensor
    cv_ap: Tensor
    c_grid: tuple[float, ...]


@torch.no_grad()
def fit_probe(x_train: Tensor, y_train: Tensor, *, cfg: SVMConfig, ignore: Tensor | None = None,
              stats: dict | None = None, label: SolveLabel | None = None,
              solver: GridSolver = solve_grid) -> Probe:
    """Normalise ``x_train`` (``cfg.normalize``), choose C per class by cross-validation and keep
    the SVMs trained on all rows with that C. One batch (torch solver) covers every class, C and
    fold plus the all-rows problems. ``stats`` receives iteration counts (torch solver) and the
    number of solves stopped at ``max_iter`` (``"unconverged"``, each logged as a warning that
    names ``label``'s where, the class, C and fold)."""
    x = _matrix(x_train)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # normalised at least in float32
    scale = mean_norm_scale(x, cfg.target_norm) if cfg.normalize == "mean_norm" else 1.0
    x = normalize_features(x, "l2") if cfg.normalize == "l2" else x * scale
    x, y, weight = _inputs(x, y_train, ignore, cfg)  # dtype "auto" judges the rows as solved
    best, table, Wfull = _select(x, y, weight, cfg, full=True, stats=stats, label=label, solver=solver)
    pick = torch.tensor([cfg.c_grid.index(v) for v in best.tolist()], device=x.device)
    W, b = _split(Wfull[pick, torch.arange(y.shape[1], device=x.device)], cfg.bias)
    return Probe(W=W, b=b, normalize=cfg.normalize, scale=scale, c=best, cv_ap=torch.from_numpy(table),
                 c_grid=cfg.c_grid)
