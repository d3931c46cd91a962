"""Five taps of a torchvision network in one pass against one truncated pass per tap, in the
same process.

Networks: torchvision ResNet-50 and VGG16 with random weights (``weights=None``: nothing is
downloaded), wrapped in ``cnnft.models.tapped.TappedNet`` as ``model=resnet50`` / ``model=vgg16``
build them, in eval mode under ``torch.inference_mode``, on the CPU. Variants, each over the same
in-memory batches:

* ``one-pass``: ``TappedNet.forward_taps(x, taps)``: hooks on the five modules, one forward pass
  that stops after the deepest tap.
* ``per-tap``: for each tap ``forward_taps(x, [tap])``: five passes, each stopping at its tap
  (the shallow passes are cheaper than a whole one, so the ratio is below 5).
* ``fx``: ``torchvision.models.feature_extraction.create_feature_extractor`` with the five taps
  as return nodes: one pass of an FX-traced copy (pruned after the deepest tap as well).

The outputs of all three are checked equal on the first batch (which is also the warm-up). The
variants take turns in a rotating order; medians over ``--repeats`` runs are reported as time /
one-pass, in wall-clock time and in the process's CPU time (``time.process_time``: all its
threads; on a machine busy with other jobs it moves less with their load than wall time does).
Denormals are flushed: random-init nets hit denormals on the CPU and run several times slower
otherwise.

Run ``python bench/taps.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torchvision.models.feature_extraction import create_feature_extractor

from cnnft.models.build import build_network

#: The five taps per network: ResNet-50's four stages and global pool, VGG16's five pools.
TAPS = {
    "resnet50": ["layer1", "layer2", "layer3", "layer4", "avgpool"],
    "vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30"],
}
IMAGENET_STD = [58.395, 57.12, 57.375]
PIXEL_STD = 60.0  # mean-subtracted 0-255 pixels


def variants(net: torch.nn.Module, batches: Sequence[torch.Tensor],
             taps: Sequence[str]) -> dict[str, Callable[[], list[dict[str, torch.Tensor]]]]:
    fx = create_feature_extractor(net.module, return_nodes=list(taps)).eval()

    def one_pass() -> list[dict[str, torch.Tensor]]:
        return [net.forward_taps(x, taps) for x in batches]

    def per_tap() -> list[dict[str, torch.Tensor]]:
        return [{t: net.forward_taps(x, [t])[t] for t in taps} for x in batches]

    def fx_pass() -> list[dict[str, torch.Tensor]]:
        return [fx(net._normalize(x)) for x in batches]

    return {"one-pass": one_pass, "per-tap": per_tap, "fx": fx_pass}


def check_equal(results: dict[str, list[dict[str, torch.Tensor]]]) -> str:
    """Every variant's outputs against one-pass: 'bit-identical' or the largest difference."""
    base = results["one-pass"]
    worst = 0.0
    for name, outs in results.items():
        for ref, got in zip(base, outs, strict=True):
            for tap, value in ref.items():
                torch.testing.assert_close(got[tap], value, msg=lambda m, n=name, t=tap: f"{n} {t}: {m}")
                worst = max(worst, float((got[tap] - value).abs().max()))
    return "bit-identical" if worst == 0 else f"max abs difference {worst:.2e}"


def bench(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    net = build_network({"family": "torchvision", "name": name, "input_size": args.input_size,
                         "input_std": IMAGENET_STD}).eval()
    size = args.input_size
    batches = [PIXEL_STD * torch.randn(args.batch_size, 3, size, size) for _ in range(args.batches)]
    taps = TAPS[name]
    with torch.inference_mode():
        same = check_equal({k: run() for k, run in variants(net, batches[:1], taps).items()})  # + warm-up
        runs = variants(net, batches, taps)
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        names = list(runs)
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                start, start_cpu = time.perf_counter(), time.process_time()
                runs[k]()
                wall[k].append(time.perf_counter() - start)
                cpu[k].append(time.process_time() - start_cpu)
    images = args.batches * args.batch_size
    base, base_cpu = statistics.median(wall["one-pass"]), statistics.median(cpu["one-pass"])
    print(f"\n{name}: {images} images ({args.batches} batches of {args.batch_size}) at {size}px, "
          f"taps {','.join(taps)}; outputs {same}")
    print("| variant  | median wall s | img/s  | wall / one-pass | median CPU s | CPU / one-pass |")
    print("|----------|---------------|--------|-----------------|--------------|----------------|")
    for k in runs:
        med, med_cpu = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"| {k:<8} | {med:13.2f} | {images / med:6.1f} | {med / base:14.2f}x | {med_cpu:12.2f} | "
              f"{med_cpu / base_cpu:13.2f}x |")
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(TAPS), choices=list(TAPS))
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=163, help="input size (the demo's: 163)")
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
