"""A callback that records each training step's sample keys and labels, per rank (for the
test that one and two processes train on the same global batches)."""

import json
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, list]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        step = trainer.global_step
        keys = trainer.train_dataloader.batch_sampler.batch(step)
        self.steps[step] = {"keys": [list(k) for k in keys],
                            "positions": batch["positions"].tolist(),
                            "labels": batch["labels"].tolist()}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        out = Path(trainer.default_root_dir) / f"batches_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"world_size": trainer.world_size, "steps": self.steps}))
