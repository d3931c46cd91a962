"""DDP on CPU: two gloo processes launched by Lightning from the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cnnft.checkpoint import read_checkpoint
from tests.conftest import TINY_RUN


def test_ddp_two_cpu_processes_one_checkpoint_one_wandb_run(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    overrides = [o for o in TINY_RUN if not o.startswith("logger=")]
    cmd = [sys.executable, "-m", "cnnft.train", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "logger=wandb", f"paths.data_dir={data_dir}",
           f"hydra.run.dir={run}", *overrides]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    assert (run / "train_ddp_process_1.log").exists()  # the second rank ran in the same dir
