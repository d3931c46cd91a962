"""Average precision as PASCAL VOC computes it: 11-point interpolated (VOC2007) or area (VOC2010+).

Ties: items with equal scores enter the ranking together, so precision/recall are evaluated only
at distinct score thresholds. The devkit sorts with a stable sort and so makes AP depend on the
input order among tied items; grouping them makes AP a function of the (score, label) multiset.
For distinct scores both give the same number.

"Difficult" items are removed before ranking: they count neither as positives nor as negatives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

MODES = ("voc07", "area")

#: numpy array, torch tensor or a plain sequence of numbers
ArrayLike = np.ndarray | torch.Tensor


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown AP mode {mode!r}; expected one of {list(MODES)}")


def _to_numpy(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``x`` (numpy, torch or sequence) as a numpy array of ``ndim`` dimensions."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.to(torch.float64) if x.is_floating_point() else x
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    return arr


def _as_bool(arr: np.ndarray, name: str) -> np.ndarray:
    """A boolean or 0/1 array as booleans; any other value is an error."""
    if arr.dtype == np.bool_:
        return arr
    bad = np.unique(arr[(arr != 0) & (arr != 1)])
    if bad.size:
        raise ValueError(f"{name} must be boolean or 0/1, got value(s) {bad[:5].tolist()}")
    return arr.astype(bool)


def _as_scores(arr: np.ndarray) -> np.ndarray:
    scores = arr.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN value(s); cannot rank them")
    return scores


def precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest threshold first.

    ``labels`` is boolean with at least one positive; tied scores enter together."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    # last item of each run of equal scores (s[1:] != s[:-1], not diff: inf - inf is nan)
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
    tp = np.cumsum(hits)[ends]
    seen = ends + 1
    return tp / seen, tp / tp[-1]


def _envelope(precision: np.ndarray) -> np.ndarray:
    """Non-increasing envelope: at each point, the max precision at that point or any later one."""
    return np.maximum.accumulate(precision[::-1])[::-1]


def _ap_voc07(precision: np.ndarray, recall: np.ndarray) -> float:
    """Mean over t in {0, 0.1, ..., 1} of the max precision at recall >= t (0 if none)."""
    # i/10 is the correctly rounded t, so recall k/n == t compares equal (np.arange(0, 1.1, .1)
    # gives 0.30000000000000004 and would miss recall 0.3)
    t = np.arange(11) / 10
    first = np.searchsorted(recall, t, side="left")
    return float(np.append(_envelope(precision), 0.0)[first].mean())


def _ap_area(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision envelope, with the recall steps of the PR curve."""
    return float(np.sum(np.diff(recall, prepend=0.0) * _envelope(precision)))


def interpolated_ap(precision: np.ndarray, recall: np.ndarray, *, mode: str = "voc07") -> float:
    """AP of a precision/recall curve given at increasing recall (highest threshold first).

    Recall need not reach 1 (object detection: missed objects); precision beyond the last point
    counts as 0. Shared by :func:`average_precision` and ``cnnft.detection.evaluation``."""
    _check_mode(mode)
    return _ap_voc07(precision, recall) if mode == "voc07" else _ap_area(precision, recall)


def average_precision(scores: ArrayLike, labels: ArrayLike, *, difficult: ArrayLike | None = None,
                      mode: str = "voc07") -> float:
    """AP of ranking ``scores`` (1-D, higher = more confident) against ``labels`` (boolean or 0/1).

    ``difficult``: optional boolean mask of items to ignore entirely. ``mode``: ``"voc07"``
    (11-point interpolated, what the paper reports) or ``"area"`` (VOC2010+). Tied scores enter
    the ranking together (see the module docstring). Raises ValueError when no positive is left."""
    _check_mode(mode)
    s = _as_scores(_to_numpy(scores, "scores", 1))
    y = _as_bool(_to_numpy(labels, "labels", 1), "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if difficult is not None:
        d = _as_bool(_to_numpy(difficult, "difficult", 1), "difficult")
        if d.shape != s.shape:
            raise ValueError(f"difficult has length {d.size}, expected {s.size} like scores")
        s, y = s[~d], y[~d]
    if not y.any():
        raise ValueError(f"class has no positives; AP is undefined ({y.size} non-difficult item(s), "
                         "all negative)")
    precision, recall = precision_recall(s, y)
    return interpolated_ap(precision, recall, mode=mode)


def mean_average_precision(scores: ArrayLike, labels: ArrayLike, *, difficult: ArrayLike | None = None,
                           mode: str = "voc07") -> tuple[np.ndarray, float]:
    """Per-class AP of ``[N, C]`` scores/labels (optional ``[N, C]`` difficult mask) and their mean."""
    s = _to_numpy(scores, "scores", 2)
    y = _to_numpy(labels, "labels", 2)
    d = None if difficult is None else _to_numpy(difficult, "difficult", 2)
    for name, arr in (("labels", y), ("difficult", d)):
        if arr is not None and arr.shape != s.shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {s.shape} like scores")
    per_class = np.empty(s.shape[1])
    for c in range(s.shape[1]):
        try:
            per_class[c] = average_precision(s[:, c], y[:, c], difficult=None if d is None else d[:, c],
                                             mode=mode)
        except ValueError as err:
            raise ValueError(f"class {c}: {err}") from err
    return per_class, float(per_class.mean())


def _bool_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.bool:
        bad = t[(t != 0) & (t != 1)]
        if bad.numel():
            raise ValueError(f"{name} must be boolean or 0/1, got value(s) {bad.unique()[:5].tolist()}")
        t = t != 0
    return t


class AveragePrecision(Metric):
    """Streaming :func:`average_precision`: ``update`` appends, ``compute`` ranks everything.

    States are lists concatenated across ranks (``dist_reduce_fx="cat"``)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, mode: str = "voc07", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_mode(mode)
        self.mode = mode
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("difficult", default=[], dist_reduce_fx="cat")

    def update(self, scores: ArrayLike, labels: ArrayLike, difficult: ArrayLike | None = None) -> None:
        s = torch.as_tensor(scores)
        y = _bool_tensor(labels, "labels")
        d = torch.zeros_like(y) if difficult is None else _bool_tensor(difficult, "difficult")
        for name, t in (("scores", s), ("labels", y), ("difficult", d)):
            if t.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
            if t.shape != s.shape:
                raise ValueError(f"{name} has length {t.numel()}, expected {s.numel()} like scores")
        self.scores.append(s.detach().to(self.device, torch.float64))
        self.labels.append(y.to(self.device))
        self.difficult.append(d.to(self.device))

    def compute(self) -> torch.Tensor:
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError("AveragePrecision.compute() called before any update(); nothing to rank")
        ap = average_precision(dim_zero_cat(self.scores), dim_zero_cat(self.labels),
                               difficult=dim_zero_cat(self.difficult), mode=self.mode)
        return torch.tensor(ap, device=self.device)
