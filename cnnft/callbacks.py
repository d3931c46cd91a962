"""Training callbacks and plugins: snapshots at fixed iterations, atomic checkpoint files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from cnnft.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside its target, then rename it into place,
    so a killed job never leaves a truncated checkpoint behind. Loads use ``weights_only``."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def snapshot_name(iteration: int) -> str:
    """File name of the snapshot taken after ``iteration`` optimizer steps."""
    return f"iter_{iteration:07d}.ckpt"


class IterationSnapshots(L.Callback):
    """Save a full checkpoint after each of the given iterations (optimizer steps), named by
    iteration (``iter_0005000.ckpt``). Keyed on ``trainer.global_step``, so the set is the same
    whether or not training was interrupted and resumed."""

    def __init__(self, iterations: list[int], dirpath: str | os.PathLike[str]) -> None:
        self.iterations = sorted({int(i) for i in iterations})
        self.dirpath = Path(dirpath)

    @property
    def state_key(self) -> str:
        return f"IterationSnapshots{{dirpath={str(self.dirpath)!r}}}"

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.iterations:  # every rank calls: saving is collective
            trainer.save_checkpoint(self.dirpath / snapshot_name(trainer.global_step),
                                    weights_only=False)
