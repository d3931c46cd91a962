"""R-CNN windows: label proposals against ground truth and warp boxes to the network input.

Boxes are float ``[x1, y1, x2, y2)`` in 0-based, half-open pixel coordinates (see
``cnnft.data.voc``). The warp follows Caffe's WindowDataLayer / R-CNN "warp" mode: grow the box
about its centre by ``crop / (crop - 2*pad)`` so that ``pad`` pixels of context surround it
after warping, bilinearly resize the part inside the image into its place in the
``crop x crop`` output, and leave zeros (the mean, after subtraction) outside the image. It is
done for many boxes at once with ``torchvision.ops.roi_align`` (aligned, one sample per bin)
on the mean-subtracted image plus a ones-channel that marks where the image is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou, roi_align


def context_boxes(boxes: torch.Tensor, crop: int, pad: int) -> torch.Tensor:
    """Grow ``boxes [N,4]`` about their centres so ``pad`` px of context surround them at ``crop``."""
    scale = crop / (crop - 2 * pad)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    return torch.cat([centre - half, centre + half], dim=1)


def warp_boxes(image: torch.Tensor, boxes: torch.Tensor, *, crop: int, pad: int) -> torch.Tensor:
    """Warp each box of one image to a ``crop x crop`` window with ``pad`` px of context.

    Args:
        image: float ``[3,H,W]``, already mean-subtracted (any device).
        boxes: float ``[N,4]`` half-open pixel boxes in ``image``'s coordinates.
    Returns:
        float ``[N,3,crop,crop]``; samples outside the image are 0.
    """
    _, h, w = image.shape
    # one pixel of zero border lets the ones-channel fall off to 0 just outside the image
    padded = torch.nn.functional.pad(
        torch.cat([image, image.new_ones(1, h, w)]), (1, 1, 1, 1))
    rois = context_boxes(boxes.to(image), crop, pad) + 1.0
    rois = torch.cat([rois.new_zeros(len(rois), 1), rois], dim=1)
    out = roi_align(padded[None], rois, (crop, crop), spatial_scale=1.0, sampling_ratio=1,
                    aligned=True)
    pixels, mask = out[:, :3], out[:, 3:]
    inside = mask >= 0.5
    # undo the blend with the zero border at the image edge (edge pixels are repeated instead)
    return torch.where(inside, pixels / mask.clamp_min(1e-6), pixels.new_zeros(()))


@dataclass(frozen=True)
class LabelledWindows:
    """Windows of one image: ``boxes [N,4]``, class ``labels [N]`` (0 = background), best IoU."""

    boxes: np.ndarray
    labels: np.ndarray
    overlaps: np.ndarray


def label_windows(proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                  ignore: np.ndarray | None = None, fg_threshold: float = 0.5) -> LabelledWindows:
    """Label proposals plus ground-truth boxes as in R-CNN fine-tuning.

    Every window takes the class (``gt_labels`` are 0-based classes; windows use ``class+1``,
    0 being background) of the ground-truth box it overlaps most, if that IoU is at least
    ``fg_threshold``; otherwise it is background. Ground-truth boxes are windows themselves,
    except those flagged in ``ignore`` (e.g. "difficult"); a window whose best box is an
    ignored one with IoU >= ``fg_threshold`` is dropped, being neither foreground nor background.
    """
    ignore = np.zeros(len(gt_boxes), bool) if ignore is None else np.asarray(ignore, bool)
    kept_gt = gt_boxes.reshape(-1, 4)[~ignore]
    boxes = np.concatenate([kept_gt, proposals.reshape(-1, 4)]).astype(np.float32)
    if len(gt_boxes) == 0:
        zeros = np.zeros(len(boxes), dtype=np.float32)
        return LabelledWindows(boxes, zeros.astype(np.int64), zeros)
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes.astype(np.float32)))
    best, arg = (t.numpy() for t in iou.max(dim=1))
    fg = best >= fg_threshold
    labels = np.where(fg, gt_labels[arg] + 1, 0)
    keep = ~(fg & ignore[arg])
    return LabelledWindows(boxes[keep], labels[keep].astype(np.int64), best[keep])
