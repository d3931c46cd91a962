"""Paired bootstrap over test images: the margin in mAP between two networks and its interval.

Both networks are scored on the same test images; a resample draws ``num_images`` images with
replacement (the same draw for both networks), so an image drawn twice counts twice with
everything it holds: its one item (image classification), all its ground-truth boxes (GT-box
classification) or all its detections and objects (detection). The mAP of each network is
recomputed on the resample and the margin ``A - B`` collected; its 2.5th / 97.5th percentiles
are the 95% interval.

An image drawn ``w`` times is the same as its items repeated ``w`` times, and repeated items tie
with themselves, so the resampled AP is a weighted AP: items ranked once by score, their counts
weighted by ``w``. That equals :func:`cnnft.metrics.average_precision` on the repeated items
exactly (ties enter the ranking together there too), and for detection the
``cnnft.detection.evaluation`` AP: a detection's TP/FP flag is fixed, since matching happens
within its image, and the class's positives are the resampled images' non-difficult objects.

A resample in which a class has no positive leaves that class's AP undefined: the mAP of that
resample averages the other classes (for both networks alike) and ``undefined`` counts such
resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnft.metrics import MODES

#: at most this many (resample x item) cells are held at once per class
CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class ClassRanking:
    """What one class's AP is computed from: ranked items (``scores``, ``hits`` true positive,
    ``image`` of each item; ignored items already left out) and ``positives`` per image (the
    recall denominator: positive items for a probe, non-difficult objects for detection)."""

    scores: np.ndarray  # [D] float
    hits: np.ndarray  # [D] bool
    image: np.ndarray  # [D] int in [0, num_images)
    positives: np.ndarray  # [num_images] int


@dataclass(frozen=True)
class Margin:
    """``map_a - map_b`` (mAP in [0, 1] on all test images) and its bootstrap interval."""

    map_a: float
    map_b: float
    low: float
    high: float
    samples: int
    level: float
    undefined: int  # resamples in which some class had no positive

    @property
    def margin(self) -> float:
        return self.map_a - self.map_b


def resample_counts(num_images: int, samples: int, seed: int = 0) -> np.ndarray:
    """``[samples, num_images]`` int: how often each image is drawn in each resample (draws of
    ``num_images`` images with replacement, ``numpy.random.default_rng(seed)``)."""
    if num_images < 1 or samples < 1:
        raise ValueError(f"need num_images >= 1 and samples >= 1, got {num_images} and {samples}")
    draws = np.random.default_rng(seed).integers(0, num_images, size=(samples, num_images))
    flat = draws + num_images * np.arange(samples)[:, None]
    return np.bincount(flat.ravel(), minlength=samples * num_images).reshape(samples, num_images)


def weighted_ap(ranking: ClassRanking, counts: np.ndarray, *, mode: str = "voc07") -> np.ndarray:
    """AP of one class under each row of image ``counts`` ``[R, num_images]`` -> ``[R]`` (NaN
    where a row leaves the class without a positive). A row of ones gives the plain AP."""
    if mode not in MODES:
        raise ValueError(f"unknown AP mode {mode!r}; expected one of {list(MODES)}")
    counts = np.asarray(counts)
    npos = counts @ np.asarray(ranking.positives, dtype=np.int64)
    out = np.where(npos > 0, 0.0, np.nan)
    scores = np.asarray(ranking.scores, dtype=np.float64)
    if scores.size == 0:
        return out
    order = np.argsort(-scores, kind="stable")
    ranked, hits, image = scores[order], np.asarray(ranking.hits, bool)[order], ranking.image[order]
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)  # tie groups
    step = max(1, CHUNK_CELLS // ranked.size)
    t = np.arange(11) / 10
    for lo in range(0, len(counts), step):
        w = counts[lo:lo + step][:, image].astype(np.float64)  # [r, D]
        seen = np.cumsum(w, axis=1)[:, ends]
        tp = np.cumsum(w * hits, axis=1)[:, ends]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(seen > 0, tp / seen, 0.0)
            recall = tp / npos[lo:lo + step, None].astype(np.float64)
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        if mode == "voc07":
            padded = np.concatenate([envelope, np.zeros((len(w), 1))], axis=1)
            first = np.stack([(recall < x).sum(1) for x in t], axis=1)  # recall is non-decreasing
            ap = np.take_along_axis(padded, first, axis=1).mean(1)
        else:
            ap = (np.diff(recall, axis=1, prepend=0.0) * envelope).sum(1)
        out[lo:lo + step] = np.where(npos[lo:lo + step] > 0, ap, np.nan)
    return out


def resampled_map(rankings: Sequence[ClassRanking], counts: np.ndarray, *,
                  mode: str = "voc07") -> np.ndarray:
    """``[R, classes]`` AP of every class under each row of ``counts`` (see :func:`weighted_ap`)."""
    return np.stack([weighted_ap(r, counts, mode=mode) for r in rankings], axis=1)


def paired_bootstrap(a: Sequence[ClassRanking], b: Sequence[ClassRanking], *, num_images: int,
                     samples: int = 1000, seed: int = 0, level: float = 0.95,
                     mode: str = "voc07") -> Margin:
    """mAP of network ``a`` minus that of ``b`` on all test images, with the percentile interval
    (``level``, 95% by default) of the margin over ``samples`` resamples of the test images,
    the same resamples for both (see the module doc). ``a`` and ``b``: one ranking per class,
    in the same class order, over the same ``num_images`` images."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs the same classes for both networks, got {len(a)} "
                         f"and {len(b)} class rankings")
    for r in (*a, *b):
        if len(r.positives) != num_images:
            raise ValueError(f"a class ranking counts positives of {len(r.positives)} images, "
                             f"expected {num_images}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ones = np.ones((1, num_images), dtype=np.int64)
    full_a, full_b = resampled_map(a, ones, mode=mode), resampled_map(b, ones, mode=mode)
    if np.isnan(full_a).any() or np.isnan(full_b).any():
        raise ValueError("a class has no positive on the full test set; its AP is undefined")
    counts = resample_counts(num_images, samples, seed)
    ap_a, ap_b = resampled_map(a, counts, mode=mode), resampled_map(b, counts, mode=mode)
    margins = np.nanmean(ap_a, axis=1) - np.nanmean(ap_b, axis=1)
    low, high = np.percentile(margins, [50 * (1 - level), 50 * (1 + level)])
    return Margin(map_a=float(full_a.mean()), map_b=float(full_b.mean()), low=float(low),
                  high=float(high), samples=samples, level=level,
                  undefined=int(np.isnan(ap_a).any(axis=1).sum()))


def probe_rankings(scores: np.ndarray, labels: np.ndarray, ignore: np.ndarray,
                   image_index: np.ndarray, num_images: int) -> list[ClassRanking]:
    """One :class:`ClassRanking` per column of probe ``scores`` ``[N, C]`` (labels/ignore bool
    ``[N, C]``, ``image_index`` ``[N]``: the test image of each item)."""
    scores, labels, ignore = np.asarray(scores), np.asarray(labels, bool), np.asarray(ignore, bool)
    image_index = np.asarray(image_index, dtype=np.int64)
    if not (scores.shape == labels.shape == ignore.shape) or scores.ndim != 2 \
            or image_index.shape != scores.shape[:1]:
        raise ValueError(f"probe scores {scores.shape}, labels {labels.shape}, ignore {ignore.shape} "
                         f"and image_index {image_index.shape} do not match; expected [N, C] x 3 and [N]")
    out = []
    for c in range(scores.shape[1]):
        keep = ~ignore[:, c]
        hits = labels[keep, c]
        out.append(ClassRanking(scores[keep, c], hits, image_index[keep],
                                np.bincount(image_index[keep][hits], minlength=num_images)))
    return out


def detection_rankings(score: np.ndarray, tp: np.ndarray, image: np.ndarray, cls: np.ndarray,
                       positives: np.ndarray) -> list[ClassRanking]:
    """One :class:`ClassRanking` per class of scored detections (``score``, ``tp`` flag,
    ``image`` index and class ``cls`` of each; ignored detections left out) and the
    ``positives`` per image and class ``[num_images, C]`` (non-difficult objects)."""
    positives = np.asarray(positives, dtype=np.int64)
    cls, image = np.asarray(cls), np.asarray(image, dtype=np.int64)
    return [ClassRanking(np.asarray(score)[cls == k], np.asarray(tp, bool)[cls == k], image[cls == k],
                         positives[:, k]) for k in range(positives.shape[1])]
