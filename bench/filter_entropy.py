"""Vectorised area under the entropy curve against a plain loop over filters and thresholds.

Data: pool5-like activations, ``--boxes`` ground-truth boxes x 36 positions = samples (default
13,900 x 36 = 500,400) for ``--filters`` filters (256), ReLU'd (about half zeros, so many ties),
20 classes with VOC-like frequencies; each filter leans towards one class.

The vectorised ``area_under_entropy`` (rank and value thresholds) is timed once each; the plain
loop (per filter: a stable argsort, then per threshold a bincount of the top labels -- numpy
inside, Python loops over filters and thresholds, the definition of the tests) runs over
``--loop-filters`` filters (default: all) and is scaled to all filters if fewer. Both give the
same AuE (the largest difference is printed).

Run ``python bench/filter_entropy.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time

import numpy as np
import torch

from analyses.filter_entropy import area_under_entropy


def pool5_like(boxes: int, filters: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[boxes * 36, filters]`` float32 activations and ``[boxes * 36]`` labels."""
    g = torch.Generator().manual_seed(seed)
    freq = 1.0 / (torch.arange(classes) + 3.0)
    box_labels = torch.multinomial(freq, boxes, replacement=True, generator=g)
    labels = box_labels.repeat_interleave(36)
    prefer = torch.randint(0, classes, (filters,), generator=g)
    acts = torch.randn(boxes * 36, filters, generator=g)
    acts += 1.5 * (labels[:, None] == prefer[None, :]).float()
    return acts.relu_(), labels


def plain_loop(acts: np.ndarray, labels: np.ndarray, classes: int, t: int) -> np.ndarray:
    """The definition, one filter and one threshold at a time (numpy inside the loops)."""
    n, f = acts.shape
    out = np.zeros(f)
    for k in range(f):
        order = np.argsort(-acts[:, k], kind="stable")
        ranked = labels[order]
        hs = []
        for j in range(1, t + 1):
            p = np.bincount(ranked[: math.ceil(j * n / t)], minlength=classes).astype(np.float64)
            p = p[p > 0] / p.sum()
            hs.append(-(p * np.log2(p)).sum())
        out[k] = np.mean(hs)
    return out


def load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, default=13_900)
    ap.add_argument("--filters", type=int, default=256)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--thresholds", type=int, default=100)
    ap.add_argument("--loop-filters", type=int, default=0, help="filters for the plain loop (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    acts, labels = pool5_like(args.boxes, args.filters, args.classes, args.seed)
    n = acts.shape[0]
    print(f"{datetime.date.today()}  {platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)  numpy {np.__version__}")
    print(f"{args.filters} filters x {n} samples, {args.classes} classes, T={args.thresholds}, "
          f"zeros {(acts == 0).float().mean():.2f}; {load()}")
    times, cpus, aue = {}, {}, {}
    for mode in ("rank", "value"):
        t0, c0 = time.perf_counter(), time.process_time()
        aue[mode] = area_under_entropy(acts, labels, args.classes, num_thresholds=args.thresholds,
                                       threshold_mode=mode)
        times[mode], cpus[mode] = time.perf_counter() - t0, time.process_time() - c0
        print(f"vectorised {mode}: {times[mode]:.2f} s wall, {cpus[mode]:.2f} s CPU  ({load()})", flush=True)
    m = args.loop_filters or args.filters
    a_np, l_np = acts[:, :m].numpy(), labels.numpy()
    t0, c0 = time.perf_counter(), time.process_time()
    ref = plain_loop(a_np, l_np, args.classes, args.thresholds)
    loop = (time.perf_counter() - t0) * args.filters / m
    loop_cpu = (time.process_time() - c0) * args.filters / m
    scaled = "" if m == args.filters else f" (timed {m} filters, scaled to {args.filters})"
    print(f"plain loop: {loop:.1f} s wall, {loop_cpu:.1f} s CPU{scaled}  ({load()})")
    diff = float(np.abs(aue["rank"][:m].double().numpy() - ref).max())
    print(f"max |AuE vectorised rank - plain loop| = {diff:.2e}")
    print()
    print("| variant | wall s | vs plain loop | CPU s | CPU ratio |")
    print("|---|---|---|---|---|")
    print(f"| plain loop (rank) | {loop:.1f} | 1.0x | {loop_cpu:.1f} | 1.0x |")
    for mode in ("rank", "value"):
        print(f"| vectorised {mode} | {times[mode]:.2f} | {loop / times[mode]:.1f}x | {cpus[mode]:.2f} | "
              f"{loop_cpu / cpus[mode]:.1f}x |")


if __name__ == "__main__":
    main()
