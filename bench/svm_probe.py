"""Batched torch SVM probe against scikit-learn LinearSVC one problem at a time (VISSL-style).

Both fit the same probe (``cnnft.svm.fit_probe``): one-vs-rest squared-hinge SVMs for every
class, C chosen per class from ``--c-grid`` by ``--folds``-fold cross-validated VOC07 AP, then
refit on all training rows with the chosen C; test mAP is VOC07 11-point AP on held-out rows.
The torch solver batches every class, C and fold (plus the all-rows problems) into one truncated
Newton solve; the reference fits ``LinearSVC`` once per class, C and fold (classes x C x folds)
plus once per class for the refit, single-threaded (liblinear).

Features are synthetic but pool5-sized and shaped like ReLU features: each of ``--classes``
classes has a sparse non-negative prototype; an image (1.3 labels on average, class frequencies
falling off like VOC's) is ``relu(base + sum_c s_c * prototype_c + noise - 0.5)`` with a random
strength ``s_c`` per label, so classes overlap and test APs lie well between chance and 1.

``--sklearn-subset K`` times only K randomly drawn cross-validation fits and the refits (at the
C the torch probe chose, which also gives the sklearn test mAP), and extrapolates the CV part
linearly to all classes x C x folds fits; the output says so. Without it the whole sklearn probe
runs (about 15-30 minutes on 2 cores for the defaults).

Run ``python bench/svm_probe.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import time
import warnings

import numpy as np
import sklearn
import torch

from cnnft.metrics import mean_average_precision
from cnnft.svm import SVMConfig, fit_probe, fold_ids, normalize_features, solver_dtype
from cnnft.svm.solver import augment
from tests.svm_reference import linear_svc, sklearn_solver

SKLEARN_MAX_ITER = 2000  # LinearSVC's max_iter (the reference's default)


def synthetic_features(n: int, dim: int, classes: int, *, noise: float, seed: int,
                       density: float = 0.01, strength: tuple[float, float] = (0.1, 0.6),
                       world_seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ReLU'd feature rows [n, dim] and multi-label targets [n, classes] (bool).

    ``world_seed`` fixes the prototypes (the same "world" for train and test); ``seed`` draws
    the images."""
    g = torch.Generator().manual_seed(world_seed)
    proto = (torch.rand(classes, dim, generator=g) < density).float()
    proto *= 3 * torch.empty(classes, dim).exponential_(1.0, generator=g)
    base = 0.5 * torch.rand(dim, generator=g)
    freq = 1.0 / (torch.arange(classes) + 3.0)
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, classes, dtype=torch.bool)
    y[torch.arange(n), torch.multinomial(freq, n, replacement=True, generator=g)] = True
    second = torch.multinomial(freq, n, replacement=True, generator=g)
    extra = torch.rand(n, generator=g) < 0.3
    y[torch.arange(n)[extra], second[extra]] = True
    s = strength[0] + (strength[1] - strength[0]) * torch.rand(n, classes, generator=g)
    x = base + (y.float() * s) @ proto + noise * torch.randn(n, dim, generator=g) - 0.5
    return x.relu_(), y


def gemm_gflops(threads: int, n: int = 5000, d: int = 9217, k: int = 80, reps: int = 5) -> float:
    """Float32 GEMM throughput of the solver's typical shape, to tell a loaded machine apart."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.rand(n, d), torch.rand(d, k)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.set_num_threads(old)
    return 2 * n * d * k * reps / (time.perf_counter() - t0) / 1e9


def time_torch(x, y, xt, yt, cfg: SVMConfig, threads: int) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        probe = fit_probe(x, y, cfg=cfg, stats=stats)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(old)
    per_class, m = mean_average_precision(probe.decision_function(xt), yt)
    return {"wall": wall, "cpu": cpu, "map": m, "ap": per_class, "c": probe.c, "stats": stats}


def time_sklearn_full(x, y, xt, yt, cfg: SVMConfig) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = fit_probe(x, y, cfg=cfg, solver=sklearn_solver())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_class, m = mean_average_precision(probe.decision_function(xt), yt)
    return {"wall": wall, "cpu": cpu, "map": m, "ap": per_class, "c": probe.c, "extrapolated": False,
            "fits": y.shape[1] * len(cfg.c_grid) * cfg.folds + y.shape[1],
            "warnings": [str(w.message) for w in caught]}


def time_sklearn_subset(x, y, xt, yt, cfg: SVMConfig, chosen_c: torch.Tensor, k: int, seed: int) -> dict:
    """K random CV fits timed one by one (extrapolated to all), the refits timed in full."""
    sk = cfg
    xs, ys = x.to(solver_dtype(x, sk)), y.bool()
    xs = normalize_features(xs, "l2") if sk.normalize == "l2" else xs
    if sk.normalize == "mean_norm":
        xs = normalize_features(xs, "mean_norm", sk.target_norm)
    x64 = xs.numpy().astype(np.float64)
    yn = ys.numpy()
    fold = fold_ids(x.shape[0], sk.folds, sk.seed).numpy()
    n = y.shape[1]
    cells = [(cls, c, f) for cls in range(n) for c in sk.c_grid for f in range(sk.folds)]
    drawn = random.Random(seed).sample(cells, min(k, len(cells)))
    times, cpus = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls, c, f in drawn:
            t0, c0 = time.perf_counter(), time.process_time()
            linear_svc(x64[fold != f], yn[fold != f, cls], c, sk, SKLEARN_MAX_ITER)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        W = []
        t0, c0 = time.perf_counter(), time.process_time()
        for cls in range(n):
            W.append(linear_svc(x64, yn[:, cls], float(chosen_c[cls]), sk, SKLEARN_MAX_ITER)[0])
        refit, refit_cpu = time.perf_counter() - t0, time.process_time() - c0
    W = torch.from_numpy(np.stack(W)).to(xs.dtype)
    xt_n = normalize_features(xt.to(xs.dtype), "l2") if sk.normalize == "l2" else xt.to(xs.dtype)
    if sk.normalize == "mean_norm":
        xt_n = normalize_features(xt_n, "mean_norm", sk.target_norm, reference=x.to(xs.dtype))
    scores = augment(xt_n, sk.bias) @ W.T
    per_class, m = mean_average_precision(scores, yt)
    return {"wall": statistics.mean(times) * len(cells) + refit,
            "cpu": statistics.mean(cpus) * len(cells) + refit_cpu, "map": m, "ap": per_class, "c": chosen_c,
            "extrapolated": True, "timed": len(drawn), "cells": len(cells), "per_fit": statistics.mean(times),
            "refit": refit, "fits": len(cells) + n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=9216, help="pool5: 256 x 6 x 6")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--c-grid", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--normalize", default="l2", choices=["l2", "mean_norm", "none"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts to time (liblinear is single-threaded)")
    ap.add_argument("--sklearn-subset", type=int, default=0, metavar="K",
                    help="time K random CV fits and extrapolate (0: run the whole sklearn probe)")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x, y = synthetic_features(args.n_train, args.dim, args.classes, noise=args.noise, seed=args.seed)
    xt, yt = synthetic_features(args.n_test, args.dim, args.classes, noise=args.noise, seed=args.seed + 1)
    cfg = SVMConfig(c_grid=tuple(args.c_grid), folds=args.folds, normalize=args.normalize, dtype=args.dtype,
                    seed=args.seed)
    cpu = platform.processor() or platform.machine()
    print(f"{datetime.date.today()}  {cpu}  torch {torch.__version__}  sklearn {sklearn.__version__}  "
          f"numpy {np.__version__}")
    print(f"features {args.n_train} train / {args.n_test} test x {args.dim}, {args.classes} classes "
          f"(positive rate {y.float().mean():.3f}, non-zero {(x > 0).float().mean():.2f}), "
          f"C grid {list(cfg.c_grid)}, {cfg.folds}-fold CV, normalize={cfg.normalize}, tol={cfg.tol}")

    print(f"GEMM [5000, 9217] x [9217, 80] float32 before: {gemm_gflops(max(args.threads)):.0f} GFLOP/s "
          f"({max(args.threads)} threads)", flush=True)
    runs = {}
    for th in args.threads:
        r = time_torch(x, y, xt, yt, cfg, th)
        runs[f"torch ({th} thread{'s' if th > 1 else ''})"] = r
        print(f"torch {th} thread(s): {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, "
              f"mAP {100 * r['map']:.2f}, {r['stats']}", flush=True)
    ref = next(iter(runs.values()))
    if not args.no_sklearn:
        if args.sklearn_subset:
            r = time_sklearn_subset(x, y, xt, yt, cfg, ref["c"], args.sklearn_subset, args.seed)
            print(f"sklearn: timed {r['timed']} of {r['cells']} CV fits ({r['per_fit']:.2f} s each) and "
                  f"the {args.classes} refits ({r['refit']:.1f} s) at the C chosen by torch; CV part "
                  "EXTRAPOLATED linearly", flush=True)
        else:
            r = time_sklearn_full(x, y, xt, yt, cfg)
            for w in sorted(set(r["warnings"])):
                print("sklearn warning:", w)
        runs["sklearn LinearSVC (1 thread)"] = r

    sk = runs.get("sklearn LinearSVC (1 thread)")
    print(f"GEMM after: {gemm_gflops(max(args.threads)):.0f} GFLOP/s")
    print()
    print(f"| {'solver':<30} | {'problems':>8} | {'wall s':>8} | {'speed-up':>8} | {'CPU s':>8} | "
          f"{'CPU ratio':>9} | {'test mAP':>8} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, r in runs.items():
        fits = r.get("fits", args.classes * len(cfg.c_grid) * (cfg.folds + 1))
        star = "*" if r.get("extrapolated") else " "
        speed = f"{sk['wall'] / r['wall']:.1f}x" if sk else "-"
        cpu_ratio = f"{sk['cpu'] / r['cpu']:.1f}x" if sk else "-"
        print(f"| {name:<30} | {fits:>8} | {r['wall']:>7.1f}{star} | {speed:>8} | {r['cpu']:>7.1f}{star} | "
              f"{cpu_ratio:>9} | {100 * r['map']:>8.2f} |")
    if sk:
        if sk.get("extrapolated"):
            print("* extrapolated from a timed subset (see above); sklearn mAP uses the C chosen by torch")
        d = 100 * np.abs(sk["ap"] - ref["ap"])
        agree = int((sk["c"] == ref["c"]).sum())
        print(f"mAP difference torch - sklearn: {100 * (ref['map'] - sk['map']):+.2f} points; per-class AP "
              f"difference max {d.max():.2f} points; same C for {agree}/{args.classes} classes")


if __name__ == "__main__":
    main()
