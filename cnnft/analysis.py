"""The analysis plugin contract: an ``Analysis`` is a Lightning Callback that observes.

An analysis reads the model (eval mode, inference mode, mode restored) and writes results; it
never changes training. Subclasses implement ``run(model, ctx) -> metrics`` as a thin layer
over pure functions; this base class fires it at the end of fit and/or every N steps on global
rank zero, logs the returned metrics (``<analysis>/<layer>/<stat>``) to every logger, and
offers the writers every analysis uses: ``results/<name>.json`` and ``.csv``, figures under
``figures/``, and a W&B table when a W&B logger is attached. ``cnnft-analyze`` calls the same
``run`` on checkpoints.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import nn
from typing_extensions import override

from cnnft.features import FeatureCache
from cnnft.io import atomic_write, write_json

log = logging.getLogger(__name__)


@dataclass
class AnalysisContext:
    """What an analysis needs besides the model: where data and results live, input geometry."""

    output_dir: Path
    voc_root: Path
    model_key: str
    input_size: int
    context_pad: int
    mean: tuple[float, ...]
    resize: int | None = None
    imagenet_root: Path | None = None
    cache: FeatureCache | None = None
    loggers: Sequence[Logger] = field(default_factory=list)
    step: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any], output_dir: Path, model_key: str, **extra: Any
                    ) -> AnalysisContext:
        """Build from a resolved run config (``cnnft-train``'s, stored in every checkpoint)."""
        data, model, paths = cfg["data"], cfg["model"], cfg["paths"]
        return cls(output_dir=Path(output_dir), voc_root=Path(data["voc_root"]), model_key=model_key,
                   input_size=model["input_size"], context_pad=model["context_pad"],
                   mean=tuple(model["mean"]), resize=model.get("resize"),
                   imagenet_root=Path(data["imagenet_root"]) if data.get("imagenet_root") else None,
                   cache=FeatureCache(Path(paths["cache_dir"]) / "features"),
                   num_workers=data.get("num_workers", 0), **extra)


class Analysis(L.Callback):
    """Base class of analyses. ``every_n_steps``: also run during training; ``at_fit_end``."""

    name: ClassVar[str] = "analysis"

    def __init__(self, *, every_n_steps: int | None = None, at_fit_end: bool = True) -> None:
        self.every_n_steps, self.at_fit_end = every_n_steps, at_fit_end
        self.runs = 0

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        """Compute, write results and figures, and return flat metrics to log."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.name}]"

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.fire(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and not trainer.sanity_checking:
            self.fire(trainer, pl_module)

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run on global rank zero with the trainer's run directory and loggers."""
        if trainer.is_global_zero:
            from cnnft.features import model_digest

            ctx = AnalysisContext.from_config(
                pl_module.run_config, Path(pl_module.run_config["paths"]["output_dir"]),
                model_digest(pl_module), loggers=trainer.loggers, step=trainer.global_step,
                device=str(pl_module.device), progress=False)
            metrics = self.run(pl_module, ctx)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self.runs += 1
        trainer.strategy.barrier(f"analysis {self.name}")


# ---------------------------------------------------------------------- writers


def write_table(ctx: AnalysisContext, name: str, rows: Sequence[dict[str, Any]],
                summary: dict[str, Any] | None = None) -> Path:
    """``results/<name>.json`` (rows + summary) and ``results/<name>.csv`` (rows), plus a W&B
    table when a W&B logger is attached. Returns the JSON path."""
    results = ctx.output_dir / "results"
    payload = {"analysis": name, "step": ctx.step, "model": ctx.model_key,
               "summary": summary or {}, "rows": list(rows)}
    path = write_json(results / f"{name}.json", payload)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(results / f"{name}.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    for logger in ctx.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=f"{name}/table", columns=columns,
                             data=[[row.get(c) for c in columns] for row in rows])
    return path


def save_figure(ctx: AnalysisContext, fig: Any, name: str) -> Path:
    """Write a matplotlib figure to ``figures/<name>.png`` (atomically) and to W&B."""
    import matplotlib.pyplot as plt

    path = ctx.output_dir / "figures" / f"{name}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    for logger in ctx.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"figures/{name}", images=[str(path)])
    plt.close(fig)
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
