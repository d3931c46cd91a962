"""``python -m cnnft.demo``: the demo pipeline's training stages on the generated data.

Pretrains the demo CaffeNet (with snapshots), then fine-tunes it with ``freeze=all`` and
``freeze=fc`` as one Hydra multirun. Every stage is an ordinary ``cnnft-train`` job in a fixed
directory under ``outputs/demo`` with ``resume=auto``, so a second call continues or skips
finished work. Extra arguments are passed to every stage (e.g. ``trainer=cpu``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def stage(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "cnnft.train", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> None:
    extra = list(sys.argv[1:] if argv is None else argv)
    out = Path("outputs/demo")
    start = time.perf_counter()
    stage(["stage=pretrain", "resume=auto", f"hydra.run.dir={out}/pretrain", *extra])
    stage(["-m", "stage=finetune", "freeze=all,fc", "resume=auto",
           f"pretrained={out}/pretrain/checkpoints/last.ckpt",
           f"hydra.sweep.dir={out}/finetune", "hydra.sweep.subdir=${freeze.name}", *extra])
    print(f"demo finished in {time.perf_counter() - start:.0f} s; runs in {out}/")


if __name__ == "__main__":
    main()
