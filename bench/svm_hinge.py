"""Detection SVMs with R-CNN's loss: the torch solver's hinge against liblinear's ``-s 3``.

R-CNN's detector problem (``rcnn_train.m``): L2-regularised hinge, C 1e-3, positive weight 2,
bias feature 10, features scaled to mean norm 20. Data: synthetic detection-like windows, one
problem per class (``--classes``), each with ``--rows`` training windows (``--pos-frac``
positives, the rest like cached hard negatives: same ReLU statistics, weaker class evidence)
of ``--dim`` dimensions (demo pool5: 1024; paper pool5: 9216), and as many held-out windows.

Timed per class: ``LinearSVC(loss="hinge", dual=True)`` at its default ``tol`` 1e-4 and at
liblinear's default ``eps`` 0.1 (R-CNN's setting); the torch solver (``loss="hinge"``) one class
at a time (as hard-negative mining calls it) and all classes in one batch. Reported: seconds
per class as ratios against LinearSVC measured in the same process, and the held-out VOC07 AP
(mean over classes) of each, plus the largest difference of held-out decision values from the
tight LinearSVC relative to their spread.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from sklearn.svm import LinearSVC

from cnnft.metrics import average_precision
from cnnft.svm import SVMConfig, train_svms


def problem(rows: int, dim: int, pos_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(2 * rows, generator=g) < pos_frac
    proto = (torch.rand(dim, generator=g) < 0.1).float() * 1.5
    strength = torch.rand(2 * rows, 1, generator=g)
    x = (torch.randn(2 * rows, dim, generator=g) - 0.5 + (y[:, None] * 0.7 + 0.3) * strength * proto).relu()
    return x * (20 / x.norm(dim=1).mean()), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--pos-frac", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = [problem(args.rows, args.dim, args.pos_frac, seed) for seed in range(args.classes)]
    n = args.rows
    times: dict[str, float] = {}
    aps: dict[str, list[float]] = {}
    dev: dict[str, float] = {}
    ref_scores = []
    for name, tol in (("liblinear tol 1e-4", 1e-4), ("liblinear eps 0.1 (R-CNN)", 0.1)):
        t0 = time.perf_counter()
        for x, y in data:
            svc = LinearSVC(C=1e-3, loss="hinge", dual=True, class_weight={1: 2.0, 0: 1.0},
                            intercept_scaling=10, tol=tol, max_iter=100000)
            svc.fit(x[:n].numpy(), y[:n].numpy().astype(int))
            s = x[n:].numpy() @ svc.coef_[0] + svc.intercept_[0]
            aps.setdefault(name, []).append(average_precision(s, y[n:].numpy()))
            if tol == 1e-4:
                ref_scores.append(s)
            else:
                k = len(aps[name]) - 1
                dev[name] = max(dev.get(name, 0), np.abs(s - ref_scores[k]).max() / ref_scores[k].std())
        times[name] = (time.perf_counter() - t0) / args.classes
    cfg = SVMConfig(c_grid=(1e-3,), folds=1, pos_weight=2.0, bias=10.0, normalize="none", tol=1e-4,
                    loss="hinge", dtype="float32")
    name = "torch hinge, one class at a time"
    t0 = time.perf_counter()
    for k, (x, y) in enumerate(data):
        W, b = train_svms(x[:n], y[:n], 1e-3, cfg=cfg)
        s = (x[n:] @ W.T + b)[:, 0].double().numpy()
        aps.setdefault(name, []).append(average_precision(s, y[n:].numpy()))
        dev[name] = max(dev.get(name, 0), np.abs(s - ref_scores[k]).max() / ref_scores[k].std())
    times[name] = (time.perf_counter() - t0) / args.classes
    # all classes in one batch: one shared row set (each class's rows stacked, others ignored)
    name = f"torch hinge, {args.classes} classes batched"
    X = torch.cat([x[:n] for x, _ in data])
    Y = torch.zeros(len(X), args.classes, dtype=torch.bool)
    ignore = torch.ones_like(Y)
    for k, (_, y) in enumerate(data):
        Y[k * n:(k + 1) * n, k] = y[:n]
        ignore[k * n:(k + 1) * n, k] = False
    t0 = time.perf_counter()
    W, b = train_svms(X, Y, 1e-3, cfg=cfg, ignore=ignore)
    times[name] = (time.perf_counter() - t0) / args.classes
    aps[name] = [average_precision((x[n:] @ W[k] + b[k]).double().numpy(), y[n:].numpy())
                 for k, (x, y) in enumerate(data)]
    base = times["liblinear tol 1e-4"]
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.classes} classes x {n} rows x {args.dim} dims, {args.pos_frac:.0%} positives")
    print("| solver | s per class | vs LinearSVC tol 1e-4 | held-out mAP | max score diff / spread |")
    print("|---|---|---|---|---|")
    for k, t in times.items():
        d = f"{dev[k]:.4f}" if k in dev else "-"
        print(f"| {k} | {t:.3f} | {t / base:.2f}x | {np.mean(aps[k]):.4f} | {d} |")


if __name__ == "__main__":
    main()
