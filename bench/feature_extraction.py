"""Multi-layer feature extraction (one forward pass per batch for all layers) against one pass
per layer, in the same process.

Variants, each over the same in-memory batches and network (eval mode, inference mode):

* ``multi``: ``cnnft.features.extract(net, loader, layers)`` with all probe layers at once;
  the pass stops after the deepest requested layer.
* ``per-layer``: ``extract(net, loader, [layer])`` once for each layer (each pass stops at its
  layer, so the shallow passes are cheaper than a whole one).
* ``per-layer-full``: for each layer a whole forward pass with a forward hook on that layer,
  the usual hand-written way.

Seven probe layers means seven passes instead of one: the ``per-layer-full`` ratio can approach
7x; ``per-layer`` saves the tops of the shallow passes, so its ratio is lower. The variants take
turns in a rotating order; medians over ``--repeats`` runs are reported.

Run ``python bench/feature_extraction.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnft.features import extract
from cnnft.models.caffenet import PROBE_LAYERS, CaffeNet

PIXEL_STD = 60.0  # mean-subtracted 0-255 pixels


def per_layer_full(net: CaffeNet, loader: DataLoader, layer: str) -> torch.Tensor:
    """A whole forward pass per batch, the layer's output caught by a hook."""
    caught: list[torch.Tensor] = []
    handle = getattr(net, layer).register_forward_hook(
        lambda _m, _i, out: caught.append(out.float().clone()))
    try:
        with torch.inference_mode():
            for (images,) in loader:
                net(images.contiguous(memory_format=torch.channels_last))
    finally:
        handle.remove()
    return torch.cat(caught)


def variants(net: CaffeNet, loader: DataLoader, layers: Sequence[str]) -> dict[str, Callable[[], object]]:
    return {
        "multi": lambda: extract(net, loader, layers),
        "per-layer": lambda: [extract(net, loader, [layer]) for layer in layers],
        "per-layer-full": lambda: [per_layer_full(net, loader, layer) for layer in layers],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=float, default=0.25, help="CaffeNet width (demo: 0.25)")
    p.add_argument("--input-size", type=int, default=163, help="input size (demo: 163)")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    net: nn.Module = CaffeNet(21, width=args.width, input_size=args.input_size).eval()
    net = net.to(memory_format=torch.channels_last)
    images = PIXEL_STD * torch.randn(args.images, 3, args.input_size, args.input_size)
    loader = DataLoader(TensorDataset(images), batch_size=args.batch_size)
    layers = list(PROBE_LAYERS)
    runs = variants(net, loader, layers)
    multi = runs["multi"]()  # warm-up, and a check that the variants agree
    for layer, feats in zip(layers, runs["per-layer-full"](), strict=True):
        torch.testing.assert_close(multi[layer], feats.reshape(multi[layer].shape))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"  [repeat {r + 1}/{args.repeats}] {name:<15} {seconds[name][-1]:7.2f} s", flush=True)
    base = statistics.median(seconds["multi"])
    print(f"\n{args.images} images {args.input_size}px, width {args.width}, batch {args.batch_size}, "
          f"layers {','.join(layers)}")
    print("| variant        | median s | img/s  | time / multi |")
    print("|----------------|----------|--------|--------------|")
    for name, secs in seconds.items():
        med = statistics.median(secs)
        print(f"| {name:<14} | {med:8.2f} | {args.images / med:6.1f} | {med / base:11.2f}x |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
