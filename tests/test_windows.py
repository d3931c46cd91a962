"""R-CNN windows: warping boxes with context (against OpenCV) and labelling proposals."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cnnft.data.windows import context_boxes, label_windows, warp_boxes


def _hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _warp(image: torch.Tensor, boxes, crop: int, pad: int, method: str = "batched") -> np.ndarray:
    out = warp_boxes(image, torch.as_tensor(boxes, dtype=torch.float32), crop=crop, pad=pad, method=method)
    assert tuple(out.shape) == (len(boxes), 3, crop, crop)
    return out.permute(0, 2, 3, 1).numpy()


def _bilinear(hwc: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of the whole image at pixel-index coordinates, edges replicated."""
    h, w = hwc.shape[:2]
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = hwc[y0][:, x0] * (1 - fx) + hwc[y0][:, x1] * fx
    bottom = hwc[y1][:, x0] * (1 - fx) + hwc[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A mean-subtracted-looking smooth image in [-1, 1] (natural images are locally smooth)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((h, w, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3.0)
    smooth = smooth / np.abs(smooth).max()
    return torch.from_numpy(smooth).permute(2, 0, 1).contiguous()


# boxes inside a 60x80 image, warped to 24 px: side / 24 spans 13/24 .. 47/24 (both < 2x)
INSIDE = np.array([
    [30, 10, 77, 57],  # down x1.96 both ways
    [5, 20, 40, 50],   # down
    [10, 5, 23, 18],   # up x1.85 both ways
    [40, 2, 60, 40],   # up in x, down in y
    [0, 0, 20, 30],    # up, touching the top-left image corner
    [60, 30, 80, 60],  # up, touching the bottom-right image corner
    [17, 31, 53, 44],  # down in x, up in y
])


def test_warp_without_context_matches_cv2_resize() -> None:
    image = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    hwc, crop = _hwc(image), 24
    out = _warp(image, INSIDE, crop, pad=0)
    for got, (x1, y1, x2, y2) in zip(out, INSIDE.tolist()):
        ref = cv2.resize(hwc[y1:y2, x1:x2], (crop, crop), interpolation=cv2.INTER_LINEAR)
        # cv2 replicates the crop's own edge; warp_boxes samples the image around the box, so
        # the outermost output row/column of an upscaled side that is not at the image edge
        # (its sample lies < 0.5 px outside the box) is compared with the full-image sample
        ry = slice(1 if y2 - y1 < crop and y1 > 0 else 0,
                   crop - 1 if y2 - y1 < crop and y2 < 60 else crop)
        rx = slice(1 if x2 - x1 < crop and x1 > 0 else 0,
                   crop - 1 if x2 - x1 < crop and x2 < 80 else crop)
        np.testing.assert_allclose(got[ry, rx], ref[ry, rx], atol=1e-3, rtol=0)
        centres = (np.arange(crop) + 0.5) / crop
        ys = y1 + centres * (y2 - y1) - 0.5
        xs = x1 + centres * (x2 - x1) - 0.5
        np.testing.assert_allclose(got, _bilinear(hwc, ys, xs), atol=1e-3, rtol=0)
    # the down-scaled boxes match cv2 everywhere, borders included
    for i in (0, 1):
        x1, y1, x2, y2 = INSIDE[i]
        ref = cv2.resize(hwc[y1:y2, x1:x2], (crop, crop), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(out[i], ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["batched", "per_box"])
def test_warp_with_context_at_image_corner_is_zero_outside(method: str) -> None:
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) + 1.0  # no zeros
    crop, pad = 40, 8
    # box [0,32)^2 grows by 40/24 to [-10.67, 42.67)^2: 8 output px (= pad) fall off the image
    out = _warp(image, [[0, 0, 32, 32], [32, 32, 64, 64]], crop, pad, method)
    top_left, bottom_right = out
    assert (top_left[:pad] == 0).all() and (top_left[:, :pad] == 0).all()
    assert (top_left[pad:, pad:] >= 1.0 - 1e-5).all()
    assert (top_left == 0).mean() == pytest.approx(1 - (32 / 40) ** 2)
    assert (bottom_right[-pad:] == 0).all() and (bottom_right[:, -pad:] == 0).all()
    assert (bottom_right[:-pad, :-pad] >= 1.0 - 1e-5).all()
    assert (bottom_right == 0).mean() == pytest.approx(0.36)
    # a box centred in the image with the same context has no zero at all
    assert (_warp(image, [[16, 16, 48, 48]], crop, pad, method) != 0).all()
    # only the left edge is off the image: 4 of 40 columns for a box [0,16)x[20,44) grown by 5/4
    left = _warp(image, [[0, 20, 16, 44]], 40, 4, method)[0]
    assert (left[:, :4] == 0).all() and (left[:, 4:] != 0).all()
    assert (left == 0).mean() == pytest.approx(4 / 40)


def test_context_boxes_grow_about_centre() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 12.0, 12.0]])
    grown = context_boxes(boxes, crop=20, pad=4)  # scale 20 / 12
    torch.testing.assert_close(grown[0], torch.tensor([20 - 50 / 3, 40 - 100 / 3,
                                                       20 + 50 / 3, 40 + 100 / 3]))
    torch.testing.assert_close(grown[1], torch.tensor([-4.0, -4.0, 16.0, 16.0]))
    torch.testing.assert_close((grown[:, :2] + grown[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2)
    torch.testing.assert_close(context_boxes(boxes, crop=227, pad=16)[:, 2:]
                               - context_boxes(boxes, crop=227, pad=16)[:, :2],
                               (boxes[:, 2:] - boxes[:, :2]) * 227 / 195)
    torch.testing.assert_close(context_boxes(boxes, crop=227, pad=0), boxes)


def _caffe_window(hwc: np.ndarray, box, crop: int, pad: int) -> np.ndarray:
    """Reference: one box cropped as Caffe's WindowDataLayer does it, in half-open coordinates.

    Expand the box about its centre by crop/(crop-2*pad), round to pixels, clip to the image,
    resize the clipped part and paste it at its proportional place in a zero crop.
    """
    h, w = hwc.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = crop / (crop - 2 * pad)
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    ux1, uy1, ux2, uy2 = (int(round(v)) for v in (cx - hw, cy - hh, cx + hw, cy + hh))
    sx, sy = crop / (ux2 - ux1), crop / (uy2 - uy1)
    kx1, ky1, kx2, ky2 = max(ux1, 0), max(uy1, 0), min(ux2, w), min(uy2, h)
    ox1, oy1 = int(round((kx1 - ux1) * sx)), int(round((ky1 - uy1) * sy))
    ox2, oy2 = int(round((kx2 - ux1) * sx)), int(round((ky2 - uy1) * sy))
    out = np.zeros((crop, crop, hwc.shape[2]), np.float32)
    out[oy1:oy2, ox1:ox2] = cv2.resize(hwc[ky1:ky2, kx1:kx2], (ox2 - ox1, oy2 - oy1),
                                       interpolation=cv2.INTER_LINEAR)
    return out


@pytest.mark.parametrize("method", ["batched", "per_box"])
def test_warp_matches_caffe_style_crop(method: str) -> None:
    """Both warps against an independent Caffe-style crop: per box it is that crop (to float
    rounding); batched, it agrees up to the rounding of the window's edges."""
    rng = np.random.default_rng(5)
    h, w, crop, pad = 90, 120, 48, 8
    image = _smooth_image(h, w, seed=6)
    hwc = _hwc(image)
    boxes = []
    while len(boxes) < 20:
        x1, y1 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        x2, y2 = rng.integers(x1 + 10, min(w, x1 + 90) + 1), rng.integers(y1 + 10, h + 1)
        boxes.append([x1, y1, x2, y2])
    boxes = np.array(boxes, np.float32)
    ctx = context_boxes(torch.from_numpy(boxes), crop, pad).numpy()
    assert ((ctx[:, :2] < 0) | (ctx[:, 2:] > [w, h])).any(axis=1).sum() >= 10  # many clipped
    out = _warp(image, boxes, crop, pad, method)
    value_range = float(hwc.max() - hwc.min())
    diffs = []
    for got, box in zip(out, boxes):
        ref = _caffe_window(hwc, box, crop, pad)
        diffs.append(np.abs(got - ref).mean() / value_range)
        # the zero (outside-the-image) regions agree up to one row/column of rounding
        assert abs((got == 0).all(-1).sum() - (ref == 0).all(-1).sum()) <= 2 * crop
    assert max(diffs) < (1e-6 if method == "per_box" else 0.03)
    assert np.mean(diffs) < (1e-6 if method == "per_box" else 0.015)


def test_auto_warp_is_per_box_on_the_cpu_and_bad_methods_are_refused() -> None:
    image = _smooth_image(40, 50, seed=1)
    boxes = torch.tensor([[3.0, 4.0, 30.0, 33.0], [10.0, 0.0, 50.0, 40.0]])
    auto = warp_boxes(image, boxes, crop=24, pad=4)
    assert torch.equal(auto, warp_boxes(image, boxes, crop=24, pad=4, method="per_box"))
    assert auto.is_contiguous(memory_format=torch.channels_last)  # as the network runs
    with pytest.raises(ValueError, match="warp method 'nearest'; expected auto, batched or per_box"):
        warp_boxes(image, boxes, crop=24, pad=4, method="nearest")


def test_label_windows_gt_and_best_overlap() -> None:
    gt = np.array([[0, 0, 20, 20], [10, 0, 30, 20], [50, 50, 70, 90]], np.float32)
    classes = np.array([3, 7, 0])
    proposals = np.array([
        [2, 0, 22, 20],     # IoU 0.82 with gt0, 0.43 with gt1 -> class 3
        [8, 0, 28, 20],     # IoU 0.43 with gt0, 0.82 with gt1 -> class 7
        [50, 50, 70, 70],   # IoU exactly 0.5 with gt2 -> class 0 (+1)
        [50, 50, 70, 69],   # IoU 0.475 -> background
        [100, 100, 120, 120],  # no overlap -> background
    ], np.float32)
    win = label_windows(proposals, gt, classes)
    np.testing.assert_array_equal(win.boxes, np.concatenate([gt, proposals]))
    np.testing.assert_array_equal(win.labels, [4, 8, 1, 4, 8, 1, 0, 0])
    np.testing.assert_allclose(win.overlaps, [1, 1, 1, 360 / 440, 360 / 440, 0.5, 380 / 800, 0],
                               rtol=1e-5)
    assert win.boxes.dtype == np.float32 and win.labels.dtype == np.int64
    # a higher threshold turns the 0.5 window into background
    stricter = label_windows(proposals, gt, classes, fg_threshold=0.6)
    np.testing.assert_array_equal(stricter.labels, [4, 8, 1, 4, 8, 0, 0, 0])


def test_label_windows_ignores_difficult() -> None:
    gt = np.array([[0, 0, 20, 20], [40, 40, 60, 60]], np.float32)
    classes = np.array([2, 5])
    proposals = np.array([
        [41, 40, 60, 60],  # IoU 0.95 with the difficult box -> dropped
        [40, 40, 60, 50],  # IoU 0.5 with the difficult box -> dropped
        [40, 40, 60, 49],  # IoU 0.45 with the difficult box -> background
        [0, 0, 20, 19],    # IoU 0.95 with the kept box -> class 2 (+1)
    ], np.float32)
    win = label_windows(proposals, gt, classes, ignore=np.array([False, True]))
    np.testing.assert_array_equal(win.boxes, np.array([gt[0], proposals[2], proposals[3]]))
    np.testing.assert_array_equal(win.labels, [3, 0, 3])
    np.testing.assert_allclose(win.overlaps, [1.0, 0.45, 0.95], rtol=1e-5)
    # with no ignore flags the difficult box is an ordinary object
    plain = label_windows(proposals, gt, classes)
    np.testing.assert_array_equal(plain.labels, [3, 6, 6, 6, 0, 3])


def test_label_windows_without_gt_is_all_background() -> None:
    proposals = np.array([[0, 0, 10, 10], [5, 5, 30, 40]], np.float32)
    win = label_windows(proposals, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    np.testing.assert_array_equal(win.boxes, proposals)
    np.testing.assert_array_equal(win.labels, [0, 0])
    np.testing.assert_array_equal(win.overlaps, [0, 0])
    assert win.labels.dtype == np.int64
    # all GT difficult: no GT window, matching proposals dropped, the rest background
    gt = np.array([[0, 0, 10, 10]], np.float32)
    hard = label_windows(proposals, gt, np.array([4]), ignore=np.array([True]))
    np.testing.assert_array_equal(hard.boxes, proposals[1:])
    np.testing.assert_array_equal(hard.labels, [0])
