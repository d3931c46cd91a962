"""VOC07 detection evaluation: per-class NMS of scored boxes and the devkit's detection AP.

Boxes are 0-based half-open ``[x1, y1, x2, y2)`` pixel boxes as ``cnnft.data.voc`` stores them
(VOC's inclusive ``xmin..xmax`` becomes ``[xmin - 1, xmax)``), so ``x2 - x1`` is the devkit's
``xmax - xmin + 1`` and ``torchvision.ops.box_iou`` on them equals the devkit's IoU with its
``+1`` areas. Proposals from ``cnnft.data.proposals`` use the same convention.

Matching (``VOCevaldet.m``): detections of a class are taken in decreasing score order; each is
compared with every ground-truth box of its image and takes the one of highest IoU. If that IoU
is >= ``iou``: a "difficult" box makes the detection ignored (neither TP nor FP); a box not yet
matched makes it a true positive and marks the box; a box already matched makes it a false
positive (a duplicate). Below ``iou`` it is a false positive. Difficult boxes do not count in
recall. (The devkit compares with *every* box, matched or not: a duplicate whose best box is
taken is a false positive even if it overlaps another free box by >= ``iou``.)

Ties: detections with equal scores are matched in input order (a stable sort, as the devkit)
and enter the precision/recall curve together (as ``cnnft.metrics.precision_recall`` does), so
the AP does not depend on their order unless two tied detections compete for one box.

A class without any non-difficult ground-truth box has no defined AP: ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from cnnft.errors import ConfigError
from cnnft.metrics import interpolated_ap, precision_recall

#: one image's ``(boxes [N, 4], scores [N])`` detections or ``(boxes [M, 4], difficult [M])`` truth
Boxes = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]


def _np(x: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def match_detections(boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray,
                     gt_difficult: np.ndarray, *, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Devkit matching within one image: ``(tp, ignored)`` boolean flags per detection (in input
    order); detections neither TP nor ignored are false positives. See the module doc."""
    n = len(scores)
    tp, ignored = np.zeros(n, bool), np.zeros(n, bool)
    if n == 0 or len(gt_boxes) == 0:
        return tp, ignored
    overlaps = box_iou(torch.from_numpy(boxes.astype(np.float64)),
                       torch.from_numpy(gt_boxes.astype(np.float64))).numpy()
    best, arg = overlaps.max(1), overlaps.argmax(1)
    taken = np.zeros(len(gt_boxes), bool)
    for d in np.argsort(-scores, kind="stable"):
        if best[d] < iou:
            continue
        j = arg[d]
        if gt_difficult[j]:
            ignored[d] = True
        elif not taken[j]:
            tp[d] = taken[j] = True
    return tp, ignored


@dataclass
class MatchedDetections:
    """One class's detections over a set of images after devkit matching: ``scores``, ``tp`` flag
    and ``image`` index of each detection that is not ignored, and ``positives`` per image (its
    non-difficult objects of the class)."""

    scores: np.ndarray
    tp: np.ndarray
    image: np.ndarray
    positives: np.ndarray


def match_class(detections: Sequence[Boxes], ground_truth: Sequence[Boxes], *,
                iou: float = 0.5) -> MatchedDetections:
    """Match one class's detections with its objects image by image (``match_detections``);
    arguments as :func:`detection_average_precision`."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"detections cover {len(detections)} images but ground_truth "
                         f"{len(ground_truth)}; expected one entry per image in both")
    scores, hits, keep, image, positives = [], [], [], [], []
    for (boxes, sc), (gt, difficult) in zip(detections, ground_truth, strict=True):
        boxes, sc = _np(boxes, np.float64).reshape(-1, 4), _np(sc, np.float64).reshape(-1)
        gt, difficult = _np(gt, np.float64).reshape(-1, 4), _np(difficult, bool).reshape(-1)
        if len(boxes) != len(sc) or len(gt) != len(difficult):
            raise ValueError(f"image {len(scores)}: {len(boxes)} boxes with {len(sc)} scores, "
                             f"{len(gt)} ground-truth boxes with {len(difficult)} difficult flags")
        positives.append(int((~difficult).sum()))
        tp, ignored = match_detections(boxes, sc, gt, difficult, iou=iou)
        image.append(np.full(len(sc), len(scores)))
        scores.append(sc)
        hits.append(tp)
        keep.append(~ignored)
    kept = np.concatenate(keep) if keep else np.zeros(0, bool)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts)[kept] if parts else np.zeros(0, dtype)

    return MatchedDetections(cat(scores, np.float64), cat(hits, bool), cat(image, np.int64),
                             np.asarray(positives, dtype=np.int64))


def matched_average_precision(matched: MatchedDetections, *, mode: str = "voc07") -> float:
    """VOC detection AP of matched detections (see :func:`detection_average_precision`)."""
    npos = int(matched.positives.sum())
    if npos == 0:
        raise ValueError("no non-difficult ground-truth box of the class in any image; "
                         "detection AP is undefined")
    s, y = matched.scores, matched.tp
    if np.isnan(s).any():
        raise ValueError("detection scores contain NaN; cannot rank them")
    if not y.any():
        return 0.0
    precision, recall = precision_recall(s, y)
    true_positives = np.rint(recall * y.sum())  # exact counts, so k / npos compares exactly
    return interpolated_ap(precision, true_positives / npos, mode=mode)


def detection_average_precision(detections: Sequence[Boxes], ground_truth: Sequence[Boxes], *,
                                iou: float = 0.5, mode: str = "voc07") -> float:
    """VOC detection AP of one class over a set of images.

    Args:
        detections: per image, ``(boxes [N, 4], scores [N])`` of this class.
        ground_truth: per image (same order and length), ``(boxes [M, 4], difficult [M])`` of the
            objects of this class.
        iou: the IoU a detection needs with a box to match it (0.5 in VOC).
        mode: ``"voc07"`` 11-point interpolated AP (the paper's), or ``"area"`` (VOC2010+).
    Returns the AP in [0, 1]; 0 when nothing is detected. Raises ValueError when the class has
    no non-difficult ground-truth box (AP undefined) or the lists differ in length.
    """
    return matched_average_precision(match_class(detections, ground_truth, iou=iou), mode=mode)


#: R-CNN's ``rcnn_test.m``: "heuristic that yields at most 100k pre-NMS boxes per 2500 images"
MAX_PER_SET_PER_IMAGE = -(-100000 // 2500)  # ceil: 40


def max_per_set_value(value: int | str | None, num_images: int) -> int | None:
    """The per-class test-set cap that ``max_per_set`` asks for: ``"rcnn"`` -> R-CNN's
    ``ceil(100000 / 2500) * num_images``, an int >= 1 as given, None (off). ConfigError otherwise."""
    if value is None:
        return None
    if value == "rcnn":
        return MAX_PER_SET_PER_IMAGE * num_images
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"detection max_per_set={value!r}; expected 'rcnn', a positive integer or null")


def top_k_candidates(boxes: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the ``k`` highest-scoring boxes of one image: ``boxes`` [N, 4] shared by the
    classes, ``scores`` [N, K] -> ``(boxes [t, K, 4], scores [t, K])``, ``t = min(k, N)``, in
    decreasing score order per class."""
    val, idx = scores.topk(min(k, scores.shape[0]), dim=0)
    return boxes[idx], val


def set_thresholds(candidate_scores: Sequence[torch.Tensor], max_per_set: int | None,
                   num_classes: int) -> torch.Tensor:
    """R-CNN's test-set cap (``rcnn_test.m``): per class, the score of the ``max_per_set``-th best
    of all images' candidates ([t_i, K] each, after the per-image top-k): boxes scoring below it
    are dropped (ties kept). ``-inf`` where a class has at most ``max_per_set`` candidates or
    the cap is off (None). R-CNN computes the same threshold streaming (a running threshold
    that filters later images, then a final pruning below the last one)."""
    out = torch.full((num_classes,), -math.inf, dtype=torch.float64)
    if max_per_set is None or not candidate_scores:
        return out
    allsc = torch.cat([c.to(torch.float64) for c in candidate_scores])  # [sum t_i, K]
    if len(allsc) > max_per_set:
        out = allsc.topk(max_per_set, dim=0).values[-1]
    return out


def nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, *, nms_iou: float = 0.3,
                  min_score: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy NMS per class of one image's candidates ``(boxes [t, K, 4], scores [t, K])``, after
    dropping those below ``min_score`` [K]. A box is suppressed only when its IoU with a kept box
    is > ``nms_iou`` (R-CNN's ``nms.m`` keeps ``o <= overlap``; ``torchvision.ops.batched_nms``
    drops IoU > threshold): computed in float64, where the IoU of integer boxes that equals the
    threshold exactly is the threshold's own double, so such a box is kept (in float32, IoU 0.3
    rounds above the threshold and was dropped). Returns K pairs ``(boxes [n_k, 4],
    scores [n_k])`` in decreasing score order."""
    t, k = scores.shape
    cls = torch.arange(k, device=scores.device).expand(t, k).flatten()
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.flatten()
    if min_score is not None:
        keep = flat_scores.to(torch.float64) >= min_score.to(scores.device)[cls]
        flat_boxes, flat_scores, cls = flat_boxes[keep], flat_scores[keep], cls[keep]
    kept = batched_nms(flat_boxes.double(), flat_scores.double(), cls, nms_iou)
    kept_cls = cls[kept]
    return [(flat_boxes[kept[kept_cls == c]], flat_scores[kept[kept_cls == c]]) for c in range(k)]


def top_k_nms(boxes: torch.Tensor, scores: torch.Tensor, *, top_k: int = 100,
              nms_iou: float = 0.3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per class, the ``top_k`` highest-scoring boxes of one image after greedy NMS at ``nms_iou``.

    ``boxes`` [N, 4] are shared by all classes, ``scores`` [N, K]. Returns K pairs
    ``(boxes [n_k, 4], scores [n_k])`` in decreasing score order (R-CNN: top boxes first, then
    NMS, ``nms_per_class``)."""
    cand_boxes, cand_scores = top_k_candidates(boxes, scores, top_k)
    return nms_per_class(cand_boxes, cand_scores, nms_iou=nms_iou)
