"""Selective search: the old default (OpenCV's ``switchToSelectiveSearchFast``: k 150/300/450,
minimum segment 100, top 2000 boxes) against R-CNN's MATLAB fast mode (k 50/100, minimum segment
k, no cap; the new default), on the demo VOC test images.

The demo data (``cnnft.data.demo``, the demo scale's spec) is generated once into ``--data``
(a temporary folder by default). Per setting the script prints boxes per image (mean, median,
max), seconds per image (one process, one OpenCV thread; both settings run image by image in
turns, so load on the machine hits both alike) and the recall of the test ground-truth boxes at
IoU 0.5 and 0.7 (every box, and the non-difficult ones), plus the recall of the new setting's
top-ranked N boxes for the caps in ``--caps``. Both settings use the demo's ``min_size`` (10 px).

Run ``python bench/proposals.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from cnnft.data.demo import DemoSpec, generate_demo
from cnnft.data.images import load_rgb
from cnnft.data.proposals import OPENCV_FAST, ProposalSettings, selective_search
from cnnft.data.voc import load_voc


def recall(boxes: list[np.ndarray], gts: list[np.ndarray], iou: float) -> float:
    """Fraction of ground-truth boxes covered by some proposal at IoU >= ``iou``."""
    hit = total = 0
    for b, g in zip(boxes, gts, strict=True):
        total += len(g)
        if len(g) and len(b):
            hit += int((box_iou(torch.from_numpy(g), torch.from_numpy(b)).amax(1) >= iou).sum())
    return hit / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="demo data folder (default: a temporary one)")
    p.add_argument("--images", type=int, default=200, help="test images used")
    p.add_argument("--min-size", type=int, default=10, help="proposals.min_size (demo scale: 10)")
    p.add_argument("--caps", type=int, nargs="*", default=[300, 500, 1000])
    args = p.parse_args()
    data = args.data or Path(tempfile.mkdtemp(prefix="cnnft_bench_ss_"))
    t0 = time.perf_counter()
    roots = generate_demo(data / "demo", DemoSpec(), progress=False)
    print(f"demo data in {data} ({time.perf_counter() - t0:.0f} s)")
    images = load_voc(roots["voc_root"], "test")[: args.images]
    settings = {"old (OpenCV fast preset, top 2000)": ProposalSettings(min_size=args.min_size, max_boxes=2000,
                                                                       **OPENCV_FAST),
                "new (R-CNN fast mode, no cap)": ProposalSettings(min_size=args.min_size)}
    boxes: dict[str, list[np.ndarray]] = {k: [] for k in settings}
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    for im in images:
        pixels = load_rgb(im.path)
        for name, s in settings.items():
            t = time.perf_counter()
            boxes[name].append(selective_search(pixels, s))
            seconds[name].append(time.perf_counter() - t)
    gts = [im.boxes for im in images]
    easy = [im.boxes[~im.difficult] for im in images]
    sizes = [f"{im.width}x{im.height}" for im in images]
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {len(images)} demo test images ({sizes[0]}..), "
          f"{sum(map(len, gts))} ground-truth boxes ({sum(map(len, easy))} not difficult)")
    print("| setting | boxes/image mean (median, max) | s/image | recall@0.5 | recall@0.7 | "
          "non-difficult @0.5 / @0.7 |")
    print("|---|---|---|---|---|---|")
    base = statistics.mean(seconds[next(iter(settings))])

    def row(name: str, bxs: list[np.ndarray], secs: float | None) -> None:
        n = [len(b) for b in bxs]
        time_s = f"{secs:.3f} ({secs / base:.2f}x)" if secs is not None else "-"
        print(f"| {name} | {statistics.mean(n):.0f} ({statistics.median(n):.0f}, {max(n)}) | {time_s} | "
              f"{recall(bxs, gts, 0.5):.3f} | {recall(bxs, gts, 0.7):.3f} | "
              f"{recall(bxs, easy, 0.5):.3f} / {recall(bxs, easy, 0.7):.3f} |")

    for name in settings:
        row(name, boxes[name], statistics.mean(seconds[name]))
    new = boxes[list(settings)[1]]
    for cap in args.caps:
        row(f"new, top {cap}", [b[:cap] for b in new], None)


if __name__ == "__main__":
    main()
