"""Hard-negative mining wall time on the demo data and its scaling with the number of images.

Region features (pool5 of a checkpoint, or of a random demo network) of the demo VOC trainval
split are built once with the detection analysis' own code and cached; then
``cnnft.detection.mine_detectors`` (all 20 classes in one batched problem per retraining) runs
on the first 25, 50, 100, 200 ... images, ``--repeats`` times each. Reading the cached features
(the same for every variant) is done before the clock starts; the timed part is the mining
pass itself (scoring, cache updates, retrainings, evictions). The script prints wall time per
run and per class, retrainings, the final cache size, and the time per image relative to the
smallest run: linear scaling keeps that ratio near 1. Baseline, in the same process and
alternating with it: the same mining with every retraining started from zero and solved to the
final tolerance (``warm_start=False, pass_tol=None``), instead of from the previous detectors
and to ``pass_tol`` until the final retraining.

Run ``python bench/hard_negative_mining.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cnnft.checkpoint import load_pretrained, read_checkpoint
from cnnft.data.proposals import ProposalSettings
from cnnft.data.voc import VOC_CLASSES, load_voc
from cnnft.detection import MiningConfig, MiningStats, mine_detectors
from cnnft.detection.pipeline import (
    DetectionSettings,
    build_store,
    candidate_negatives,
    positive_labels,
)
from cnnft.detection.regions import layer_transform, split_regions
from cnnft.features import FeatureCache
from cnnft.models.caffenet import CaffeNet
from cnnft.svm import mean_norm_scale


def network(checkpoint: str | None) -> CaffeNet:
    if checkpoint is None:
        torch.manual_seed(0)
        return CaffeNet(21, width=0.25, input_size=163)
    arch = read_checkpoint(checkpoint)["cnnft"]["arch"]
    net = CaffeNet(arch["num_classes"], width=arch["width"], input_size=arch["input_size"])
    load_pretrained(net, checkpoint, skip=())
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc-root", default="data/demo/VOC2007")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--checkpoint", default=None, help="a cnnft checkpoint (default: random net)")
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--images", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--retrain-limit", type=int, default=250)
    parser.add_argument("--pass-tol", type=float, default=MiningConfig.pass_tol,
                        help="solver tolerance of the retrainings during the pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the baseline that retrains from zero each time")
    args = parser.parse_args()
    net = network(args.checkpoint)
    net.eval()
    s = DetectionSettings(voc_root=Path(args.voc_root), crop=163, pad=11, mean=(122.68, 116.67, 104.01),
                          proposal_cache=Path(args.cache_dir) / "proposals",
                          proposals=ProposalSettings(min_size=10),
                          mining=MiningConfig(retrain_limit=args.retrain_limit, pass_tol=args.pass_tol))
    images = load_voc(s.voc_root, "trainval")
    regions = split_regions(images, "trainval", cache_dir=s.proposal_cache, settings=s.proposals,
                            max_proposals=s.max_proposals, include_gt=True)
    store = build_store(net, regions, s, cache=FeatureCache(Path(args.cache_dir) / "features"),
                        device="cpu", progress=True)
    feats = layer_transform(net, args.layer)
    x = [feats(p5) for _, p5 in store.images()]
    cand = [candidate_negatives(regions.boxes[i], im, s.mining.neg_iou) for i, im in enumerate(images)]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}; layer {args.layer} ({x[0].shape[1]} dims), "
          f"{np.mean([len(b) for b in regions.boxes]):.0f} windows per image, retrain limit "
          f"{args.retrain_limit}")
    base = None
    for n in args.images:
        if n > len(images):
            break
        pos = torch.cat([x[i][:regions.num_gt[i]] for i in range(n)])
        labels = torch.cat([positive_labels(images[i]) for i in range(n)])
        if not labels.any(0).all():
            print(f"{n} images: some class has no positive; skipped")
            continue
        scale = mean_norm_scale(x[:n], 20.0)
        variants = {"warm": s.mining} if args.no_cold else {
            "warm": s.mining, "cold": dataclasses.replace(s.mining, warm_start=False, pass_tol=None)}
        runs: dict[str, list[float]] = {v: [] for v in variants}
        stats: dict[str, MiningStats] = {}
        found = {}
        for _ in range(args.repeats):
            for name, cfg in variants.items():  # alternating, so load hits both alike
                stats[name] = MiningStats()
                t0 = time.perf_counter()
                found[name] = mine_detectors(pos, labels, zip(x[:n], cand[:n], strict=True), scale=scale,
                                             cfg=cfg, stats=stats[name])
                runs[name].append(time.perf_counter() - t0)
        wall = statistics.median(runs["warm"])
        per_image = wall / n
        base = base or per_image
        st = stats["warm"]
        print(f"{n:4d} images: {wall:7.2f} s ({1000 * wall / len(VOC_CLASSES):6.1f} ms per class), "
              f"{st.retrains:3d} retrainings, {st.added:6d} negatives added, {st.cache_rows:5d} "
              f"cached at the end ({sum(st.cache_per_class) / max(1, st.cache_rows):.1f} of "
              f"{len(VOC_CLASSES)} classes hold a cached row on average); per image "
              f"{1000 * per_image:.1f} ms = {per_image / base:.2f}x the "
              f"{args.images[0]}-image run (runs: {', '.join(f'{r:.2f}' for r in runs['warm'])})")
        if "cold" in runs:
            cold = statistics.median(runs["cold"])
            w, c = found["warm"].W, found["cold"].W
            print(f"      cold start (every retraining from zero, to tol): {cold:7.2f} s, "
                  f"{stats['cold'].retrains} retrainings, {stats['cold'].added} added; "
                  f"warm start {cold / wall:.2f}x faster; "
                  f"detectors differ by {float((w - c).norm() / c.norm()):.1e} (relative norm)")


if __name__ == "__main__":
    main()
