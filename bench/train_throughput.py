"""Training throughput of CaffeNet on this machine's CPU.

Measured in one process, side by side and interleaved (so a background load hits every variant
alike), on the same random in-memory batches and the same Caffe solver (``cnnft.optim.caffe_sgd``):

* ``plain``: a hand-written loop (zero_grad, forward, cross-entropy, backward, SGD step, lr step),
  NHWC (channels_last) as ``conf/train.yaml`` sets ``model.channels_last: true``;
* ``plain-nchw``: the same loop on contiguous (NCHW) tensors;
* ``lightning``: ``Trainer.fit`` of ``cnnft.module.CaffeNetModule`` (channels_last) over a
  ``DataLoader`` of the same pre-made batch dicts, with no logger, checkpointing, progress bar or
  model summary.

Every run times the interval between the end of the last warm-up step and the end of the last
step (a ``Callback.on_train_batch_end`` clock for Lightning, the same clock in the plain loop), so
the data fetch and every per-step hook count, and set-up and warm-up do not.

FLOP utilisation: the training FLOPs per image times the img/s, divided by the fp32 ``torch.mm``
rate measured here with the same threads. FLOPs count the convolutions and fc layers only (2 per
multiply-add), analytically: the forward pass (cross-checked against
``torch.utils.flop_counter.FlopCounterMode``) plus twice that for the backward pass, less conv1's
input gradient, which is never computed. (FlopCounterMode's own backward count is not used: in
torch 2.14 it charges a grouped convolution's weight gradient ``groups`` times over.)

Run ``python bench/train_throughput.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from cnnft.models.caffenet import CaffeNet
from cnnft.module import CaffeNetModule
from cnnft.optim import caffe_sgd, param_groups

Batch = dict[str, torch.Tensor]

#: conf/stage/pretrain.yaml's solver (lr_step only matters for the schedule, not the speed).
OPTIM: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "lr_step": 200,
                         "gamma": 0.1, "lr_mult": {}}

#: Input scale of real batches: 0-255 pixels minus the mean pixel (std ~60). Unit-variance noise
#: would make activations tiny after Caffe's std-0.01 init, risking slow denormal arithmetic.
PIXEL_STD = 60.0


@dataclass(frozen=True)
class ModelSpec:
    """A network and the default lengths of its benchmark runs."""

    name: str
    width: float
    input_size: int
    num_classes: int
    batch_size: int
    warmup: int
    steps: int
    repeats: int

    @property
    def net_kwargs(self) -> dict[str, Any]:
        return {"width": self.width, "input_size": self.input_size, "dropout": 0.5}


#: demo: conf/scale/demo.yaml (40 demo classes); caffenet: the paper's net (a smaller batch and
#: few steps, since one step takes seconds here).
MODELS = {
    "demo": ModelSpec("demo", 0.25, 163, 40, batch_size=64, warmup=3, steps=15, repeats=5),
    "caffenet": ModelSpec("caffenet", 1.0, 227, 1000, batch_size=32, warmup=1, steps=3,
                          repeats=3),
}


# ---------------------------------------------------------------- inputs and clocks


def make_batches(spec: ModelSpec, count: int, distinct: int = 4, seed: int = 0) -> list[Batch]:
    """``count`` batch dicts as ``collate_skipping`` makes them, cycling ``distinct`` tensors."""
    gen = torch.Generator().manual_seed(seed)
    shape = (spec.batch_size, 3, spec.input_size, spec.input_size)
    pool = [{"images": torch.randn(shape, generator=gen) * PIXEL_STD,
             "labels": torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen),
             "skipped": torch.tensor(0)} for _ in range(min(distinct, count))]
    return [pool[i % len(pool)] for i in range(count)]


class Rate(NamedTuple):
    """img/s of one run: over the whole timed window, and from its median step time (which a
    short burst of other work on the machine barely moves)."""

    window: float
    median_step: float


def steady_rate(stamps: Sequence[float], warmup: int, batch_size: int) -> Rate:
    """img/s over the steps after ``warmup``, from the end-of-step times ``stamps``."""
    if warmup < 1 or len(stamps) <= warmup:
        raise ValueError(f"need warmup >= 1 and more than {warmup} steps, got {len(stamps)}")
    steps = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    return Rate(len(steps) * batch_size / sum(steps), batch_size / statistics.median(steps))


class StepClock(L.Callback):
    """Records ``time.perf_counter()`` at the end of every training batch."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.stamps.append(time.perf_counter())


# ---------------------------------------------------------------- the runs


def fused_sgd(net: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """``caffe_sgd``'s parameter groups and schedule with ``SGD(fused=True)`` (diagnostic)."""
    groups = param_groups(net, lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"])
    opt = torch.optim.SGD(groups, lr=OPTIM["lr"], momentum=OPTIM["momentum"], fused=True)
    return opt, torch.optim.lr_scheduler.StepLR(opt, OPTIM["lr_step"], OPTIM["gamma"])


def run_plain(spec: ModelSpec, batches: Iterable[Batch], *, channels_last: bool,
              fused: bool = False) -> Rate:
    """img/s of a hand-written training loop over ``batches`` (the first ``warmup`` untimed);
    ``batches`` may be a live data loader."""
    torch.manual_seed(0)
    net = CaffeNet(spec.num_classes, **spec.net_kwargs)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if fused:
        opt, sched = fused_sgd(net)
    else:
        solver = caffe_sgd(net, **OPTIM)
        opt, sched = solver["optimizer"], solver["lr_scheduler"]["scheduler"]
    net.train()
    stamps = []
    for batch in batches:
        images = batch["images"]
        if channels_last:  # as CaffeNetModule.forward does
            images = images.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        loss = F.cross_entropy(net(images), batch["labels"])
        loss.backward()
        opt.step()
        sched.step()
        stamps.append(time.perf_counter())
    return steady_rate(stamps, spec.warmup, spec.batch_size)


def run_lightning(spec: ModelSpec, batches: Sequence[Batch]) -> Rate:
    """img/s of ``Trainer.fit(CaffeNetModule)`` over a DataLoader of ``batches``."""
    torch.manual_seed(0)
    module = CaffeNetModule(spec.num_classes, net=spec.net_kwargs, optim=OPTIM, channels_last=True)
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock], limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=DataLoader(list(batches), batch_size=None))
    return steady_rate(clock.stamps, spec.warmup, spec.batch_size)


# ---------------------------------------------------------------- FLOPs and peak


def layer_flops(net: nn.Module, input_size: int) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of each conv and fc layer of ``net`` for one image."""
    flops: dict[str, int] = {}

    def count(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels // module.groups * module.weight[0, 0].numel()
            else:
                fan_in = module.in_features
            flops[name] = 2 * output.numel() * fan_in
        return hook

    handles = [module.register_forward_hook(count(name)) for name, module in net.named_children()
               if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, 3, input_size, input_size))
    for handle in handles:
        handle.remove()
    return flops


def training_flops_per_image(spec: ModelSpec) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one image; checks the forward count."""
    net = CaffeNet(spec.num_classes, **spec.net_kwargs).eval()
    per_layer = layer_flops(net, spec.input_size)
    forward = sum(per_layer.values())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, spec.input_size, spec.input_size))
    if counter.get_total_flops() != forward:
        raise RuntimeError(f"analytic forward {forward} != FlopCounterMode "
                           f"{counter.get_total_flops()} FLOPs")
    first = next(iter(per_layer.values()))  # conv1: no gradient w.r.t. the input image
    return forward, 3 * forward - first


def matmul_gflops(n: int = 2048, reps: int = 5, calls: int = 5) -> float:
    """Median fp32 ``torch.mm`` GFLOP/s on ``n x n`` matrices (``calls`` mm per sample)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        rates.append(2 * n**3 * calls / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


# ---------------------------------------------------------------- driver and report


def measure(spec: ModelSpec, lightning: bool, fused: bool) -> dict[str, list[Rate]]:
    """img/s samples per variant; the variants take turns, in a rotating order."""
    batches = make_batches(spec, spec.warmup + spec.steps)
    runs: dict[str, Callable[[], Rate]] = {
        "plain": lambda: run_plain(spec, batches, channels_last=True),
        "plain-nchw": lambda: run_plain(spec, batches, channels_last=False),
    }
    if lightning:
        runs["lightning"] = lambda: run_lightning(spec, batches)
    if fused:
        runs["plain-fused"] = lambda: run_plain(spec, batches, channels_last=True, fused=True)
    samples: dict[str, list[Rate]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(spec.repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            samples[name].append(runs[name]())
            rate = samples[name][-1]
            print(f"  [{spec.name} repeat {r + 1}/{spec.repeats}] {name:<11} {rate.window:8.2f} "
                  f"img/s ({rate.median_step:.2f} from the median step)", flush=True)
    return samples


def report(spec: ModelSpec, samples: dict[str, list[Rate]], peak_gflops: float) -> None:
    """Print the table of one model: img/s, ratio to ``plain`` and FLOP utilisation."""
    forward, train = training_flops_per_image(spec)
    window = {name: [r.window for r in rates] for name, rates in samples.items()}
    steady = {name: statistics.median(r.median_step for r in rates)
              for name, rates in samples.items()}
    base = statistics.median(window["plain"])
    print(f"\n{spec.name}: width {spec.width}, input {spec.input_size}, batch {spec.batch_size}, "
          f"{spec.warmup} warm-up + {spec.steps} timed steps, {len(samples['plain'])} repeats")
    print(f"forward {forward / 1e9:.3f} GFLOP/img, train (fwd+bwd) {train / 1e9:.3f} GFLOP/img "
          f"({train / forward:.2f}x fwd); fp32 mm peak {peak_gflops:.1f} GFLOP/s")
    print("img/s: median over runs of each run's timed-window rate; 'median-step img/s': median "
          "over runs of batch / median step time")
    print(f"| {'variant':<11} | img/s  | min-max img/s   | vs plain | median-step img/s | "
          "vs plain | GFLOP/s | of mm peak |")
    print(f"|{'-' * 13}|{'-' * 8}|{'-' * 17}|{'-' * 10}|{'-' * 19}|{'-' * 10}|{'-' * 9}|"
          f"{'-' * 12}|")
    for name, rates in window.items():
        med = statistics.median(rates)
        achieved = med * train / 1e9
        print(f"| {name:<11} | {med:6.1f} | {min(rates):7.2f}-{max(rates):<7.2f} | "
              f"{med / base:8.1%} | {steady[name]:17.1f} | {steady[name] / steady['plain']:8.1%} | "
              f"{achieved:7.1f} | {achieved / peak_gflops:10.1%} |")
    if "lightning" in window:
        pairs = [lt / pl for lt, pl in zip(window["lightning"], window["plain"])]
        ratio = statistics.median(window["lightning"]) / base
        print(f"lightning / plain per repeat: {', '.join(f'{p:.1%}' for p in pairs)} "
              f"(median {statistics.median(pairs):.1%})")
        verdict = "MET" if ratio >= 0.95 else "MISSED"
        print(f"goal lightning >= 95% of plain: {ratio:.1%} "
              f"({steady['lightning'] / steady['plain']:.1%} by median step), {verdict}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument("--batch-size", type=int, help="override the model's default batch size")
    p.add_argument("--steps", type=int, help="timed steps per run (default: demo 15, caffenet 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per run (default: demo 3, caffenet 1)")
    p.add_argument("--repeats", type=int, help="runs per variant, medians reported (default: "
                   "demo 5, caffenet 3)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-lightning", action="store_true", help="plain loops only")
    p.add_argument("--fused-sgd", action="store_true",
                   help="add a plain loop with SGD(fused=True) (diagnostic, not cnnft's solver)")
    return p.parse_args(argv)


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and its few-workers hint (the loader is in memory)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`max_epochs` was not set.*")
    warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own pytree use


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    names = list(MODELS) if args.model == "both" else [args.model]
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("steps", args.steps),
                                   ("warmup", args.warmup), ("repeats", args.repeats))
                 if v is not None}
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    peak = matmul_gflops()
    print(f"fp32 torch.mm 2048x2048: {peak:.1f} GFLOP/s (median of 5)")
    for name in names:
        spec = replace(MODELS[name], **overrides)
        samples = measure(spec, lightning=not args.no_lightning, fused=args.fused_sgd)
        report(spec, samples, peak)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}, "
          f"{torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
