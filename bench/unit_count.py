"""unit_count's retraining stage: all classes x all k in one masked batched torch solve against a
per-class, per-k scikit-learn LinearSVC loop, in the same process.

Features: synthetic spatial-max-pool5-like vectors (``bench/svm_probe.py``'s generator with
``--units`` dimensions), ``--n`` train and test rows, 20 classes. One ``fit_probe`` (torch, C by
3-fold CV) ranks the units per class and fixes C (timed separately, shared); then each (class, k)
SVM is retrained on the class's top-k units: torch ``train_svms(feature_mask=...)`` (one call)
against ``LinearSVC`` fitted on ``x[:, top_k]`` one problem at a time. Test AP of both is compared.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from analyses.unit_count import PAPER_KS, clip_ks
from cnnft.metrics import average_precision
from cnnft.svm import SVMConfig, fit_probe, train_svms

sys.path.insert(0, str(Path(__file__).parent))
from svm_probe import synthetic_features  # noqa: E402


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--units", type=int, default=256)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x, y = synthetic_features(args.n, args.units, args.classes, noise=args.noise, seed=args.seed,
                              density=0.05)
    xt, yt = synthetic_features(args.n, args.units, args.classes, noise=args.noise, seed=args.seed + 1,
                                density=0.05)
    cfg = SVMConfig()
    print(f"{datetime.date.today()}  {platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    ks = clip_ks(PAPER_KS, args.units)
    print(f"{args.n} train / {args.n} test x {args.units} units, {args.classes} classes, {len(ks)} k values "
          f"-> {args.classes * len(ks)} retrained SVMs; {load()}")
    t0 = time.perf_counter()
    probe = fit_probe(x, y, cfg=cfg)
    print(f"ranking fit_probe (torch, {len(cfg.c_grid)} C x {cfg.folds}-fold CV): "
          f"{time.perf_counter() - t0:.2f} s", flush=True)
    order = torch.sort(probe.W.abs(), dim=1, descending=True, stable=True).indices
    xn, xtn = probe._prepare(x), probe._prepare(xt)
    n = args.classes
    mask = torch.zeros(n * len(ks), args.units, dtype=torch.bool)
    for c in range(n):
        for j, k in enumerate(ks):
            mask[c * len(ks) + j, order[c, :k]] = True
    yy = y.repeat_interleave(len(ks), dim=1)
    cc = probe.c.repeat_interleave(len(ks))

    t0, c0 = time.perf_counter(), time.process_time()
    W, b = train_svms(xn, yy, cc, cfg=cfg, feature_mask=mask)
    t_torch, cpu_torch = time.perf_counter() - t0, time.process_time() - c0
    print(f"torch masked batch: {t_torch:.2f} s wall, {cpu_torch:.2f} s CPU  ({load()})", flush=True)
    s_torch = (xtn @ W.T + b).double().numpy()

    from sklearn.svm import LinearSVC

    x64, xt64, yn = xn.double().numpy(), xtn.double().numpy(), y.numpy()
    s_sk = np.zeros_like(s_torch)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(n):
            for j, k in enumerate(ks):
                cols = order[c, :k].numpy()
                svc = LinearSVC(C=float(probe.c[c]), loss="squared_hinge", dual="auto", tol=cfg.tol,
                                max_iter=2000, class_weight={1: cfg.pos_weight, 0: 1.0},
                                intercept_scaling=cfg.bias)
                svc.fit(x64[:, cols], yn[:, c])
                s_sk[:, c * len(ks) + j] = svc.decision_function(xt64[:, cols])
    t_sk, cpu_sk = time.perf_counter() - t0, time.process_time() - c0
    print(f"sklearn loop: {t_sk:.2f} s wall, {cpu_sk:.2f} s CPU  ({load()})")
    ytn = yt.numpy()
    ap_t = np.array([average_precision(s_torch[:, i], ytn[:, i // len(ks)]) for i in range(n * len(ks))])
    ap_s = np.array([average_precision(s_sk[:, i], ytn[:, i // len(ks)]) for i in range(n * len(ks))])
    print(f"AP(k) torch vs sklearn: max |diff| {100 * np.abs(ap_t - ap_s).max():.2f} points, mean AP "
          f"{100 * ap_t.mean():.2f} vs {100 * ap_s.mean():.2f}")
    print()
    print("| solver | SVMs | wall s | speed-up | CPU s | CPU ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| torch masked batch | {n * len(ks)} | {t_torch:.2f} | {t_sk / t_torch:.1f}x | {cpu_torch:.2f} | "
          f"{cpu_sk / cpu_torch:.1f}x |")
    print(f"| sklearn LinearSVC loop | {n * len(ks)} | {t_sk:.2f} | 1.0x | {cpu_sk:.2f} | 1.0x |")


if __name__ == "__main__":
    main()
