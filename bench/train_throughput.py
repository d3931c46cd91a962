"""Training throughput of CaffeNet on this machine's CPU: plain PyTorch loop vs Lightning.

Every variant trains a fresh ``CaffeNet`` with Caffe's solver (``cnnft.optim.caffe_sgd``: SGD with
momentum, per-layer groups, a step lr schedule) on the same random in-memory batches:

* ``plain``: a hand-written loop (zero_grad, forward, cross-entropy, backward, SGD step, lr step)
  in NHWC (channels_last), as ``conf/train.yaml`` sets ``model.channels_last: true``;
* ``plain-nchw``: the same loop on contiguous (NCHW) tensors;
* ``lightning``: ``Trainer.fit`` of ``cnnft.module.CaffeNetModule`` (channels_last) over a
  ``DataLoader`` of the pre-made batch dicts; no logger, checkpointing, progress bar or summary;
* diagnostics (``--diagnostics``): ``plain-fused``, ``plain`` with ``SGD(fused=True)``; and
  ``plain-nolrn``, ``plain`` with norm1/norm2 (``nn.LocalResponseNorm``) replaced by identities,
  which bounds what a faster LRN could gain. Neither is cnnft's network or solver.

Two ways to run them (``--mode``):

* ``interleaved`` (default): one ``Trainer.fit``; a callback's ``on_train_batch_end`` runs one step
  of each plain variant on the same batch, so the variants alternate step by step and a burst of
  other work on this shared 2-core machine hits them alike. A Lightning step is the time from
  the end of the callback's plain steps to the next ``on_train_batch_end``: everything Lightning
  does per step (data fetch, hooks, logging, closure, optimizer and lr step).
* ``separate``: each variant is a whole run of its own, the runs taking turns (rotating order);
  a run's clock is ``on_train_batch_end`` (Lightning) or the end of each loop step (plain).

Denormal floats are flushed to zero, as ``cnnft.train`` does with ``conf/train.yaml``'s
``flush_denormal: true`` (``--no-flush-denormal`` turns that off). Warm-up steps are not timed.
Rates: ``img/s`` = timed images / timed seconds of a run (median over runs); ``median-step
img/s`` = batch / median step time (insensitive to short bursts of load).

FLOP utilisation: training FLOPs per image x img/s / the fp32 ``torch.mm`` rate measured here with
the same threads. FLOPs count the conv and fc layers (2 per multiply-add) analytically: forward
(checked against ``torch.utils.flop_counter.FlopCounterMode``) plus twice that for backward, less
conv1's input gradient, which is never computed. (FlopCounterMode's backward count is not used:
in torch 2.14 it charges a grouped convolution's weight gradient ``groups`` times over.)

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

Batch = dict[str, Any]

#: conf/stage/pretrain.yaml's solver (lr_step only matters for the schedule, not the speed).
OPTIM: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "lr_step": 200,
                         "gamma": 0.1, "lr_mult": {}}

#: Input scale of real batches: 0-255 pixels minus the mean pixel (std ~60). Unit-variance noise
#: would make activations tiny after Caffe's std-0.01 init, risking slow denormal arithmetic.
PIXEL_STD = 60.0


def sync(device: str | torch.device) -> None:
    """Wait for a GPU's queued kernels, so that a clock read after this counts them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    device: str = "cpu"

    @property
    def net_kwargs(self) -> dict[str, Any]:
        return {"width": self.width, "input_size": self.input_size, "dropout": 0.5}


#: demo: conf/scale/demo.yaml (40 demo classes); caffenet: the paper's net (a smaller batch and
#: few steps, since one step takes seconds here).
MODELS = {
    "demo": ModelSpec("demo", 0.25, 163, 40, batch_size=64, warmup=3, steps=15, repeats=3),
    "caffenet": ModelSpec("caffenet", 1.0, 227, 1000, batch_size=32, warmup=1, steps=4,
                          repeats=2),
}


# ---------------------------------------------------------------- inputs, rates, machine load


class ForeignLoad:
    """Share of this machine's CPU time used by other processes since creation (Linux
    ``/proc/stat``; this process and its reaped children count as ours)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return sum(ticks) / hz, (sum(ticks) - ticks[3] - ticks[4]) / hz, own

    def share(self) -> float:
        total, busy, own = (b - a for a, b in zip(self._start, self._read()))
        return max(0.0, busy - own) / total if total > 0 else 0.0



def make_batches(spec: ModelSpec, count: int, distinct: int = 4, seed: int = 0) -> list[Batch]:
    """``count`` batch dicts as ``collate_skipping`` makes them, cycling ``distinct`` tensors."""
    gen = torch.Generator().manual_seed(seed)
    shape = (spec.batch_size, 3, spec.input_size, spec.input_size)
    pool = [{"images": torch.randn(shape, generator=gen) * PIXEL_STD,
             "labels": torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen),
             "skipped": 0} for _ in range(min(distinct, count))]
    pool = [{k: v.to(spec.device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in pool]
    return [pool[i % len(pool)] for i in range(count)]


class Rate(NamedTuple):
    """img/s of one run: over its timed window, and from its median step time."""

    window: float
    median_step: float
    seconds: tuple[float, ...]  # of each timed step

    @classmethod
    def of(cls, step_seconds: Sequence[float], batch_size: int) -> Rate:
        if not step_seconds:
            raise ValueError("no timed steps: raise --steps")
        return cls(len(step_seconds) * batch_size / sum(step_seconds),
                   batch_size / statistics.median(step_seconds), tuple(step_seconds))


# ---------------------------------------------------------------- the variants


def fused_sgd(net: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """``caffe_sgd``'s parameter groups and schedule with ``SGD(fused=True)`` (diagnostic)."""
    groups = param_groups(net, lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"])
    opt = torch.optim.SGD(groups, lr=OPTIM["lr"], momentum=OPTIM["momentum"], fused=True)
    return opt, torch.optim.lr_scheduler.StepLR(opt, OPTIM["lr_step"], OPTIM["gamma"])


class PlainTrainer:
    """A fresh CaffeNet and its solver; ``step(batch)`` is one hand-written training step."""

    def __init__(self, spec: ModelSpec, *, channels_last: bool, fused: bool = False,
                 lrn: bool = True) -> None:
        torch.manual_seed(0)
        self.channels_last = channels_last
        self.spec = spec
        self.net = CaffeNet(spec.num_classes, **spec.net_kwargs).train().to(spec.device)
        if not lrn:
            self.net.norm1, self.net.norm2 = nn.Identity(), nn.Identity()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if fused:
            self.opt, self.sched = fused_sgd(self.net)
        else:
            solver = caffe_sgd(self.net, **OPTIM)
            self.opt, self.sched = solver["optimizer"], solver["lr_scheduler"]["scheduler"]

    def step(self, batch: Batch) -> None:
        images = batch["images"]
        if self.channels_last:  # as CaffeNetModule.forward does
            images = images.contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad()
        F.cross_entropy(self.net(images), batch["labels"]).backward()
        self.opt.step()
        self.sched.step()
        sync(self.spec.device)


PLAIN_VARIANTS: dict[str, dict[str, bool]] = {
    "plain": {"channels_last": True},
    "plain-nchw": {"channels_last": False},
    "plain-fused": {"channels_last": True, "fused": True},
    "plain-nolrn": {"channels_last": True, "lrn": False},
}


def run_plain(spec: ModelSpec, batches: Iterable[Batch], **variant: bool) -> Rate:
    """Rate of a plain loop over ``batches`` (may be a live data loader); ``warmup`` untimed."""
    trainer = PlainTrainer(spec, **variant)
    stamps = [time.perf_counter()]
    for batch in batches:
        trainer.step(batch)
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return Rate.of(steps[spec.warmup:], spec.batch_size)


class Interleave(L.Callback):
    """After each Lightning step, one step of every plain trainer on the same batch; records the
    seconds of each plain step and of each Lightning step (the time between these callbacks
    less the plain steps)."""

    def __init__(self, plain: dict[str, PlainTrainer]) -> None:
        self.plain = plain
        self.seconds: dict[str, list[float]] = {"lightning": [], **{name: [] for name in plain}}
        self._resumed: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Batch, batch_idx: int) -> None:
        sync(pl_module.device)
        now = time.perf_counter()
        self.seconds["lightning"].append(now - self._resumed if self._resumed else float("nan"))
        names = list(self.plain)
        for name in names[batch_idx % len(names):] + names[:batch_idx % len(names)]:
            start = time.perf_counter()
            self.plain[name].step(batch)
            self.seconds[name].append(time.perf_counter() - start)
        self._resumed = time.perf_counter()


def fit_lightning(spec: ModelSpec, batches: Sequence[Batch], callback: L.Callback) -> None:
    """``Trainer.fit(CaffeNetModule)`` over a DataLoader of ``batches`` with ``callback``."""
    torch.manual_seed(0)
    module = CaffeNetModule(spec.num_classes, net=spec.net_kwargs, optim=OPTIM, channels_last=True)
    accelerator = "gpu" if spec.device.startswith("cuda") else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="32-true", max_steps=len(batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=DataLoader(list(batches), batch_size=None))


def run_interleaved(spec: ModelSpec, batches: Sequence[Batch], plain: Sequence[str]
                    ) -> dict[str, Rate]:
    """Rates of Lightning and the ``plain`` variants stepping in turn in one ``fit``."""
    callback = Interleave({name: PlainTrainer(spec, **PLAIN_VARIANTS[name]) for name in plain})
    fit_lightning(spec, batches, callback)
    return {name: Rate.of(seconds[spec.warmup:], spec.batch_size)
            for name, seconds in callback.seconds.items()}


class StepClock(L.Callback):
    """Records ``time.perf_counter()`` at the end of every training batch."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        sync(pl_module.device)
        self.stamps.append(time.perf_counter())


def run_lightning(spec: ModelSpec, batches: Sequence[Batch]) -> Rate:
    """Rate of a Lightning run of its own (the first step's end starts the clock)."""
    clock = StepClock()
    fit_lightning(spec, batches, clock)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return Rate.of(steps[spec.warmup - 1:], spec.batch_size)


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


def matmul_gflops(n: int = 2048, reps: int = 5, calls: int = 5, device: str = "cpu") -> float:
    """Median fp32 ``torch.mm`` GFLOP/s on ``n x n`` matrices (``calls`` mm per sample)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        sync(device)
        rates.append(2 * n**3 * calls / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


# ---------------------------------------------------------------- driver and report


def measure(spec: ModelSpec, variants: Sequence[str], mode: str) -> dict[str, list[Rate]]:
    """Rates per variant, one per repeat."""
    batches = make_batches(spec, spec.warmup + spec.steps)
    plain = [v for v in variants if v != "lightning"]
    samples: dict[str, list[Rate]] = {name: [] for name in variants}
    for r in range(spec.repeats):
        if mode == "interleaved" and "lightning" in variants:
            rates = run_interleaved(spec, batches, plain)
        else:
            order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            rates = {name: run_lightning(spec, batches) if name == "lightning"
                     else run_plain(spec, batches, **PLAIN_VARIANTS[name]) for name in order}
        for name, rate in rates.items():
            samples[name].append(rate)
            print(f"  [{spec.name} repeat {r + 1}/{spec.repeats}] {name:<11} {rate.window:8.2f} "
                  f"img/s ({rate.median_step:.2f} from the median step)", flush=True)
    return samples


def report(spec: ModelSpec, samples: dict[str, list[Rate]], peak_gflops: float,
           mode: str) -> None:
    """Print the table of one model: img/s, ratio to ``plain`` and FLOP utilisation."""
    forward, train = training_flops_per_image(spec)
    window = {name: statistics.median(r.window for r in rates) for name, rates in samples.items()}
    steady = {name: statistics.median(r.median_step for r in rates)
              for name, rates in samples.items()}
    print(f"\n{spec.name}: width {spec.width}, input {spec.input_size}, batch {spec.batch_size}, "
          f"{spec.warmup} warm-up + {spec.steps} timed steps x {spec.repeats} runs, {mode}")
    print(f"forward {forward / 1e9:.3f} GFLOP/img, train (fwd+bwd) {train / 1e9:.3f} GFLOP/img "
          f"({train / forward:.2f}x fwd); fp32 mm peak {peak_gflops:.1f} GFLOP/s")
    print(f"| {'variant':<11} | img/s  | min-max img/s   | vs plain | median-step img/s | "
          "vs plain | GFLOP/s | of mm peak |")
    print(f"|{'-' * 13}|{'-' * 8}|{'-' * 17}|{'-' * 10}|{'-' * 19}|{'-' * 10}|{'-' * 9}|"
          f"{'-' * 12}|")
    for name, rates in samples.items():
        lo, hi = min(r.window for r in rates), max(r.window for r in rates)
        achieved = window[name] * train / 1e9
        print(f"| {name:<11} | {window[name]:6.1f} | {lo:7.2f}-{hi:<7.2f} | "
              f"{window[name] / window['plain']:8.1%} | {steady[name]:17.1f} | "
              f"{steady[name] / steady['plain']:8.1%} | {achieved:7.1f} | "
              f"{achieved / peak_gflops:10.1%} |")
    if "lightning" in samples:
        pairs = [lt.window / pl.window for lt, pl in zip(samples["lightning"], samples["plain"])]
        ratio = window["lightning"] / window["plain"]
        print(f"lightning / plain per run: {', '.join(f'{p:.1%}' for p in pairs)}")
        if mode == "interleaved":  # steps i of both ran back to back: compare them pairwise
            per_step = [p / lt for lt_run, pl_run in zip(samples["lightning"], samples["plain"])
                        for lt, p in zip(lt_run.seconds, pl_run.seconds)]
            extra = [lt - p for lt_run, pl_run in zip(samples["lightning"], samples["plain"])
                     for lt, p in zip(lt_run.seconds, pl_run.seconds)]
            print(f"lightning / plain step by step (adjacent steps): median "
                  f"{statistics.median(per_step):.1%} of {len(per_step)} pairs, quartiles "
                  f"{' - '.join(f'{q:.1%}' for q in statistics.quantiles(per_step, n=4)[::2])}; "
                  f"lightning step - plain step: median {statistics.median(extra) * 1e3:+.1f} ms")
        verdict = "MET" if ratio >= 0.95 else "MISSED"
        print(f"goal lightning >= 95% of plain: {ratio:.1%} "
              f"({steady['lightning'] / steady['plain']:.1%} by median step), {verdict}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument("--mode", choices=["interleaved", "separate"], default="interleaved")
    p.add_argument("--batch-size", type=int, help="override the model's default batch size")
    p.add_argument("--steps", type=int, help="timed steps per run (default: demo 15, caffenet 4)")
    p.add_argument("--warmup", type=int, help="untimed steps per run (default: demo 3, caffenet 1)")
    p.add_argument("--repeats", type=int, help="runs per variant, medians reported (default: "
                   "demo 3, caffenet 2)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timed steps wait for the GPU)")
    p.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.set_flush_denormal, as conf/train.yaml's flush_denormal (default on)")
    p.add_argument("--no-lightning", action="store_true", help="plain loops only")
    p.add_argument("--diagnostics", action="store_true",
                   help="add plain loops with SGD(fused=True) and without LRN (not cnnft's)")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1")
    return args


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and its hints that do not apply here."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*`max_epochs` was not set.*",
                    ".*have no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(args.flush_denormal)  # before any torch op starts the thread pool
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    names = list(MODELS) if args.model == "both" else [args.model]
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("steps", args.steps),
                                   ("warmup", args.warmup), ("repeats", args.repeats),
                                   ("device", args.device))
                 if v is not None}
    variants = ["plain", "plain-nchw", *([] if args.no_lightning else ["lightning"]),
                *(["plain-fused", "plain-nolrn"] if args.diagnostics else [])]
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs, flush_denormal {args.flush_denormal}, load average "
          f"{os.getloadavg()[0]:.2f}")
    load = ForeignLoad()
    n = 8192 if args.device.startswith("cuda") else 2048  # a GPU needs a bigger product
    peak = matmul_gflops(n, device=args.device)
    if args.device.startswith("cuda"):
        print(f"device {torch.cuda.get_device_name()}, TF32 matmul "
              f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
    print(f"fp32 torch.mm {n}x{n}: {peak:.1f} GFLOP/s (median of 5; other processes used "
          f"{load.share():.0%} of the CPU meanwhile)")
    for name in names:
        spec = replace(MODELS[name], **overrides)
        load = ForeignLoad()
        samples = measure(spec, variants, args.mode)
        report(spec, samples, peak, args.mode)
        print(f"other processes used {load.share():.0%} of the machine's CPU time meanwhile")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}, "
          f"{torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
