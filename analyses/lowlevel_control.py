"""``lowlevel_control``: the low-level baseline, linear SVMs on colour and gradient histograms.

Computed from the VOC images, not from the model (the model is ignored), with the probe protocol
of ``probe_cls`` / ``probe_gtbox`` (same splits, labels, SVM settings and AP); see
:mod:`cnnft.lowlevel` for the features. It shows how much of a task pixel statistics alone solve:
the report puts it next to the random network.

Logged keys: ``lowlevel_control/<task>/<features>/mAP`` for task ``cls`` (whole images) and
``gtbox`` (ground-truth boxes), features ``colour``, ``gradient``, ``colour+gradient``.
Files: ``results/lowlevel_control.json|csv`` (rows ``{task, features, class, ap, c}``),
``results/lowlevel_control_scores.npz`` (test decision values per task and feature set, keys
prefixed ``cls/`` and ``gtbox/``: ``cnnft.scores``) and ``figures/lowlevel_control.png`` (mAP
bars by task, one colour per feature set).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from cnnft.analysis import Analysis, AnalysisContext, save_figure, write_table
from cnnft.lowlevel import box_features, image_features, probe_features
from cnnft.probing import check_positives, gtbox_split, image_split, plot_map_by_layer
from cnnft.scores import ProbeScores, save_arrays, scores_path
from cnnft.svm import SVMConfig


def control_rows(ctx: AnalysisContext, svm: SVMConfig, *, train_split: str = "trainval",
                 test_split: str = "test", train_difficult: bool = False,
                 ap_mode: str = "voc07", scores: dict[str, ProbeScores] | None = None
                 ) -> list[dict[str, Any]]:
    """AP rows of the control on image (``cls``) and ground-truth-box (``gtbox``) classification;
    ``scores``, when given, receives each task's test items with every feature set's decision
    values (``cnnft.scores``)."""
    rows: list[dict[str, Any]] = []
    for task, make_split, features in (("cls", image_split, None), ("gtbox", gtbox_split, box_features)):
        data = []
        for split in (train_split, test_split):
            labelled = make_split(ctx, split)
            check_positives(labelled, ctx.voc_root)
            images = ctx.voc_images(split)  # the split's own images (skip_corrupt)
            x = image_features([im.path for im in images]) if features is None else features(images)
            data.append((x, labelled.labels, labelled.ignore))
        (xtr, ytr, itr), (xte, yte, ite) = data
        test_scores: dict[str, Any] = {}
        found = probe_features(xtr, ytr, None if train_difficult else itr, xte, yte, ite, svm=svm,
                               ap_mode=ap_mode, scores=test_scores)
        if scores is not None:
            scores[task] = labelled.probe_scores(test_scores)  # labelled: the test split
        rows += [{"task": task, **r} for r in found]
    return rows


class LowlevelControl(Analysis):
    name: ClassVar[str] = "lowlevel_control"

    def __init__(self, *, svm: dict[str, Any] | None = None, train_split: str = "trainval",
                 test_split: str = "test", train_difficult: bool = False, ap_mode: str = "voc07",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.svm = SVMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (svm or {}).items()})
        self.train_split, self.test_split = train_split, test_split
        self.train_difficult, self.ap_mode = train_difficult, ap_mode

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        scores: dict[str, ProbeScores] = {}
        rows = control_rows(ctx, self.svm, train_split=self.train_split, test_split=self.test_split,
                            train_difficult=self.train_difficult, ap_mode=self.ap_mode, scores=scores)
        metrics = {f"{self.name}/{r['task']}/{r['features']}/mAP": r["ap"]
                   for r in rows if r["class"] == "mAP"}
        write_table(ctx, self.name, rows, summary=metrics)
        save_arrays(scores_path(ctx.output_dir / "results", self.name),
                    {k: v for task, found in scores.items() for k, v in found.arrays(f"{task}/").items()})
        bars = [{**r, "layer": r["task"], "ablation": r["features"]} for r in rows]  # task x features
        save_figure(ctx, plot_map_by_layer(bars, "low-level control: VOC07 mAP by task and features"),
                    self.name)
        return metrics


__all__ = ["LowlevelControl", "control_rows"]
