"""Training callbacks and plugins: snapshots at fixed iterations, atomic checkpoint files, a
final ``last.ckpt`` whatever the cadence, and a W&B logger that resumes one run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from cnnft.io import atomic_path, write_json


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


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes ``last.ckpt`` when fit ends, whatever the
    cadence: with ``every_n_train_steps: 50`` and ``max_steps: 620`` the stock callback leaves
    step 600 in ``last.ckpt``; this one leaves step 620, the network that was trained."""

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class ResumableWandbLogger(WandbLogger):
    """Lightning's WandbLogger for one training run across kills and resumes.

    cnnft-train passes the run's W&B id (kept in the checkpoint's config) with
    ``resume="allow"``, so every resume continues the same W&B run. Online, W&B resumes the
    run's history on the server. Offline, W&B can neither resume nor rewind (``resume_from``
    needs the server): each resume writes another segment ``wandb/offline-run-*-<id>`` with the
    same id, whose own history starts again. Either way this logger records the last step it
    sent (``wandb/cnnft_last_step.json`` in ``save_dir``) and, resumed, sends only later steps,
    so no step reaches the run twice: the steps between the checkpoint and that one are
    recomputed by the resumed run (the CSV holds the recomputed rows) and W&B keeps the values
    the interrupted run sent (equal under deterministic training).
    """

    MARKER = "cnnft_last_step.json"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._marker = Path(self.save_dir or ".") / "wandb" / self.MARKER
        self._sent_through: int | None = None
        run_id = self._wandb_init.get("id")
        if run_id and self._marker.is_file():
            try:
                marker = json.loads(self._marker.read_text())
            except ValueError:  # a torn marker: resend everything rather than lose steps
                marker = {}
            if marker.get("id") == run_id:
                self._sent_through = int(marker["step"])

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None and self._sent_through is not None and step <= self._sent_through:
            return  # already in this W&B run (sent before the kill)
        super().log_metrics(metrics, step)
        run_id = self._wandb_init.get("id")
        if step is not None and run_id:
            write_json(self._marker, {"id": run_id, "step": int(step)})
