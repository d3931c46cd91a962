"""The probes' SVMs solved in the row space of the features vs on the features themselves.

``cnnft.svm.solve_grid`` solves problems with fewer rows than columns (the image probes: 200
trainval images, up to 8665 features a layer at demo scale) on the N x N coordinates of the rows
in an orthonormal basis of their span (``row_space=True``, the default) instead of the N x (D+1)
features. This bench runs the image-classification probe (``cnnft.probing.run_probes``, every
layer, plain features, the ``probe`` SVM settings: 5 C values x 3 folds + refit; ``--task
gtbox``: the GT-box probe) of each given checkpoint both ways, in one process and in turns, and
prints the seconds, their ratio, the largest difference in AP of any class and whether every
class chose the same C.
``--float64-reference`` adds the probe solved on the features in float64 (slow) and counts, for
each of the two, the (layer, class) pairs whose chosen C differs from it: where C is near-tied,
float32 rounding on the features can tip the choice (the row-space solve runs in float64).
Features come from the ordinary feature cache (extracted on the first pass if missing).

    python bench/probe_row_space.py --checkpoints 'outputs/reproduce/demo/pretrain/snapshots/*.ckpt' \\
        --data-dir data --repeats 1
"""

from __future__ import annotations

import argparse
import glob
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from cnnft.ablations import unroll
from cnnft.analysis import AnalysisContext
from cnnft.analyze import load_network
from cnnft.data.transforms import resolve_mean
from cnnft.features import FeatureCache
from cnnft.probing import gtbox_split, image_split, layer_features, run_probes
from cnnft.svm import SVMConfig, solve_grid
from cnnft.task import compose_job


def probe_rows(net, ctx, layers, svm, solver, split=image_split) -> tuple[dict, float]:
    train, test = split(ctx, "trainval"), split(ctx, "test")
    t0 = time.perf_counter()
    rows = run_probes(net, train, test, layers=layers, ablations={"unroll": unroll}, svm=svm, ctx=ctx,
                      solver=solver)
    return {(r["layer"], r["class"]): (r["ap"], r["c"]) for r in rows}, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", required=True, help="a glob of cnnft checkpoints")
    ap.add_argument("--data-dir", required=True, help="paths.data_dir (demo data and the cache)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--float64-reference", action="store_true")
    ap.add_argument("--task", choices=["cls", "gtbox"], default="cls",
                    help="image classification (probe_cls) or GT-box classification (probe_gtbox)")
    args = ap.parse_args()
    cfg = compose_job("analyze", [f"paths.data_dir={args.data_dir}", "checkpoint=random", "logger=csv"],
                      "/tmp/probe_row_space")
    svm = SVMConfig.from_mapping(cfg.probe, "probe")
    layers = list(cfg.layers)
    solvers = {"features": partial(solve_grid, row_space=False), "row space": solve_grid}
    split = image_split if args.task == "cls" else gtbox_split
    total = dict.fromkeys(solvers, 0.0)
    print(f"threads {torch.get_num_threads()}, layers {layers}")
    for spec in sorted(glob.glob(args.checkpoints)):
        net, model_cfg, digest, step = load_network(spec, cfg)
        net = net.to(memory_format=torch.channels_last).eval()
        ctx = AnalysisContext(output_dir=Path("/tmp/probe_row_space"), voc_root=Path(cfg.data.voc_root),
                              model_key=digest, input_size=model_cfg["input_size"],
                              context_pad=model_cfg["context_pad"],
                              mean=resolve_mean(model_cfg["mean"], model_cfg.get("mean_image")),
                              cache=FeatureCache(Path(cfg.paths.cache_dir) / "features"),
                              batch_size=cfg.batch_size, progress=False)
        for name in ("trainval", "test"):  # fill the cache before timing
            layer_features(net, split(ctx, name), layers, ctx)
        seconds = dict.fromkeys(solvers, 0.0)
        results = {}
        for _ in range(args.repeats):
            for name, solver in solvers.items():
                results[name], s = probe_rows(net, ctx, layers, svm, solver, split)
                seconds[name] += s / args.repeats
        a, b = results["features"], results["row space"]
        if args.float64_reference:
            ref, _ = probe_rows(net, ctx, layers, replace(svm, dtype="float64"),
                                partial(solve_grid, row_space=False), split)
            off = {name: sum(results[name][k][1] != ref[k][1] for k in ref) for name in solvers}
            print(f"{Path(spec).name}: (layer, class) choosing another C than the float64 solve on "
                  f"the features: features {off['features']}, row space {off['row space']}")
        dap = max(abs(a[k][0] - b[k][0]) for k in a)
        same_c = all(a[k][1] == b[k][1] for k in a)
        maps = [f"{layer} {a[(layer, 'mAP')][0]:.4f}/{b[(layer, 'mAP')][0]:.4f}" for layer in layers]
        print(f"{Path(spec).name}: features {seconds['features']:.2f} s, row space "
              f"{seconds['row space']:.2f} s ({seconds['features'] / seconds['row space']:.2f}x); "
              f"max |AP diff| {dap:.2e}; same C every class: {same_c}; mAP {', '.join(maps)}")
        for name in solvers:
            total[name] += seconds[name]
    print(f"total: features {total['features']:.1f} s, row space {total['row space']:.1f} s "
          f"({total['features'] / max(total['row space'], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
