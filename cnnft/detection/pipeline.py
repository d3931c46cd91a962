"""R-CNN detection on VOC07 for any layer at or after pool5: train on trainval, test on test.

``run_detection`` builds (or loads) the cached pool5 region features of both splits, then for
every layer and ablation: estimates the feature scale, trains the detectors by hard-negative
mining (``cnnft.detection.mining``; every ground-truth box is a positive, "difficult" ones
included, as R-CNN), scores every test proposal, keeps per class the top boxes of each image,
drops those below R-CNN's per-class test-set cap (``max_per_set``), applies NMS, and evaluates
the VOC07 detection AP per class (``cnnft.detection.evaluation``). Returns rows
``{layer, ablation, class, ap}`` plus a ``class == "mAP"`` row per (layer, ablation) carrying the
mining figures (with ``unconverged_svms``, the SVM solves that stopped at ``max_iter``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from cnnft.ablations import unroll
from cnnft.data.proposals import ProposalSettings
from cnnft.data.transforms import Mean, mean_key
from cnnft.data.voc import VOC_CLASSES, VOCImage, load_voc
from cnnft.detection.evaluation import (
    MatchedDetections,
    match_class,
    matched_average_precision,
    max_per_set_value,
    nms_per_class,
    set_thresholds,
    top_k_candidates,
)
from cnnft.detection.mining import MiningConfig, MiningStats, mine_detectors
from cnnft.detection.regions import (
    CACHED_LAYER,
    Regions,
    RegionStore,
    cached_layer,
    check_detection_layers,
    default_cache,
    layer_transform,
    split_regions,
)
from cnnft.errors import DataError
from cnnft.features import FeatureCache
from cnnft.hashing import layer_digests
from cnnft.scores import DetectionScores
from cnnft.svm import mean_norm_scale

log = logging.getLogger(__name__)

Ablation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DetectionSettings:
    """Everything but the model and the layers (``conf/analyses/detection.yaml``)."""

    voc_root: Path
    crop: int
    pad: int
    mean: Mean
    proposal_cache: Path
    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    compute_missing: bool = True
    proposal_workers: int = 2
    max_proposals: int = 2000
    train_split: str = "trainval"
    test_split: str = "test"
    mining: MiningConfig = field(default_factory=MiningConfig)
    norm_sample_images: int = 100
    top_k: int = 100
    # R-CNN's per-class test-set cap (rcnn_test.m, always on there): "rcnn" = 40 per test image,
    # an int, or None (off)
    max_per_set: int | str | None = "rcnn"
    nms_iou: float = 0.3
    match_iou: float = 0.5
    ap_mode: str = "voc07"
    shard_images: int = 64
    batch_size: int = 64
    seed: int = 0


def check_classes(images: Sequence[VOCImage], split: str, root: object, purpose: str) -> None:
    """Every class needs a non-difficult ground-truth box in ``images``: DataError naming those without."""
    count = np.zeros(len(VOC_CLASSES), int)
    for im in images:
        np.add.at(count, im.labels[~im.difficult], 1)
    empty = [cls for cls, n in zip(VOC_CLASSES, count, strict=True) if n == 0]
    if empty:
        raise DataError(f"{root}: split {split!r} has no non-difficult ground-truth box of class(es) "
                        f"{empty}; detection needs one per class {purpose}")


def candidate_negatives(boxes: np.ndarray, im: VOCImage, neg_iou: float) -> torch.Tensor:
    """bool [n, K]: windows whose IoU with every box of class k (difficult included) is < ``neg_iou``."""
    out = torch.ones(len(boxes), len(VOC_CLASSES), dtype=torch.bool)
    if len(boxes) == 0 or len(im.boxes) == 0:
        return out
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(im.boxes))
    for k in np.unique(im.labels):
        out[:, k] = iou[:, torch.from_numpy(im.labels == k)].amax(1) < neg_iou
    return out


def positive_labels(im: VOCImage) -> torch.Tensor:
    """bool [num gt, K]: the class of each ground-truth window (``Regions`` order), "difficult"
    boxes included (``as_training_windows``)."""
    labels = torch.from_numpy(im.labels)
    return torch.nn.functional.one_hot(labels, len(VOC_CLASSES)).bool()


def as_training_windows(images: Sequence[VOCImage]) -> list[VOCImage]:
    """The training images with no box flagged "difficult": R-CNN trains its detectors on every
    ground-truth box (``roidb_from_voc.m`` keeps every object, ``rcnn_train.m`` takes each one of
    class k as a positive), while ``make_regions`` leaves difficult boxes out of the windows.
    Only the training windows use these; evaluation reads the test split's own flags."""
    return [replace(im, difficult=np.zeros_like(im.difficult)) for im in images]


def build_store(model: nn.Module, regions: Regions, s: DetectionSettings, *, cache: FeatureCache,
                device: str, progress: bool, layer: str = CACHED_LAYER) -> RegionStore:
    """``layer`` (CaffeNet: pool5) of every window, cached under the digest of the weights up to
    it (networks that differ only after it, e.g. fine-tuned with conv frozen, share the cache)."""
    key = {"model": layer_digests(model)[layer], "data": f"{s.voc_root}:{regions.split}",
           "transform": {"kind": "region", "crop": s.crop, "pad": s.pad, "mean": mean_key(s.mean),
                         "proposals": asdict(s.proposals), "max_proposals": s.max_proposals,
                         "gt": "all, difficult included" if regions.num_gt != [0] * len(regions.num_gt)
                         else False}}
    store = RegionStore(regions, cache, key, shard_images=s.shard_images, layer=layer)
    return store.build(model, crop=s.crop, pad=s.pad, mean=s.mean, batch_size=s.batch_size,
                       device=device, progress=progress)


def _on(device: str, feats: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda pool5: feats(pool5.to(device))


def train_detectors(train: RegionStore, feats: Callable[[torch.Tensor], torch.Tensor],
                    s: DetectionSettings, device: str, stats: MiningStats, where: str = "detection"):
    """Scale estimate, positives, then the mining pass over the training images."""
    images = train.regions.images
    rng = np.random.default_rng(s.seed)
    sample = sorted(rng.choice(len(images), size=min(s.norm_sample_images, len(images)), replace=False))
    scale = mean_norm_scale((feats(p5) for _, p5 in train.images(sample)), s.mining.svm.target_norm)
    pos, pos_labels = [], []
    for i, p5 in train.images(rows="gt"):
        if len(p5):
            pos.append(feats(p5))
            pos_labels.append(positive_labels(images[i]))

    def negatives() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, p5 in train.images():
            yield feats(p5), candidate_negatives(train.regions.boxes[i], images[i], s.mining.neg_iou)

    return mine_detectors(torch.cat(pos), torch.cat(pos_labels), negatives(), scale=scale,
                          cfg=s.mining, device=device, stats=stats, where=where, class_names=VOC_CLASSES)


def evaluate(test: RegionStore, feats: Callable[[torch.Tensor], torch.Tensor], detectors,
             s: DetectionSettings, matched: list[MatchedDetections] | None = None) -> np.ndarray:
    """Per-class VOC detection AP of the detectors on every test image: per image and class the
    ``top_k`` boxes, then the test-set cap (``max_per_set``), then NMS (R-CNN's order). The
    matched detections of each class are appended to ``matched`` when it is given."""
    images = test.regions.images
    candidates = []  # per image (boxes [t, K, 4], scores [t, K]): 100 x 20 per image at most
    for i, p5 in test.images():
        boxes = torch.from_numpy(test.regions.boxes[i])
        scores = detectors.scores(feats(p5)).cpu() if len(p5) else torch.zeros(0, len(VOC_CLASSES))
        candidates.append(top_k_candidates(boxes, scores, s.top_k))
    cap = max_per_set_value(s.max_per_set, len(images))
    floor = set_thresholds([c[1] for c in candidates], cap, len(VOC_CLASSES))
    per_class: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in VOC_CLASSES]
    for boxes, scores in candidates:
        for k, dets in enumerate(nms_per_class(boxes, scores, nms_iou=s.nms_iou, min_score=floor)):
            per_class[k].append(dets)
    found = [match_class(per_class[k], [(im.boxes[im.labels == k], im.difficult[im.labels == k])
                                        for im in images], iou=s.match_iou)
             for k in range(len(VOC_CLASSES))]
    if matched is not None:
        matched.extend(found)
    return np.array([matched_average_precision(m, mode=s.ap_mode) for m in found])


def run_detection(model: nn.Module, *, layers: Sequence[str], ablations: Mapping[str, Ablation],
                  settings: DetectionSettings, cache: FeatureCache | None,
                  output_dir: Path, device: str = "cpu", progress: bool = True,
                  voc_images: Callable[[str], list[VOCImage]] | None = None,
                  scores: DetectionScores | None = None) -> list[dict[str, Any]]:
    """Detection AP per class for every layer and ablation (see the module doc). ``voc_images``
    gives a split's images (default: all of ``load_voc``; the analysis passes
    ``AnalysisContext.voc_images``, which leaves corrupt ones out with ``data.skip_corrupt``):
    selective search, region features and the test ground truth all use that list. ``scores``,
    when given, receives every detector's matched test detections (``cnnft.scores``)."""
    s = settings
    net = getattr(model, "net", model)
    layers = check_detection_layers(net, layers)
    cache = cache or default_cache(output_dir)
    max_per_set_value(s.max_per_set, 1)  # a bad value fails before any work
    splits = {}
    for split, gt, purpose in ((s.train_split, True, "to train its detector (positives)"),
                               (s.test_split, False, "for its test AP")):
        images = voc_images(split) if voc_images else load_voc(s.voc_root, split)
        check_classes(images, split, s.voc_root, purpose)
        images = as_training_windows(images) if gt else images
        regions = split_regions(images, split, cache_dir=s.proposal_cache, settings=s.proposals,
                                max_proposals=s.max_proposals, include_gt=gt,
                                compute_missing=s.compute_missing, workers=s.proposal_workers,
                                progress=progress)
        for source in dict.fromkeys(cached_layer(net, layer) for layer in layers):
            splits[split, source] = build_store(model, regions, s, cache=cache, device=device,
                                                progress=progress, layer=source)
    rows: list[dict[str, Any]] = []
    for layer in layers:
        for name, ablation in ablations.items():
            # the detection ablations (paper Table 5) are of pool5 (maps: every ablation applies);
            # later layers run plain. Other networks: of every layer with maps (4-D features)
            plain = ablation is None or getattr(ablation, "func", ablation) is unroll
            source = cached_layer(net, layer)
            if not plain and (layer != source or len(splits[s.train_split, source].shape or ()) != 3):
                continue
            feats = _on(device, layer_transform(net, layer, ablation or unroll))
            stats = MiningStats()
            where = f"detection layer {layer}" + ("" if name == "unroll" else f" ablation {name}")
            detectors = train_detectors(splits[s.train_split, source], feats, s, device, stats, where)
            matched: list[MatchedDetections] = []
            test = splits[s.test_split, source]
            ap = evaluate(test, feats, detectors, s, matched)
            if scores is not None:
                scores.add(f"{layer}/{name}", [im.image_id for im in test.regions.images], matched)
            rows += [{"layer": layer, "ablation": name, "class": cls, "ap": float(v)}
                     for cls, v in zip(VOC_CLASSES, ap, strict=True)]
            rows.append({"layer": layer, "ablation": name, "class": "mAP", "ap": float(ap.mean()),
                         "retrains": stats.retrains, "cached_negatives": stats.cache_rows,
                         "mining_s": round(stats.seconds, 3), "unconverged_svms": stats.unconverged})
            log.info("detection %s/%s: mAP %.4f", layer, name, ap.mean())
    return rows
