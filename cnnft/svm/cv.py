"""Cross-validated choice of C: fold assignment, the held-out AP table and the best C per class.

Rows are assigned to ``folds`` folds by a seeded random permutation (``fold_ids``); for each
class and C the held-out scores of each fold give a VOC07 11-point AP ("ignore" rows left out),
averaged over the folds in which the class has a held-out positive. The best C per class wins,
ties going to the smaller C.

Why not scikit-learn's splitters: the folds must stay the ones every earlier result was computed
with, and neither splitter reproduces them. ``fold_ids`` puts row ``perm[i]`` of a
``torch.randperm`` (seeded torch generator) in fold ``i % folds``; ``KFold(shuffle=True,
random_state=seed)`` draws its permutation from NumPy's ``RandomState`` and cuts it into
contiguous blocks, so its folds differ for every seed (checked: 0 of seeds 0-9 give the same
assignment for n = 101, 3 folds). ``StratifiedKFold`` needs one label per row, and the probes'
labels are multi-label ``[N, classes]`` (an image holds several classes), for which no
stratification is defined. Feeding ``KFold(shuffle=False)`` a hand-made order would reproduce the
folds only by doing ``fold_ids``' work first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cnnft.metrics import average_precision
from cnnft.svm.config import SVMConfig


def fold_ids(n: int, folds: int, seed: int) -> Tensor:
    """Seeded random assignment of ``n`` rows to ``folds`` folds of (almost) equal size."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ids = torch.empty(n, dtype=torch.long)
    ids[perm] = torch.arange(n) % folds
    return ids


def cv_table(scores: np.ndarray, y: np.ndarray, keep: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Mean held-out AP over folds: ``scores`` [nC, n, folds, N] (full rows), ``y``/``keep`` [N, n]."""
    n_c, n, folds, _ = scores.shape
    table = np.full((n, n_c), np.nan)
    for cls in range(n):
        valid = [f for f in range(folds) if (y[:, cls] & keep[:, cls] & (fold == f)).any()]
        for ci in range(n_c):
            aps = []
            for f in valid:
                rows = keep[:, cls] & (fold == f)
                aps.append(average_precision(scores[ci, cls, f, rows], y[rows, cls]))
            if aps:
                table[cls, ci] = float(np.mean(aps))
    return table


def best_c(table: np.ndarray, c_grid: Sequence[float]) -> Tensor:
    """Per class, the C of the highest CV AP (ties and all-NaN rows: the smallest such C)."""
    order = np.argsort(c_grid, kind="stable")
    best = []
    for row in table:
        r = np.nan_to_num(row[order], nan=-np.inf)
        best.append(c_grid[order[int(np.argmax(r >= r.max()))]])
    return torch.tensor(best, dtype=torch.float64)


def fold_masks(n: int, cfg: SVMConfig, device: torch.device, full: bool) -> tuple[Tensor, Tensor]:
    """``fold_ids`` (all zeros below 2 folds) and the row masks [n, folds (+1)] of the training
    rows of each CV fold, plus (``full``) one of all rows."""
    fold = fold_ids(n, cfg.folds, cfg.seed) if cfg.folds >= 2 else torch.zeros(n, dtype=torch.long)
    cols = [fold != f for f in range(cfg.folds)] if cfg.folds >= 2 else []
    if full:
        cols.append(torch.ones(n, dtype=torch.bool))
    return fold, torch.stack(cols, 1).to(device)


