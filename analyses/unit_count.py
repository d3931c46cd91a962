"""``unit_count``: how many pool5 units does each class need? (paper Sec. 5.2, Fig. 3, 4, Table 6).

Per class, a linear SVM on the spatial-max pool5 vector (one value per filter: 256 at paper
scale, the number of pool5 channels in general) ranks the units by ``|w|`` (Fig. 3); SVMs
retrained on the top ``k`` units alone give the AP(k) curve (Fig. 4), and the smallest ``k``
reaching 50% and 90% of the AP with all units is Table 6.

Protocol: VOC07 ground-truth boxes (``task: gtbox``, the default of
``conf/analyses/unit_count.yaml``: Fig. 4's caption "classify ground truth bounding boxes"), or
image classification (``task: image``, the class default here; Sec. 5.2's text speaks of
classifying an image; trainval -> test; the devkit's difficult-only images are left out of
training and evaluation). The results JSON records the task (``summary.task``). Features are
normalised as by the probes (``probe.normalize``, on the full vector, before units are dropped,
so a subset keeps the magnitudes it had in the full vector); C per class is chosen by
cross-validation on all units (``cnnft.svm.fit_probe``) and kept for every k. The "full AP" is
the AP at ``k`` = all units.

All classes x all k are one batched solve (``cnnft.svm.train_svms`` with a per-problem
``feature_mask``: problem (class, k) may use only that class's top-k units); ``k`` values above
the number of units are dropped and the number of units is always included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cnnft.analysis import Analysis, AnalysisContext, class_panels, save_figure, write_table
from cnnft.data.voc import VOC_CLASSES
from cnnft.errors import ConfigError
from cnnft.metrics import average_precision
from cnnft.svm import LinearScorer, SVMConfig, fit_probe, train_svms

PAPER_KS = (1, 2, 3, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 80, 100, 128, 256)
TASKS = ("image", "gtbox")


def clip_ks(ks: Sequence[int], units: int) -> list[int]:
    """The ``k`` values up to ``units``, sorted and distinct, ending at ``units``."""
    if any(int(k) < 1 for k in ks):
        raise ConfigError(f"unit_count ks must be positive, got {list(ks)}")
    return sorted({int(k) for k in ks if k < units} | {units})


def unit_count_curves(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                      ks: Sequence[int] = PAPER_KS, svm: SVMConfig | None = None,
                      ignore_train: Tensor | None = None, ignore_test: Tensor | None = None,
                      ap_mode: str = "voc07") -> tuple[list[int], np.ndarray, Tensor]:
    """AP(k) of per-class SVMs on each class's top-k units (module doc).

    ``x_*`` ``[N, U]`` unit features, ``y_*`` ``[N, n]`` bool labels, ``ignore_*`` ``[N, n]``.
    Returns the k values used, ``ap`` ``[n, len(ks)]`` and the unit ranking ``[n, U]``
    (most important first)."""
    svm = svm or SVMConfig()
    probe = fit_probe(x_train, y_train, cfg=svm, ignore=ignore_train)
    units = x_train.shape[1]
    ks = clip_ks(ks, units)
    order = torch.sort(probe.W.abs(), dim=1, descending=True, stable=True).indices.cpu()   # [n, U]
    n = order.shape[0]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(units).expand(n, units))
    kk = torch.tensor(ks)
    mask = (rank[:, None, :] < kk[None, :, None]).reshape(n * len(ks), units)          # (class, k) rows
    y = torch.as_tensor(y_train).bool().repeat_interleave(len(ks), dim=1)
    ignore = None if ignore_train is None else torch.as_tensor(ignore_train).repeat_interleave(len(ks), 1)
    W, b = train_svms(probe.normalized(x_train), y, probe.c.repeat_interleave(len(ks)), cfg=svm,
                      ignore=ignore, feature_mask=mask)
    subsets = LinearScorer(W, b, probe.normalize, probe.scale)  # (class, k) SVMs on the probe's features
    scores = subsets.scores(x_test).double().cpu().numpy()
    yt = torch.as_tensor(y_test).bool().numpy()
    it = None if ignore_test is None else torch.as_tensor(ignore_test).bool().numpy()
    ap = np.zeros((n, len(ks)))
    for c in range(n):
        for j in range(len(ks)):
            ap[c, j] = average_precision(scores[:, c * len(ks) + j], yt[:, c],
                                         difficult=None if it is None else it[:, c], mode=ap_mode)
    return ks, ap, order


def units_needed(ks: Sequence[int], ap: np.ndarray, fractions: Sequence[float] = (0.5, 0.9)
                 ) -> np.ndarray:
    """``[n, len(fractions)]`` the smallest k whose AP reaches ``fraction`` of the AP at the
    largest k (all units), per class."""
    full = ap[:, -1:]
    out = np.zeros((ap.shape[0], len(fractions)), dtype=np.int64)
    for i, f in enumerate(fractions):
        reached = ap >= f * full - 1e-12
        out[:, i] = np.asarray(ks)[reached.argmax(1)]
    return out


def plot_ap_curves(ks: Sequence[int], ap: np.ndarray, classes: Sequence[str]) -> Any:
    """Fig. 4: AP against the number of units, one panel per class, with the 50%/90% levels."""
    fig, panels = class_panels(classes, xlabel="number of units (top |w| of the class's SVM)",
                               ylabel="AP (%)", height=2.3, sharex=True)
    for c, ax in enumerate(panels):
        ax.plot(ks, 100 * ap[c], "o-", ms=3)
        for f in (0.5, 0.9):
            ax.axhline(100 * f * ap[c, -1], color="gray", lw=0.6, ls="--")
        ax.set_xscale("log")
    fig.tight_layout()
    return fig


class UnitCount(Analysis):
    """AP(k) of per-class SVMs on the top-k spatial-max units of a layer (module doc).

    Logged keys: ``unit_count/<layer>/full_mAP``, ``unit_count/<layer>/mean_k50`` and
    ``unit_count/<layer>/mean_k90`` (mean over classes). Files: ``results/unit_count.json|csv``
    (rows ``class, k, ap``), ``results/unit_count_summary.json|csv`` (rows ``class, full_ap,
    k50, k90``) and ``figures/unit_count.png`` (Fig. 4).
    """

    name: ClassVar[str] = "unit_count"

    def __init__(self, *, layer: str = "pool5", task: str = "image", ks: Sequence[int] = PAPER_KS,
                 svm: dict[str, Any] | None = None, train_split: str = "trainval", test_split: str = "test",
                 train_difficult: bool = False, ap_mode: str = "voc07", center_crop: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ConfigError(f"unit_count task={task!r}; expected one of {list(TASKS)}")
        clip_ks(ks, max(ks) if ks else 1)
        self.layer, self.task, self.ks = layer, task, [int(k) for k in ks]
        self.svm = SVMConfig.from_mapping(svm, "analyses.unit_count.svm")
        self.train_split, self.test_split = train_split, test_split
        self.train_difficult, self.ap_mode, self.center_crop = train_difficult, ap_mode, center_crop

    def _split(self, ctx: AnalysisContext, split: str) -> Any:
        from cnnft.probing import gtbox_split, image_split

        return image_split(ctx, split, center_crop=self.center_crop) if self.task == "image" \
            else gtbox_split(ctx, split)

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        from cnnft.ablations import spatial_max
        from cnnft.probing import check_positives, layer_features

        (layer,) = getattr(model, "net", model).check_layers([self.layer])
        train, test = self._split(ctx, self.train_split), self._split(ctx, self.test_split)
        for split in (train, test):
            check_positives(split, ctx.voc_root)
        xs = []
        for split in (train, test):
            x = layer_features(model, split, [layer], ctx)[layer]
            xs.append(spatial_max(x) if x.dim() == 4 else x)
        with torch.inference_mode():
            ks, ap, _ = unit_count_curves(
                xs[0], torch.from_numpy(train.labels), xs[1], torch.from_numpy(test.labels), ks=self.ks,
                svm=self.svm, ignore_train=None if self.train_difficult else torch.from_numpy(train.ignore),
                ignore_test=torch.from_numpy(test.ignore), ap_mode=self.ap_mode)
        needed = units_needed(ks, ap)
        rows = [{"class": cls, "k": k, "ap": float(ap[c, j])} for c, cls in enumerate(VOC_CLASSES)
                for j, k in enumerate(ks)]
        summary_rows = [{"class": cls, "full_ap": float(ap[c, -1]), "k50": int(needed[c, 0]),
                         "k90": int(needed[c, 1])} for c, cls in enumerate(VOC_CLASSES)]
        metrics = {f"{self.name}/{layer}/full_mAP": float(ap[:, -1].mean()),
                   f"{self.name}/{layer}/mean_k50": float(needed[:, 0].mean()),
                   f"{self.name}/{layer}/mean_k90": float(needed[:, 1].mean())}
        recorded = {**metrics, "task": self.task, "layer": layer}  # the report labels Fig. 4 by it
        write_table(ctx, self.name, rows, summary=recorded)
        write_table(ctx, f"{self.name}_summary", summary_rows, summary=recorded)
        save_figure(ctx, plot_ap_curves(ks, ap, VOC_CLASSES), self.name)
        return metrics
