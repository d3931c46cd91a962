"""R-CNN windows: label proposals against ground truth and warp boxes to the network input.

Boxes are float ``[x1, y1, x2, y2)`` in 0-based, half-open pixel coordinates (see
``cnnft.data.voc``). The warp follows Caffe's WindowDataLayer / R-CNN "warp" mode: grow the box
about its centre by ``crop / (crop - 2*pad)`` so that ``pad`` pixels of context surround it
after warping, bilinearly resize the part inside the image into its place in the
``crop x crop`` output, and leave zeros (the mean, after subtraction) outside the image. On a
GPU it is done for many boxes at once with ``grid_sample`` (one bilinear sample per output
pixel) on the mean-subtracted image plus a ones-channel that marks where the image is; on the
CPU one box at a time with OpenCV, which is faster there.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn.functional import grid_sample
from torchvision.ops import box_iou


def context_boxes(boxes: torch.Tensor, crop: int, pad: int) -> torch.Tensor:
    """Grow ``boxes [N,4]`` about their centres so ``pad`` px of context surround them at ``crop``."""
    scale = crop / (crop - 2 * pad)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    return torch.cat([centre - half, centre + half], dim=1)


def warp_boxes(image: torch.Tensor, boxes: torch.Tensor, *, crop: int, pad: int,
               method: str = "auto", mean_image: torch.Tensor | None = None) -> torch.Tensor:
    """Warp each box of one image to a ``crop x crop`` window with ``pad`` px of context.

    Args:
        image: float ``[3,H,W]``, already mean-subtracted (any device), or, with ``mean_image``,
            not mean-subtracted.
        mean_image: float ``[3,crop,crop]`` subtracted from the part of each window that lies
            inside the image (R-CNN's ``rcnn_im_crop``, Caffe's WindowDataLayer with a mean file);
            see ``cnnft.data.transforms.window_source``.
        boxes: float ``[N,4]`` half-open pixel boxes in ``image``'s coordinates.
        method: ``"batched"`` (every box at once with ``grid_sample``, on the image's device),
            ``"per_box"`` (OpenCV crop + resize one box at a time, as Caffe's WindowDataLayer;
            CPU only) or ``"auto"``: per box on the CPU, where it is 5x faster (bench/RESULTS.md),
            batched on a GPU. The two agree to about 0.2% of the pixel range (rounding at the
            window's edges).
    Returns:
        float ``[N,3,crop,crop]``; samples outside the image are 0.
    """
    if method == "auto":
        method = "per_box" if image.device.type == "cpu" else "batched"
    if method == "per_box":
        return _warp_per_box(image, boxes, crop=crop, pad=pad, mean_image=mean_image)
    if method != "batched":
        raise ValueError(f"warp method {method!r}; expected auto, batched or per_box")
    _, h, w = image.shape
    # the ones-channel falls off to 0 just outside the image (zero padding)
    source = torch.cat([image, image.new_ones(1, h, w)])[None]
    r = context_boxes(boxes.to(image), crop, pad)
    # sample j of a box's side [a, b) sits at a + (j + 1/2) (b - a) / crop, in grid_sample's
    # coordinates (align_corners=False: -1 and 1 are the outer edges of the image's pixels)
    t = (2 * torch.arange(crop, dtype=image.dtype, device=image.device) + 1) / crop
    gx = (2 * r[:, 0:1] + t * (r[:, 2:3] - r[:, 0:1])) / w - 1
    gy = (2 * r[:, 1:2] + t * (r[:, 3:4] - r[:, 1:2])) / h - 1
    grid = torch.stack([gx[:, None, :].expand(-1, crop, -1), gy[:, :, None].expand(-1, -1, crop)], -1)
    out = grid_sample(source.expand(len(r), -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False)
    pixels, mask = out[:, :3], out[:, 3:]
    inside = mask >= 0.5
    # undo the blend with the zero padding at the image edge (edge pixels are repeated instead)
    pixels = pixels / mask.clamp_min(1e-6)
    if mean_image is not None:
        pixels = pixels - mean_image.to(pixels)
    return torch.where(inside, pixels, pixels.new_zeros(()))


def _warp_per_box(image: torch.Tensor, boxes: torch.Tensor, *, crop: int, pad: int,
                  mean_image: torch.Tensor | None = None) -> torch.Tensor:
    """Caffe's crop: grow the box, round it to pixels, resize its part inside the image into
    its place in a zero window. Returns NHWC memory (``channels_last``), as the network runs."""
    if image.device.type != "cpu":
        raise ValueError(f"per-box warping runs on the CPU; the image is on {image.device}")
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy(), dtype=np.float32)
    h, w = hwc.shape[:2]
    out = np.zeros((len(boxes), crop, crop, 3), np.float32)
    mean = None if mean_image is None else mean_image.permute(1, 2, 0).cpu().numpy()
    grown = context_boxes(boxes.double().cpu(), crop, pad).round().long().tolist()
    for i, (x1, y1, x2, y2) in enumerate(grown):
        sx, sy = crop / max(x2 - x1, 1), crop / max(y2 - y1, 1)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if cx2 <= cx1 or cy2 <= cy1:
            continue  # nothing of the image in the window
        ox1, oy1 = round((cx1 - x1) * sx), round((cy1 - y1) * sy)
        ox2, oy2 = round((cx2 - x1) * sx), round((cy2 - y1) * sy)
        if ox2 > ox1 and oy2 > oy1:
            out[i, oy1:oy2, ox1:ox2] = cv2.resize(hwc[cy1:cy2, cx1:cx2], (ox2 - ox1, oy2 - oy1),
                                                  interpolation=cv2.INTER_LINEAR)
            if mean is not None:
                out[i, oy1:oy2, ox1:ox2] -= mean[oy1:oy2, ox1:ox2]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


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
