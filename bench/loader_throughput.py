"""Data-loader throughput of the demo pretraining pipeline against the demo net's training speed.

Writes a small demo ImageNet-layout set into a temporary folder, builds
``ImageNetDataModule(root, resize=184, crop=163, batch_size=64, num_workers=N)`` (the demo
scale's settings) and iterates its ``train_dataloader()``: JPEG decode, Caffe warp/crop/mirror,
mean subtraction and ``collate_skipping``, in img/s, for each ``N``. With no trainer attached the
step sampler starts at step 0 every epoch. With workers, each run first iterates one untimed
epoch (worker start-up), then times ``--epochs`` whole epochs.

The loader figure is compared with the demo net's training img/s (a plain loop on in-memory
batches, measured in the same process, or ``--model-img-s``); the goal is a ratio >= 2 with the
default 2 workers. Because the loader and the model share this machine's cores, the script also
trains the demo net fed by the real loader ("end to end": 4 untimed + ``--e2e-steps`` steps, which
fit in one epoch of the default 1600 images, so no epoch restart is timed) and compares that with
in-memory batches. Denormals are flushed to zero, as in ``cnnft.train`` (``--no-flush-denormal``
turns that off).

Run it as a script, ``python bench/loader_throughput.py`` (it imports its sibling
``train_throughput``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from train_throughput import MODELS, ForeignLoad, ModelSpec, make_batches, run_plain

from cnnft.data.datamodules import ImageNetDataModule
from cnnft.data.demo import DemoSpec, generate_demo

RESIZE, CROP = 184, 163  # conf/scale/demo.yaml
DEFAULT_WORKERS = 2  # conf/scale/demo.yaml data.num_workers
E2E_WARMUP = 4  # untimed steps of an end-to-end run (worker start-up, prefetch queue)


def make_demo(root: Path, classes: int, per_class: int) -> Path:
    """Write a small demo set under ``root``; return its ImageNet root."""
    spec = DemoSpec(imagenet_classes=classes, imagenet_train_per_class=per_class,
                    imagenet_val_per_class=2, voc_trainval=4, voc_test=4)
    return generate_demo(root / "demo", spec, progress=False)["imagenet_root"]


def train_loader(imagenet_root: Path, batch_size: int, num_workers: int) -> DataLoader:
    """The demo scale's training loader (no trainer attached: sampler at step 0)."""
    dm = ImageNetDataModule(str(imagenet_root), resize=RESIZE, crop=CROP, batch_size=batch_size,
                            num_workers=num_workers)
    dm.setup()
    return dm.train_dataloader()


def count_images(loader: Iterable[dict[str, torch.Tensor]]) -> int:
    """Iterate one epoch; return the number of images delivered."""
    return sum(len(batch["images"]) for batch in loader)


def loader_rate(imagenet_root: Path, batch_size: int, num_workers: int, epochs: int) -> float:
    """Delivered img/s over ``epochs`` epochs (after one untimed epoch that starts workers)."""
    loader = train_loader(imagenet_root, batch_size, num_workers)
    if num_workers > 0:
        count_images(loader)
    start = time.perf_counter()
    images = sum(count_images(loader) for _ in range(epochs))
    return images / (time.perf_counter() - start)


def epochs_of(loader: DataLoader, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches from as many passes over ``loader`` as that takes."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


def model_spec(batch_size: int, warmup: int, steps: int) -> ModelSpec:
    return replace(MODELS["demo"], batch_size=batch_size, warmup=warmup, steps=steps)


def model_rate(spec: ModelSpec) -> float:
    """Demo-net training img/s on in-memory batches (channels_last, as configured)."""
    batches = make_batches(spec, spec.warmup + spec.steps)
    return run_plain(spec, batches, channels_last=True).window


def end_to_end_rate(imagenet_root: Path, spec: ModelSpec, num_workers: int) -> float:
    """Demo-net training img/s fed by the real loader."""
    loader = train_loader(imagenet_root, spec.batch_size, num_workers)
    batches = epochs_of(loader, spec.warmup + spec.steps)
    return run_plain(spec, batches, channels_last=True).window


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loader run")
    p.add_argument("--classes", type=int, default=20, help="demo classes to generate")
    p.add_argument("--per-class", type=int, default=80, help="demo training images per class")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; medians reported")
    p.add_argument("--model-img-s", type=float, help="demo training img/s (skips measuring it)")
    p.add_argument("--model-steps", type=int, default=15, help="timed steps of the model runs")
    p.add_argument("--e2e-steps", type=int, default=20,
                   help="timed steps of the end-to-end runs (0 skips them)")
    p.add_argument("--e2e-workers", type=int, nargs="+", default=[0, 1, DEFAULT_WORKERS],
                   help="num_workers values of the end-to-end runs")
    p.add_argument("--root", type=Path, help="keep the demo data here (default: a temp folder)")
    p.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.set_flush_denormal, as conf/train.yaml's flush_denormal (default on)")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, imagenet_root: Path) -> dict[str, list[float]]:
    """img/s samples of every figure; the figures take turns, in a rotating order."""
    model = model_spec(args.batch_size, warmup=3, steps=args.model_steps)
    e2e = model_spec(args.batch_size, warmup=E2E_WARMUP, steps=args.e2e_steps)
    samples: dict[str, list[float]] = {}
    for r in range(args.repeats):
        runs = {f"loader w={n}": lambda n=n: loader_rate(imagenet_root, args.batch_size, n,
                                                         args.epochs) for n in args.workers}
        if args.model_img_s is None:
            runs["model in-memory"] = lambda: model_rate(model)
        for n in args.e2e_workers if args.e2e_steps > 0 else []:
            runs[f"model fed w={n}"] = lambda n=n: end_to_end_rate(imagenet_root, e2e, n)
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # rotate who goes first
        for name in order:
            samples.setdefault(name, []).append(runs[name]())
            print(f"  [repeat {r + 1}/{args.repeats}] {name:<16} {samples[name][-1]:8.1f} img/s",
                  flush=True)
    if args.model_img_s is not None:
        samples["model in-memory"] = [args.model_img_s]
    return samples


def report(args: argparse.Namespace, samples: dict[str, list[float]], images: int) -> None:
    """Print the loader table and the two verdicts."""
    model = statistics.median(samples["model in-memory"])
    print(f"\ndemo loader: {images} train images ({args.classes} classes x {args.per_class}), "
          f"resize {RESIZE}, crop {CROP}, batch {args.batch_size}, {args.epochs} timed epochs, "
          f"{args.repeats} repeats")
    print("| num_workers | median img/s | min-max img/s   | img/s per worker | / model img/s |")
    print(f"|{'-' * 13}|{'-' * 14}|{'-' * 17}|{'-' * 18}|{'-' * 15}|")
    for n in args.workers:
        rates = samples[f"loader w={n}"]
        med = statistics.median(rates)
        print(f"| {n:11d} | {med:12.1f} | {min(rates):7.1f}-{max(rates):<7.1f} | "
              f"{med / max(n, 1):16.1f} | {med / model:12.2f}x |")
    print(f"demo net training (plain loop, in-memory batches of {args.batch_size}): "
          f"{model:.1f} img/s")
    key = f"loader w={DEFAULT_WORKERS}"
    if key in samples:
        ratio = statistics.median(samples[key]) / model
        print(f"goal loader(w={DEFAULT_WORKERS}) >= 2x model: {ratio:.2f}x, "
              f"{'MET' if ratio >= 2 else 'MISSED'}")
    restarts = (E2E_WARMUP + args.e2e_steps - 1) // (images // args.batch_size)
    for n in args.e2e_workers if args.e2e_steps > 0 else []:
        fed = samples[f"model fed w={n}"]
        med = statistics.median(fed)
        print(f"end to end: training fed by the loader (w={n}) {med:.1f} img/s "
              f"(min-max {min(fed):.1f}-{max(fed):.1f}) = {med / model:.1%} of in-memory"
              + (f" ({restarts} epoch restarts timed)" if restarts else ""))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(args.flush_denormal)  # before any torch op starts the thread pool
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"flush_denormal {args.flush_denormal}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="cnnft-bench-") as tmp:
        root = args.root or Path(tmp)
        start = time.perf_counter()
        imagenet_root = make_demo(root, args.classes, args.per_class)
        print(f"demo data in {root} ({time.perf_counter() - start:.1f} s)")
        load = ForeignLoad()
        samples = measure(args, imagenet_root)
        gc.collect()  # shut the persistent workers down so that their CPU time counts as ours
        foreign = load.share()
    images = args.classes * args.per_class // args.batch_size * args.batch_size
    report(args, samples, images)
    print(f"other processes used {foreign:.0%} of the machine's CPU time during the runs")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
