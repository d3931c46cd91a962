"""``unit_selectivity``: how class-specific are single pool5 units? (paper Sec. 5.1, grandmother cells).

A *unit* is one filter (channel) of the layer: the paper estimates ``P(class | activation of unit
i > t)`` "for all 256 filters in layer 5", where each of a box's 6x6 positions is one sample of
the filter ("for each ground truth bounding box we get 36 activation samples for a particular
unit. Given N boxes we end up with 36N samples for each filter"). So samples are (box, position)
pairs labelled with the box's class, and a unit is a channel, not a (channel, position) pair.

For each unit the samples are thresholded at ``num_thresholds`` (1000) thresholds -- equally
spaced values from the unit's max to its min (``threshold_mode: value``, the literal
"activation > t") or the top ``ceil(j*N/T)`` samples (``rank``) -- and at each threshold the
precision ``P(class | above)`` and the support (the number of the class's samples above it) are
computed for every class at once: one sort/bincount per unit (the kernels of
``cnnft.thresholds``, shared with ``analyses.filter_entropy``), a cumulative sum over
thresholds, no loop over thresholds or classes.

A unit's score for a class is its best precision over the thresholds whose support is at least
``max(min_support, min_recall * samples of the class)``; the ``top`` units per class by that
score are reported (ties: the larger support, then the lower unit index). Difficult boxes are
left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cnnft.analysis import Analysis, AnalysisContext, class_panels, save_figure, write_table
from cnnft.data.voc import VOC_CLASSES
from cnnft.errors import ConfigError, DataError
from cnnft.thresholds import check_threshold_mode, threshold_counts, threshold_values


def selectivity_curves(rows: Callable[[int, int], Tensor], num_units: int, labels: Tensor,
                       num_classes: int, *, num_thresholds: int = 1000, threshold_mode: str = "value",
                       chunk: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Per unit, threshold and class: ``hits`` (class samples above the threshold, ``[U, T, C]``
    int64), ``kept`` (all samples above it, ``[U, T]``) and the threshold values ``[U, T]``.

    ``rows(start, stop)`` returns units ``start:stop`` as ``[stop - start, N]`` activations;
    ``labels`` ``[N]`` the sample classes."""
    counts_of = threshold_counts(threshold_mode)
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"need labels in [0, {num_classes}), got {labels.numel()} samples")
    hits, values = [], []
    for start in range(0, num_units, chunk):
        at = rows(start, min(start + chunk, num_units))
        if at.shape[1] != labels.numel():
            raise ValueError(f"unit rows must be [k, {labels.numel()}], got {tuple(at.shape)}")
        counts = counts_of(at, labels.to(at.device), num_thresholds, num_classes).cumsum(1)
        hits.append(counts.cpu())
        values.append(threshold_values(at, num_thresholds, threshold_mode).cpu())
    hit = torch.cat(hits)
    return hit, hit.sum(-1), torch.cat(values)


def best_units(hits: Tensor, kept: Tensor, class_counts: Tensor, *, min_support: int = 10,
               min_recall: float = 0.05, top: int = 5) -> list[dict[str, Any]]:
    """Per class (index), the ``top`` units by best precision at the required support (see module
    doc): rows ``{class, rank, unit, precision, support, threshold_index}``; classes without
    samples are skipped, units that never reach the support are not ranked."""
    precision = hits.double() / kept.double().clamp_min(1)[..., None]           # [U, T, C]
    need = torch.clamp(torch.ceil(min_recall * class_counts.double()), min=float(min_support))
    need = torch.minimum(need, class_counts.double())                            # reachable
    ok = hits.double() >= need
    scored = torch.where(ok, precision, torch.full_like(precision, -1.0))
    # best threshold per (unit, class): highest precision, then highest support
    key = scored * (hits.shape[1] + 1) * (int(kept.max()) + 1) + torch.where(ok, hits.double(), 0.0)
    best_t = key.argmax(1)                                                       # [U, C]
    rows = []
    for c in range(hits.shape[2]):
        if class_counts[c] == 0:
            continue
        t = best_t[:, c]
        units = torch.arange(hits.shape[0])
        prec = scored[units, t, c]
        supp = hits[units, t, c]
        order = sorted((u for u in range(hits.shape[0]) if prec[u] >= 0),
                       key=lambda u: (-float(prec[u]), -int(supp[u]), u))
        for rank, u in enumerate(order[:top], start=1):
            rows.append({"class": c, "rank": rank, "unit": u, "precision": float(prec[u]),
                         "support": int(supp[u]), "threshold_index": int(t[u])})
    return rows


def unit_rows(features: Tensor) -> tuple[Callable[[int, int], Tensor], int, int]:
    """``rows`` for ``selectivity_curves`` over a layer's ``[N, C, H, W]`` maps (every position a
    sample, box-major) or ``[N, D]`` vectors; returns ``(rows, units, positions per box)``."""
    if features.dim() == 2:
        return (lambda s, e: features[:, s:e].T), features.shape[1], 1
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W] or [N, D], got {tuple(features.shape)}")
    n, c, h, w = features.shape
    return (lambda s, e: features[:, s:e].transpose(0, 1).reshape(e - s, n * h * w)), c, h * w


def plot_top_units(hits: Tensor, kept: Tensor, class_counts: Tensor, rows: list[dict[str, Any]],
                   classes: list[str], per_class: int = 3) -> Any:
    """Precision against recall (the class's samples above the threshold) of each class's top
    units, one panel per class."""
    fig, panels = class_panels(classes, xlabel="fraction of the class's samples above the threshold",
                               ylabel="P(class | activation > threshold)", sharey=True)
    for c, ax in enumerate(panels):
        for r in [r for r in rows if r["class"] == c][:per_class]:
            u = r["unit"]
            recall = hits[u, :, c].double() / max(int(class_counts[c]), 1)
            precision = hits[u, :, c].double() / kept[u].double().clamp_min(1)
            ax.plot(recall.numpy(), precision.numpy(), label=f"unit {u}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


class UnitSelectivity(Analysis):
    """The most class-specific single units of a layer on VOC07 ground-truth boxes (module doc).

    Logged keys: ``unit_selectivity/<layer>/mean_best_precision`` (over classes, of each class's
    best unit) and ``unit_selectivity/<layer>/<class>/best_precision``. Files:
    ``results/unit_selectivity.json|csv`` (rows ``class, rank, unit, precision, support,
    threshold``) and ``figures/unit_selectivity.png`` (precision curves of the top units).
    """

    name: ClassVar[str] = "unit_selectivity"

    def __init__(self, *, layer: str = "pool5", split: str = "trainval", num_thresholds: int = 1000,
                 threshold_mode: str = "value", top: int = 5, min_support: int = 10,
                 min_recall: float = 0.05, plot_units: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_threshold_mode(threshold_mode, f"{self.name} threshold_mode")
        if num_thresholds < 1 or top < 1 or min_support < 1 or not 0 <= min_recall <= 1:
            raise ConfigError(f"unit_selectivity: need num_thresholds >= 1, top >= 1, min_support >= 1 "
                              f"and 0 <= min_recall <= 1, got {num_thresholds}, {top}, {min_support}, "
                              f"{min_recall}")
        self.layer, self.split, self.num_thresholds = layer, split, num_thresholds
        self.threshold_mode, self.top = threshold_mode, top
        self.min_support, self.min_recall, self.plot_units = min_support, min_recall, plot_units

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        from cnnft.probing import gtbox_split, layer_features

        (layer,) = getattr(model, "net", model).check_layers([self.layer])
        split = gtbox_split(ctx, self.split)
        keep = torch.from_numpy(~split.ignore[:, 0])
        if not keep.any():
            raise DataError(f"{ctx.voc_root}: split {self.split!r} has no non-difficult ground-truth box")
        box_labels = torch.from_numpy(split.labels.argmax(1))[keep]
        features = layer_features(model, split, [layer], ctx)[layer][keep]
        with torch.inference_mode():
            rows_fn, units, positions = unit_rows(features)
            labels = box_labels.repeat_interleave(positions)
            hits, kept, values = selectivity_curves(rows_fn, units, labels, len(VOC_CLASSES),
                                                    num_thresholds=self.num_thresholds,
                                                    threshold_mode=self.threshold_mode)
            class_counts = torch.bincount(labels, minlength=len(VOC_CLASSES))
            ranked = best_units(hits, kept, class_counts, min_support=self.min_support,
                                min_recall=self.min_recall, top=self.top)
        rows = [{"class": VOC_CLASSES[r["class"]], "rank": r["rank"], "unit": r["unit"],
                 "precision": r["precision"], "support": r["support"],
                 "threshold": float(values[r["unit"], r["threshold_index"]])} for r in ranked]
        best = {r["class"]: r["precision"] for r in rows if r["rank"] == 1}
        metrics = {f"{self.name}/{layer}/{cls}/best_precision": p for cls, p in best.items()}
        if best:
            metrics[f"{self.name}/{layer}/mean_best_precision"] = float(np.mean(list(best.values())))
        write_table(ctx, self.name, rows, summary=metrics)
        save_figure(ctx, plot_top_units(hits, kept, class_counts, ranked, list(VOC_CLASSES),
                                        self.plot_units), self.name)
        return metrics
