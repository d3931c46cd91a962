"""The analysis plugin contract: an ``Analysis`` is a Lightning Callback that observes.

An analysis reads the model (eval mode, inference mode, mode restored) and writes results; it
never changes training. Subclasses implement ``run(model, ctx) -> metrics`` as a thin layer
over pure functions; this base class fires it at the end of fit and/or every N steps on global
rank zero, logs the returned metrics (``<analysis>/<layer>/<stat>``) to every logger, and
offers the writers every analysis uses: ``results/<name>.json`` and ``.csv``, figures under
``figures/``, and a W&B table when a W&B logger is attached. ``cnnft-analyze`` calls the same
``run`` on checkpoints.

When it fires (any combination): ``at_fit_end``; ``every_n_steps``; ``at_snapshots``: at each
iteration a :class:`cnnft.callbacks.IterationSnapshots` callback of the same trainer saves a
snapshot (after the snapshot is written). It never runs twice at the same step (same weights):
a second firing at that step only finalizes again.

Analyses that combine several models (one row per training iteration, say) keep what ``run``
found in their state (``state_dict``, so it survives a resume) and write the combined outputs
in ``finalize(ctx)``: ``cnnft-analyze`` calls it once after the last checkpoint with the root
output directory, and ``fire`` calls it after every run during training (the run directory then
holds the combined outputs so far).
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
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from cnnft.data.images import undecodable
from cnnft.data.transforms import Mean, resolve_mean
from cnnft.data.voc import VOCImage, load_voc
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
    mean: Mean  # a mean pixel, or Caffe's mean image (model.mean_image)
    resize: int | None = None
    imagenet_root: Path | None = None
    cache: FeatureCache | None = None
    loggers: Sequence[Logger] = field(default_factory=list)
    step: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    progress: bool = True
    checkpoint: Path | None = None  # the analysed checkpoint file (cnnft-analyze), if any
    skip_corrupt: bool = False  # data.skip_corrupt: leave undecodable VOC images out (voc_images)
    #: split -> ids of the images ``voc_images`` left out; ``write_table`` counts them (skip_corrupt)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], output_dir: Path, model_key: str, **extra: Any
                    ) -> AnalysisContext:
        """Build from a resolved run config (``cnnft-train``'s, stored in every checkpoint)."""
        data, model, paths = cfg["data"], cfg["model"], cfg["paths"]
        return cls(output_dir=Path(output_dir), voc_root=Path(data["voc_root"]), model_key=model_key,
                   input_size=model["input_size"], context_pad=model["context_pad"],
                   mean=resolve_mean(model["mean"], model.get("mean_image")), resize=model.get("resize"),
                   imagenet_root=Path(data["imagenet_root"]) if data.get("imagenet_root") else None,
                   cache=FeatureCache(Path(paths["cache_dir"]) / "features"),
                   num_workers=data.get("num_workers", 0),
                   skip_corrupt=bool(data.get("skip_corrupt", False)), **extra)

    def voc_images(self, split: str) -> list[VOCImage]:
        """The annotated images of VOC ``split`` that every analysis reads (probes, unit analyses,
        detection): all of them, or with ``skip_corrupt`` those that decode, the others named in a
        warning and recorded in ``skipped`` (their count goes into each results JSON).

        Without ``skip_corrupt`` nothing is checked here (no extra decode at paper scale): the
        first read of a broken file raises ``CorruptImageError`` naming it. With it, every image
        is decoded once up front (threads, memoised per process: ``undecodable``) instead of being
        dropped while features are extracted: features, their cache keys, labels, proposals and
        region windows are then all built from this one list, so no row can shift against its
        label, and a cached feature file never depends on which images failed in which run.
        """
        images = load_voc(self.voc_root, split)
        if not self.skip_corrupt:
            return images
        bad = undecodable([im.path for im in images], workers=max(4, self.num_workers))
        self.skipped[split] = [im.image_id for im in images if im.path in bad]
        if bad:
            log.warning("%s: leaving out %d corrupt image(s) of split %r (data.skip_corrupt=true): %s",
                        self.voc_root, len(bad), split, "; ".join(bad.values()))
        return [im for im in images if im.path not in bad]


class Analysis(L.Callback):
    """Base class of analyses: fires ``at_fit_end``, ``every_n_steps`` and/or ``at_snapshots``
    (see the module doc).

    ``contract_overrides``: extra config overrides the contract tests need to run this analysis
    in a tiny training run (``{pretrained}`` is replaced by a tiny pretrained checkpoint).
    """

    name: ClassVar[str] = "analysis"
    contract_overrides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, every_n_steps: int | None = None, at_fit_end: bool = True,
                 at_snapshots: bool = False) -> None:
        self.every_n_steps, self.at_fit_end, self.at_snapshots = every_n_steps, at_fit_end, at_snapshots
        self.runs = 0
        self.last_step: int | None = None
        #: rows kept across runs (e.g. one per snapshot) for ``finalize``; saved with the state
        self.history: list[dict[str, Any]] = []
        self._snapshot_steps: frozenset[int] = frozenset()

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        """Compute, write results and figures, and return flat metrics to log."""
        raise NotImplementedError

    def finalize(self, ctx: AnalysisContext) -> None:
        """Write outputs that combine every ``run`` so far into ``ctx.output_dir`` (default: none)."""

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.name}]"

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "last_step": self.last_step, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
        self.last_step = state_dict.get("last_step")
        self.history = [dict(h) for h in state_dict.get("history", [])]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from cnnft.callbacks import IterationSnapshots

        if not self.at_snapshots:
            return
        sources = [cb for cb in trainer.callbacks if isinstance(cb, IterationSnapshots)]
        self._snapshot_steps = frozenset(i for cb in sources for i in cb.iterations)
        if not sources and stage == "fit":
            rank_zero_warn(f"analysis {self.name} has at_snapshots=true but no IterationSnapshots "
                           "callback is configured (callbacks.snapshots); it fires at no snapshot")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # a set lookup: nothing to pay on steps where nothing is due
        if (self.every_n_steps and step % self.every_n_steps == 0) or step in self._snapshot_steps:
            self.fire(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and not trainer.sanity_checking:
            self.fire(trainer, pl_module)

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run on global rank zero with the trainer's run directory and loggers, then finalize.
        A second call at the step of the last run only finalizes (same weights, more logs)."""
        step = trainer.global_step
        due = self.last_step != step
        if trainer.is_global_zero:
            from cnnft.hashing import model_digest

            ctx = AnalysisContext.from_config(
                pl_module.run_config, Path(pl_module.run_config["paths"]["output_dir"]),
                model_digest(pl_module), loggers=trainer.loggers, step=step,
                device=str(pl_module.device), progress=False)
            if due:
                metrics = self.run(pl_module, ctx)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
            self.finalize(ctx)
        if due:
            self.runs += 1
            self.last_step = step
        trainer.strategy.barrier(f"analysis {self.name}")


# ---------------------------------------------------------------------- writers


def write_table(ctx: AnalysisContext, name: str, rows: Sequence[dict[str, Any]],
                summary: dict[str, Any] | None = None) -> Path:
    """``results/<name>.json`` (rows + summary) and ``results/<name>.csv`` (rows), plus a W&B
    table when a W&B logger is attached. Returns the JSON path. With ``skip_corrupt`` the summary
    also holds ``skipped_images`` (count) and ``skipped_image_ids`` (per split) of ``ctx.skipped``."""
    results = ctx.output_dir / "results"
    summary = dict(summary or {})
    if ctx.skipped:  # skip_corrupt, and VOC images were read: what was left out, per split
        summary["skipped_images"] = sum(len(ids) for ids in ctx.skipped.values())
        summary["skipped_image_ids"] = {split: list(ids) for split, ids in ctx.skipped.items()}
    payload = {"analysis": name, "step": ctx.step, "model": ctx.model_key,
               "summary": summary, "rows": list(rows)}
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


def class_panels(classes: Sequence[str], *, xlabel: str, ylabel: str, cols: int = 5,
                 height: float = 2.4, **subplots: Any) -> tuple[Any, list[Any]]:
    """A figure with one small titled panel per class (spare panels hidden) and shared axis
    labels; returns the figure and the class panels, in class order. Call ``tight_layout`` after
    drawing."""
    from cnnft.plotting import pyplot

    plt = pyplot()
    rows = -(-len(classes) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3 * cols, height * rows), squeeze=False, **subplots)
    panels = list(grid.flat)
    for ax, name in zip(panels, classes, strict=False):
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in panels[len(classes):]:
        ax.axis("off")
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    return fig, panels[:len(classes)]


def save_figure(ctx: AnalysisContext, fig: Any, name: str) -> Path:
    """Write a matplotlib figure to ``figures/<name>.png`` (atomically), close it, and log it to W&B."""
    from cnnft.plotting import save_png

    path = save_png(fig, ctx.output_dir / "figures" / f"{name}.png", dpi=120)
    for logger in ctx.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"figures/{name}", images=[str(path)])
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def define_step_axis(loggers: Sequence[Logger], prefix: str, step_key: str) -> None:
    """Plot every W&B metric under ``<prefix>/`` against ``step_key`` (a logged metric) instead of
    the trainer's step, so values logged late or out of order are kept and drawn in place."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.define_metric(step_key)
            logger.experiment.define_metric(f"{prefix}/*", step_metric=step_key, step_sync=True)
