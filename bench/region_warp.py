"""Region warping for detection: ``warp_boxes(method="batched")`` (``grid_sample`` over all boxes,
on ``--device``) against ``method="per_box"`` (OpenCV crop + resize + paste one box at a time,
Caffe's WindowDataLayer / R-CNN, on the CPU), both producing mean-subtracted
``[N, 3, crop, crop]`` float32 windows with ``pad`` px of context for every box of one image.

The image is a smooth random 500x375 picture (a VOC-sized image) and the boxes are
selective-search-like: random positions, sides from 20 px to the whole image (log-uniform), a
third of them reaching outside the image after the context grows them. Both variants run
side by side in this process, ``--repeats`` times, interleaved; the script prints the median
wall time of each and their ratio, plus the mean absolute difference between the two outputs
(relative to the pixel range) as a check that they compute the same windows.

Run ``python bench/region_warp.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import cv2
import numpy as np
import torch

from cnnft.data.transforms import IMAGENET_MEAN_RGB, subtract_mean, to_tensor
from cnnft.data.windows import warp_boxes


def make_inputs(n: int, width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    image = np.clip(cv2.GaussianBlur(noise, (0, 0), 4.0) * 3 - 255, 0, 255).astype(np.uint8)
    side = np.exp(rng.uniform(np.log(20), np.log(min(width, height)), (n, 2)))
    x1 = rng.uniform(0, width - side[:, 0])
    y1 = rng.uniform(0, height - side[:, 1])
    boxes = np.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1).round().astype(np.float32)
    return image, boxes


def batched(image: np.ndarray, boxes: np.ndarray, crop: int, pad: int, chunk: int,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """All windows of one image; on a GPU the decoded uint8 image and the boxes are copied
    there first (counted) and the windows stay there, as the region-feature pass uses them."""
    x = subtract_mean(to_tensor(image).to(device), IMAGENET_MEAN_RGB)
    b = torch.from_numpy(boxes).to(device)
    out = torch.cat([warp_boxes(x, b[s:s + chunk], crop=crop, pad=pad, method="batched")
                     for s in range(0, len(b), chunk)])
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out


def per_box(image: np.ndarray, boxes: np.ndarray, crop: int, pad: int) -> torch.Tensor:
    x = subtract_mean(to_tensor(image), IMAGENET_MEAN_RGB)
    return warp_boxes(x, torch.from_numpy(boxes), crop=crop, pad=pad, method="per_box")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=2000)
    parser.add_argument("--crop", type=int, default=227)
    parser.add_argument("--pad", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=250, help="boxes per grid_sample call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op threads for the batched variant (OpenCV uses 1)")
    parser.add_argument("--device", default="cpu",
                        help="where the batched variant runs (cpu, cuda); per-box is always CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    cv2.setNumThreads(1)
    image, boxes = make_inputs(args.boxes, 500, 375, seed=0)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OpenCV {cv2.__version__}; load average {os.getloadavg()[0]:.2f}; batched on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{args.boxes} boxes, 500x375 image, crop {args.crop}, pad {args.pad}")
    ref = per_box(image, boxes, args.crop, args.pad)
    for threads in args.threads:
        torch.set_num_threads(threads)
        got = batched(image, boxes, args.crop, args.pad, args.chunk, device).cpu()
        diff = float((got - ref).abs().mean() / 255)
        times: dict[str, list[float]] = {"batched": [], "per_box": []}
        for _ in range(args.repeats):
            for name, fn in (("batched", lambda: batched(image, boxes, args.crop, args.pad, args.chunk,
                                                         device)),
                             ("per_box", lambda: per_box(image, boxes, args.crop, args.pad))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        b, p = statistics.median(times["batched"]), statistics.median(times["per_box"])
        print(f"threads={threads}: batched grid_sample {b:.3f} s ({args.boxes / b:.0f} boxes/s), "
              f"per-box OpenCV {p:.3f} s ({args.boxes / p:.0f} boxes/s), ratio {p / b:.2f}x; "
              f"mean |difference| {100 * diff:.2f}% of the pixel range")


if __name__ == "__main__":
    main()
