"""``detection``: R-CNN object detection on VOC07 with linear SVMs on region features of each
layer at or after pool5 (paper Tables 2, 3, 5, 8).

Per-class SVMs are trained on trainval by hard-negative mining and tested on up to
``max_proposals`` proposals (``conf/proposals``) per test image (top ``top_k`` per class and image,
R-CNN's per-class test-set cap ``max_per_set``, NMS at ``nms_iou``), scored with the VOC07
detection AP (``cnnft.detection``). Feature ablations
(``ablations=[...]``, paper Table 5) apply to pool5. Logged keys: ``detection/<layer>/mAP`` and
``detection/<layer>/<ablation>/mAP``. Files: ``results/detection.json|csv`` (rows: layer,
ablation, class, ap; the mAP rows also carry the mining figures and ``unconverged_svms``) and
``figures/detection.png``
(per-class AP bars, one series per layer/ablation); ``results/detection_scores.npz``: the matched
test detections of every detector (``cnnft.scores``), for the report's bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from cnnft.analysis import Analysis, AnalysisContext, save_figure, write_table
from cnnft.data.proposals import ProposalSource
from cnnft.data.transforms import as_mean
from cnnft.detection.evaluation import max_per_set_value
from cnnft.detection.mining import RCNN_SVM, MiningConfig
from cnnft.detection.pipeline import Ablation, DetectionSettings, run_detection
from cnnft.probing import map_metrics
from cnnft.scores import DetectionScores, save_arrays, scores_path
from cnnft.svm import SVMConfig


def plot_per_class(rows: Sequence[dict[str, Any]], title: str) -> Any:
    """Bars of AP per class (and mAP), one series per (layer, ablation)."""
    from cnnft.plotting import pyplot

    plt = pyplot()
    series = list(dict.fromkeys((r["layer"], r["ablation"]) for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(classes) * max(1, len(series)) ** 0.5), 3.8))
    width = 0.8 / len(series)
    for i, (layer, ablation) in enumerate(series):
        ap = {r["class"]: r["ap"] for r in rows if (r["layer"], r["ablation"]) == (layer, ablation)}
        label = layer if ablation == "unroll" else f"{layer} {ablation}"
        ax.bar([j + i * width for j in range(len(classes))], [100 * ap.get(c, 0.0) for c in classes],
               width=width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes, rotation=60, ha="right")
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


class Detection(Analysis):
    """R-CNN detection per layer and ablation (see the module doc and ``cnnft.detection``)."""

    name: ClassVar[str] = "detection"
    title: ClassVar[str] = "VOC07 detection: R-CNN SVMs per layer"

    def __init__(self, *, layers: Sequence[str] = ("pool5", "relu6", "relu7"),
                 ablations: Mapping[str, Ablation] | None = None, svm: Mapping[str, Any] | None = None,
                 mining: Mapping[str, Any] | None = None,
                 proposals: ProposalSource | Mapping[str, Any] | None = None,
                 max_proposals: int = 2000, train_split: str = "trainval", test_split: str = "test",
                 top_k: int = 100, max_per_set: int | str | None = "rcnn",
                 nms_iou: float = 0.3, match_iou: float = 0.5, ap_mode: str = "voc07",
                 norm_sample_images: int = 100, shard_images: int = 64, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from cnnft.ablations import unroll

        self.layers, self.ablations = list(layers), dict(ablations or {"unroll": unroll})
        mining = dict(mining or {})
        self.norm_sample_images = int(mining.pop("norm_sample_images", norm_sample_images))
        svm_cfg = SVMConfig.from_mapping(svm, "analyses.detection.svm", base=RCNN_SVM)  # conf/svm/rcnn.yaml
        self.mining = MiningConfig(svm=svm_cfg, **mining)
        # conf/proposals, built by its _target_ in conf/analyses/detection.yaml (or a mapping of it)
        source = proposals if isinstance(proposals, ProposalSource) else ProposalSource.from_config(proposals)
        self.proposal_cache = source.cache_dir
        self.compute_missing, self.proposal_workers = source.compute_missing, source.workers
        self.proposal_settings = source.settings
        max_per_set_value(max_per_set, 1)  # refused here, before anything runs
        self.options = dict(max_proposals=max_proposals, train_split=train_split, test_split=test_split,
                            top_k=top_k, max_per_set=max_per_set, nms_iou=nms_iou, match_iou=match_iou,
                            ap_mode=ap_mode,
                            shard_images=shard_images, seed=seed)

    def settings(self, ctx: AnalysisContext) -> DetectionSettings:
        cache = self.proposal_cache or (ctx.cache.root.parent / "proposals" if ctx.cache
                                        else ctx.output_dir / "cache" / "proposals")
        return DetectionSettings(voc_root=ctx.voc_root, crop=ctx.input_size, pad=ctx.context_pad,
                                 mean=as_mean(ctx.mean), proposal_cache=Path(cache),
                                 proposals=self.proposal_settings, compute_missing=self.compute_missing,
                                 proposal_workers=self.proposal_workers, mining=self.mining,
                                 norm_sample_images=self.norm_sample_images, batch_size=ctx.batch_size,
                                 **self.options)

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        scores = DetectionScores()
        rows = run_detection(model, layers=self.layers, ablations=self.ablations,
                             settings=self.settings(ctx), cache=ctx.cache,
                             output_dir=ctx.output_dir, device=ctx.device, progress=ctx.progress,
                             voc_images=ctx.voc_images, scores=scores)
        metrics = map_metrics(self.name, rows)
        write_table(ctx, self.name, rows, summary=metrics)
        save_arrays(scores_path(ctx.output_dir / "results", self.name), scores.arrays())
        save_figure(ctx, plot_per_class(rows, self.title), self.name)
        return metrics
