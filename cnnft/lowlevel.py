"""The low-level control: linear SVMs on colour and gradient-orientation histograms.

It answers "how far do pixel statistics alone go?" on the same VOC splits, labels and probe
protocol (``cnnft.svm.fit_probe``: C by cross-validated AP on trainval, VOC07 AP on test) as the
network probes, so its mAP sits in the report next to the random and the pretrained network.
A network whose features do not beat it has learned nothing the pixels do not already show.

Features of an image (or of a ground-truth box, cropped tight), computed with OpenCV:

* colour: a joint HSV histogram, 8 hue x 4 saturation x 4 value bins, L1-normalised;
* gradient orientation: HOG (``cv2.HOGDescriptor``) of the grey image warped to 64x64: 16 px
  cells, 9 unsigned orientation bins, 2x2-cell blocks at a 16 px stride (324 values), each block
  L2-Hys normalised, then scaled to unit L2 norm overall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cnnft.data.images import load_rgb
from cnnft.data.voc import VOC_CLASSES, VOCImage
from cnnft.errors import DataError
from cnnft.metrics import mean_average_precision
from cnnft.svm import SVMConfig, fit_probe

#: HSV bins (OpenCV's 8-bit hue runs 0..179).
COLOUR_BINS = (8, 4, 4)
HOG_SIDE = 64
#: The feature groups and what each uses.
FEATURES = ("colour", "gradient", "colour+gradient")

_HOG = cv2.HOGDescriptor((HOG_SIDE, HOG_SIDE), (32, 32), (16, 16), (16, 16), 9)


def colour_histogram(img: np.ndarray) -> np.ndarray:
    """L1-normalised joint HSV histogram (``prod(COLOUR_BINS)`` values) of an RGB uint8 image."""
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(COLOUR_BINS), [0, 180, 0, 256, 0, 256])
    hist = hist.ravel().astype(np.float32)
    return hist / max(float(hist.sum()), 1.0)


def gradient_histogram(img: np.ndarray) -> np.ndarray:
    """HOG of the grey image warped to ``HOG_SIDE`` squared, scaled to unit L2 norm."""
    grey = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (HOG_SIDE, HOG_SIDE), interpolation=cv2.INTER_AREA)
    hog = np.nan_to_num(_HOG.compute(grey).ravel().astype(np.float32))  # flat crops: NaN blocks
    return hog / max(float(np.linalg.norm(hog)), 1e-6)


def lowlevel_features(img: np.ndarray) -> dict[str, np.ndarray]:
    """``{"colour": ..., "gradient": ...}`` of one RGB uint8 image ``[H, W, 3]``."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 2:
        raise DataError(f"expected an RGB uint8 image [H >= 2, W >= 2, 3], got {img.dtype} {img.shape}")
    return {"colour": colour_histogram(img), "gradient": gradient_histogram(img)}


def _stack(feats: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.stack([f[k] for f in feats]) for k in ("colour", "gradient")}
    out["colour+gradient"] = np.concatenate([out["colour"], out["gradient"]], axis=1)
    return out


def image_features(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Each feature group of :data:`FEATURES` for whole images: ``[N, D]`` arrays."""
    return _stack([lowlevel_features(load_rgb(p)) for p in paths])


def box_features(images: Sequence[VOCImage]) -> dict[str, np.ndarray]:
    """The same for every ground-truth box (tight crop), in image order then box order."""
    feats = []
    for im in images:
        img = load_rgb(im.path)
        for x1, y1, x2, y2 in np.asarray(im.boxes, dtype=int):
            crop = img[max(y1, 0):max(y2, y1 + 2), max(x1, 0):max(x2, x1 + 2)]
            feats.append(lowlevel_features(crop))
    return _stack(feats)


def probe_features(train_x: dict[str, np.ndarray], train_labels: np.ndarray, train_ignore: np.ndarray | None,
                   test_x: dict[str, np.ndarray], test_labels: np.ndarray, test_ignore: np.ndarray, *,
                   svm: SVMConfig, ap_mode: str = "voc07",
                   scores: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per-class test AP of one-vs-rest SVMs for each feature group; rows
    ``{features, class, ap, c}`` with a ``class == "mAP"`` row per group (as ``run_probes``).
    ``scores``, when given, receives each group's test decision values ``[N, classes]``."""
    rows: list[dict[str, Any]] = []
    ignore = None if train_ignore is None else torch.from_numpy(train_ignore)
    for name in FEATURES:
        probe = fit_probe(torch.from_numpy(train_x[name]), torch.from_numpy(train_labels), cfg=svm,
                          ignore=ignore)
        test_scores = probe.decision_function(torch.from_numpy(test_x[name]))
        per_class, mean = mean_average_precision(test_scores, test_labels, difficult=test_ignore,
                                                 mode=ap_mode)
        if scores is not None:
            scores[name] = test_scores.detach().cpu().numpy().astype(np.float32)
        rows += [{"features": name, "class": cls, "ap": float(ap), "c": float(c)}
                 for cls, ap, c in zip(VOC_CLASSES, per_class, probe.c, strict=True)]
        rows.append({"features": name, "class": "mAP", "ap": float(mean), "c": None})
    return rows
