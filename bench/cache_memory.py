"""Peak memory of float16 feature caches: VGG16's seven probe taps over a VOC split, written by
``extract_cached`` (streamed, one batch at a time) against the whole-array path it replaced.

The images are what ``probe_cls`` feeds (``center_crop=false``): each whole image warped to the
input size minus the model's mean (``WholeImageDataset``). The network is torchvision's VGG16
with random weights (``model=vgg16``, ``weights=None``), the taps ``conf/model/vgg16.yaml``'s
``probe_layers``. Variants, each in a fresh child process with its own empty cache folder:

* ``forward-only``: the same forward passes (``forward_taps`` per batch), every output dropped:
  the floor, what one batch's activations take.
* ``in-memory``: the code before the change: ``extract`` holds every layer's float32 array,
  rounds a float16 copy of each to float32 and writes each with ``FeatureCache.save``.
* ``streamed``: ``extract_cached``, which appends each batch to the cache files
  (``FeatureCache.appender``) and loads the float32 features back at the end.

Each child builds the network and runs one warm-up batch, then resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and reports ``VmHWM`` - ``VmRSS`` at that point: the memory the
extraction added at its peak. The loader runs in the process (``num_workers=0``) so all of it is
counted. The two caches' SHA-256 are compared: the same numbers either way.

Run ``python bench/cache_memory.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

MIB = 1 << 20
VARIANTS = ("forward-only", "in-memory", "streamed")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(args: argparse.Namespace) -> dict[str, object]:
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from cnnft.data.datasets import WholeImageDataset, collate_skipping
    from cnnft.features import FeatureCache, extract, extract_cached
    from cnnft.models.build import build_network

    torch.set_flush_denormal(True)
    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    model = OmegaConf.merge(OmegaConf.load(conf / "torchvision.yaml"), OmegaConf.load(conf / "vgg16.yaml"))
    model.input_size = args.input_size
    layers = list(model.probe_layers)
    torch.manual_seed(0)
    net = build_network(OmegaConf.to_container(model, resolve=True))
    voc = Path(args.voc_root)
    ids = (voc / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()[: args.images or None]
    dataset = WholeImageDataset([voc / "JPEGImages" / f"{i}.jpg" for i in ids], crop=args.input_size,
                                mean=list(model.mean))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=0, collate_fn=collate_skipping)
    extract(net, [next(iter(loader))], layers)  # warm-up: allocator, kernels, image decoding
    cache_dir = Path(args.cache_root) / args.child
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = FeatureCache(cache_dir)
    parts = {"data": f"{voc}:{args.split}", "transform": {"kind": "image", "crop": args.input_size}}

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = status_kib("VmRSS")
    start = time.perf_counter()
    if args.child == "forward-only":
        with torch.inference_mode():
            for batch in loader:
                net.eval().forward_taps(batch["images"], layers)
        feats: dict[str, torch.Tensor] = {}
    elif args.child == "streamed":
        feats = extract_cached(net, loader, layers, cache=cache, key_parts=parts)
    else:  # the code before the change, step by step
        from cnnft.hashing import layer_digests

        digests = layer_digests(net)
        feats = extract(net, loader, layers)
        feats = {name: value.half().float() for name, value in feats.items()}
        for name in layers:
            key = FeatureCache.key(layer=name, **{**parts, "model": digests[name]})
            cache.save(key, feats[name], layer=name, **{**parts, "model": digests[name]})
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    metas = sorted(json.loads(p.read_text())["sha256"] for p in cache_dir.glob("*/meta.json"))
    return {"variant": args.child, "images": len(dataset), "layers": layers,
            "shapes": {n: list(v.shape) for n, v in feats.items()},
            "float32_mib": sum(v.numel() * 4 for v in feats.values()) / MIB,
            "disk_mib": sum(p.stat().st_size for p in cache_dir.glob("*/features.f16")) / MIB,
            "base_rss_mib": base / 1024, "peak_rss_mib": peak / 1024, "added_mib": (peak - base) / 1024,
            "seconds": seconds, "sha256": metas}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc-root", default="data/demo/VOC2007", help="a VOC2007 folder (only read)")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=0, help="first N images of the split (0: all)")
    p.add_argument("--input-size", type=int, default=163, help="input size (the demo's: 163)")
    p.add_argument("--batch-size", type=int, default=64, help="analyses' batch size (conf/analyze.yaml: 64)")
    p.add_argument("--cache-root", default="/tmp/cnnft-bench-cache-memory")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", variant]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr shown
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {variant}: {rows[-1]['seconds']:.1f} s", flush=True)
    first = rows[VARIANTS.index("streamed")]
    print(f"\nVGG16 (random weights), {first['images']} images of {args.voc_root} {args.split} at "
          f"{args.input_size}px, batch {args.batch_size}, taps {','.join(first['layers'])}")
    print("shapes: " + ", ".join(f"{n} {s[1:]}" for n, s in first["shapes"].items()))
    print(f"features: {first['float32_mib']:.0f} MiB as float32 in memory, {first['disk_mib']:.0f} MiB "
          "as float16 on disk")
    print("| variant      | RSS before MiB | peak RSS MiB | added at peak MiB | / float32 features | s |")
    print("|--------------|----------------|--------------|-------------------|--------------------|---|")
    for r in rows:
        ratio = r["added_mib"] / first["float32_mib"]
        print(f"| {r['variant']:<12} | {r['base_rss_mib']:14.0f} | {r['peak_rss_mib']:12.0f} | "
              f"{r['added_mib']:17.0f} | {ratio:17.2f}x | {r['seconds']:.0f} |")
    same = all(r["sha256"] == first["sha256"] for r in rows if r["variant"] != "forward-only")
    print(f"cache files identical across variants: {same}; load average {os.getloadavg()[0]:.2f}")
    shutil.rmtree(args.cache_root, ignore_errors=True)


if __name__ == "__main__":
    main()
