"""Linear-SVM probes of layers: the shared core of ``probe_cls`` and ``probe_gtbox``.

A probe split is a dataset of network inputs with a ``[N, 20]`` boolean label matrix and an
``ignore`` mask (VOC "difficult": 0 in the devkit's class files for images, the difficult flag
for boxes). Ignored items are excluded from evaluation; in training they are excluded too by
default (``train_difficult=False``), since a difficult example is neither a clear positive nor
a negative.

``run_probes`` extracts every layer in one pass per split (cached), applies each ablation, fits
one-vs-rest SVMs on trainval and returns per-class test AP as rows
``{layer, ablation, class, ap}`` with a ``class == "mAP"`` row per (layer, ablation).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cnnft.analysis import Analysis, AnalysisContext, save_figure, write_table
from cnnft.data.datasets import WholeImageDataset, WindowDataset, collate_skipping
from cnnft.data.transforms import mean_key
from cnnft.data.voc import VOC_CLASSES, read_class_labels
from cnnft.errors import CorruptImageError, DataError
from cnnft.features import extract_cached
from cnnft.hashing import files_fingerprint
from cnnft.metrics import mean_average_precision
from cnnft.models.caffenet import PROBE_LAYERS
from cnnft.scores import ProbeScores, save_arrays, scores_path
from cnnft.svm import GridSolver, SolveLabel, SVMConfig, fit_probe, solve_grid

log = logging.getLogger(__name__)

Ablation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ProbeSplit:
    """Inputs of one split and their labels: ``labels``/``ignore`` are bool ``[N, classes]``."""

    name: str
    dataset: Dataset
    labels: np.ndarray
    ignore: np.ndarray
    transform: dict[str, Any]
    fingerprint: str = ""
    #: the VOC images of the split and the image of each item (None: item i is image i)
    image_ids: list[str] = field(default_factory=list)
    image_index: np.ndarray | None = None

    def probe_scores(self, scores: dict[str, np.ndarray] | None = None) -> ProbeScores:
        """This split's items with probe ``scores`` on them (``cnnft.scores``)."""
        index = np.arange(len(self.labels)) if self.image_index is None else self.image_index
        return ProbeScores(self.image_ids, index, self.labels, self.ignore, dict(scores or {}))


def image_split(ctx: AnalysisContext, split: str, *, center_crop: bool = False) -> ProbeSplit:
    """Whole VOC images with the devkit's image-level labels (1 positive, 0 difficult-only); the
    label rows follow ``ctx.voc_images`` (corrupt images left out with ``skip_corrupt``)."""
    images = ctx.voc_images(split)
    ids, table = read_class_labels(ctx.voc_root, split)
    row = {image_id: r for r, image_id in enumerate(ids)}
    missing = [im.image_id for im in images if im.image_id not in row]
    if missing:
        raise DataError(f"{ctx.voc_root}: the class files of split {split!r} do not list image(s) "
                        f"{missing[:5]} of ImageSets/Main/{split}.txt")
    table = table[[row[im.image_id] for im in images]]
    resize = ctx.resize if center_crop else None
    dataset = WholeImageDataset([im.path for im in images], crop=ctx.input_size, mean=ctx.mean,
                                resize=resize)
    return ProbeSplit(split, dataset, table == 1, table == 0,
                      {"kind": "image", "crop": ctx.input_size, "resize": resize, "mean": mean_key(ctx.mean)},
                      files_fingerprint([im.path for im in images]), [im.image_id for im in images])


def gtbox_split(ctx: AnalysisContext, split: str) -> ProbeSplit:
    """Every ground-truth box of a split's ``ctx.voc_images``, cropped with context and warped;
    one class each."""
    images = ctx.voc_images(split)
    index = np.concatenate([np.full(len(im.labels), i) for i, im in enumerate(images)])
    boxes = np.concatenate([im.boxes for im in images])
    classes = np.concatenate([im.labels for im in images])
    difficult = np.concatenate([im.difficult for im in images])
    dataset = WindowDataset([im.path for im in images], index, boxes, classes, crop=ctx.input_size,
                            pad=ctx.context_pad, mean=ctx.mean, mirror=False)
    labels = np.eye(len(VOC_CLASSES), dtype=bool)[classes]
    ignore = np.repeat(difficult[:, None], len(VOC_CLASSES), axis=1)
    return ProbeSplit(split, dataset, labels, ignore,
                      {"kind": "gtbox", "crop": ctx.input_size, "pad": ctx.context_pad,
                       "mean": mean_key(ctx.mean)},
                      files_fingerprint([im.path for im in images]), [im.image_id for im in images], index)


def check_positives(split: ProbeSplit, root: object) -> None:
    """Every class needs a (non-ignored) positive in the split, or its AP is undefined."""
    count = (split.labels & ~split.ignore).sum(0)
    empty = [cls for cls, n in zip(VOC_CLASSES, count, strict=True) if n == 0]
    if empty:
        raise DataError(f"{root}: split {split.name!r} ({split.transform['kind']}) has no positive "
                        f"example of class(es) {empty}; every class needs one for its AP")


def layer_features(model: nn.Module, split: ProbeSplit, layers: Sequence[str],
                   ctx: AnalysisContext) -> dict[str, torch.Tensor]:
    """Features of every item of ``split``, one row per label row: the datasets never skip (corrupt
    images are left out before, by ``ctx.voc_images``), so a broken file raises CorruptImageError
    with its name first (a DataLoader worker's traceback would otherwise bury it)."""
    loader = DataLoader(split.dataset, batch_size=ctx.batch_size, num_workers=ctx.num_workers,
                        collate_fn=collate_skipping)
    key = {"data": f"{ctx.voc_root}:{split.name}", "files": split.fingerprint, "transform": split.transform}
    try:
        return extract_cached(model, loader, layers, cache=ctx.cache, key_parts=key,
                              progress=ctx.progress, desc=f"features {split.transform['kind']}/{split.name}")
    except CorruptImageError as e:
        found = re.findall(r"cannot decode image [^\n]*", str(e))
        raise CorruptImageError(f"{found[-1] if found else e} (VOC split {split.name!r}); "
                                "data.skip_corrupt=true leaves such images out") from e


def applies(ablation: Ablation, features: torch.Tensor) -> bool:
    """Spatial ablations (``cnnft.ablations.is_spatial``) need ``[N, C, H, W]``; fc features take
    the others (the plain vector, binarize)."""
    from cnnft.ablations import is_spatial

    return features.dim() == 4 or not is_spatial(ablation)


def run_probes(model: nn.Module, train: ProbeSplit, test: ProbeSplit, *, layers: Sequence[str],
               ablations: Mapping[str, Ablation], svm: SVMConfig, ctx: AnalysisContext,
               train_difficult: bool = False, ap_mode: str = "voc07",
               scores: dict[str, np.ndarray] | None = None,
               solver: GridSolver = solve_grid) -> list[dict[str, Any]]:
    """Per-class test AP of one-vs-rest SVMs for each layer and ablation (see module doc);
    ``scores``, when given, receives each probe's test decision values ``[N, classes]`` under
    ``<layer>/<ablation>``; ``solver``: the SVM solver (``cnnft.svm.solve_grid``; benches pass
    variants of it)."""
    net = getattr(model, "net", model)
    layers = net.check_layers(layers)
    for split in (train, test):
        check_positives(split, ctx.voc_root)
    train_x, test_x = layer_features(model, train, layers, ctx), layer_features(model, test, layers, ctx)
    ignore = None if train_difficult else torch.from_numpy(train.ignore)
    rows: list[dict[str, Any]] = []
    for layer in layers:
        for name, ablation in ablations.items():
            if not applies(ablation, train_x[layer]):
                log.info("ablation %s needs [N, C, H, W] maps; layer %s gives %s per sample: skipped",
                         name, layer, list(train_x[layer].shape[1:]))
                continue
            xtr = ablation(train_x[layer]).flatten(1)
            xte = ablation(test_x[layer]).flatten(1)
            solves: dict = {}
            label = SolveLabel(f"probe {train.transform['kind']} layer {layer} ablation {name}", VOC_CLASSES)
            probe = fit_probe(xtr, torch.from_numpy(train.labels), cfg=svm, ignore=ignore, stats=solves,
                              label=label, solver=solver)
            test_scores = probe.scores(xte)
            per_class, mean = mean_average_precision(test_scores, test.labels, difficult=test.ignore,
                                                     mode=ap_mode)
            if scores is not None:
                scores[f"{layer}/{name}"] = test_scores.detach().cpu().numpy().astype(np.float32)
            rows += [{"layer": layer, "ablation": name, "class": cls, "ap": float(ap),
                      "c": float(c)} for cls, ap, c in zip(VOC_CLASSES, per_class, probe.c, strict=True)]
            rows.append({"layer": layer, "ablation": name, "class": "mAP", "ap": mean, "c": None,
                         "unconverged_svms": solves.get("unconverged", 0)})
    return rows


def map_metrics(name: str, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``<name>/<layer>/mAP`` (plain features) and ``<name>/<layer>/<ablation>/mAP`` of AP rows."""
    metrics = {}
    for r in rows:
        if r["class"] == "mAP":
            ab = "" if r["ablation"] == "unroll" else f"{r['ablation']}/"
            metrics[f"{name}/{r['layer']}/{ab}mAP"] = r["ap"]
    return metrics


def plot_map_by_layer(rows: Sequence[dict[str, Any]], title: str) -> Any:
    """Bars of mAP by layer, one colour per ablation."""
    from cnnft.plotting import pyplot

    plt = pyplot()
    means = [r for r in rows if r["class"] == "mAP"]
    layers = list(dict.fromkeys(r["layer"] for r in means))
    ablations = list(dict.fromkeys(r["ablation"] for r in means))
    fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 2, 3.5))
    width = 0.8 / len(ablations)
    for i, ab in enumerate(ablations):
        xs, ys = zip(*[(layers.index(r["layer"]) + i * width, 100 * r["ap"])
                       for r in means if r["ablation"] == ab], strict=True)
        ax.bar(xs, ys, width=width, label=ab)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


class ProbeAnalysis(Analysis):
    """Linear-SVM probes of ``layers`` on VOC07 trainval -> test (see ``run_probes``).

    Logged keys: ``<name>/<layer>/mAP`` (plain features) and ``<name>/<layer>/<ablation>/mAP``.
    Files: ``results/<name>.json|csv`` (per layer, ablation, class: AP and chosen C; the mAP rows
    carry ``unconverged_svms``, the SVM solves stopped at ``max_iter``),
    ``results/<name>_scores.npz`` (each probe's test decision values with the labels and the
    image of each item: ``cnnft.scores``, for the report's bootstrap intervals) and
    ``figures/<name>.png`` (mAP by layer).
    """

    name: ClassVar[str] = "probe"
    title: ClassVar[str] = "probe"

    def __init__(self, *, layers: Sequence[str] = PROBE_LAYERS,
                 ablations: Mapping[str, Ablation] | None = None, svm: Mapping[str, Any] | None = None,
                 train_split: str = "trainval", test_split: str = "test", train_difficult: bool = False,
                 ap_mode: str = "voc07", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from cnnft.ablations import unroll

        self.layers, self.ablations = list(layers), dict(ablations or {"unroll": unroll})
        self.svm = SVMConfig.from_mapping(svm, f"analyses.{self.name}.svm")
        self.train_split, self.test_split = train_split, test_split
        self.train_difficult, self.ap_mode = train_difficult, ap_mode

    def split(self, ctx: AnalysisContext, split: str) -> ProbeSplit:
        raise NotImplementedError

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        test, scores = self.split(ctx, self.test_split), {}
        rows = run_probes(model, self.split(ctx, self.train_split), test,
                          layers=self.layers, ablations=self.ablations, svm=self.svm, ctx=ctx,
                          train_difficult=self.train_difficult, ap_mode=self.ap_mode, scores=scores)
        metrics = map_metrics(self.name, rows)
        write_table(ctx, self.name, rows, summary=metrics)
        save_arrays(scores_path(ctx.output_dir / "results", self.name), test.probe_scores(scores).arrays())
        save_figure(ctx, plot_map_by_layer(rows, self.title), self.name)
        return metrics
