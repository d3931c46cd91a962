"""``filter_viz``: conv1 filters as an image grid at each snapshot (paper Fig. 5, top row) and
the training curves drawn under them (Fig. 5, bottom).

Each filter is min-max normalised on its own (all its colour channels together) and the filters
are laid out in a grid (``cnnft.plotting.filter_grid``: torchvision's ``make_grid``). During
training it fires at every snapshot iteration (``at_snapshots``) and at the end of fit;
``cnnft-analyze`` over a folder of snapshots draws one grid per snapshot.

Files: ``figures/filter_viz_iter_XXXXXXX.png`` per iteration (also a W&B image),
``results/filter_viz.json|csv`` rows ``{iteration, figure}`` (figure path relative to the output
directory), and ``figures/training_curves.png`` (training loss and validation top-1 against
iteration, dotted lines at the drawn iterations) from the training run's ``csv/metrics.csv``: the
run directory's during training; with ``cnnft-analyze``, the one beside the checkpoint's
``checkpoints/`` or ``snapshots/`` folder (``<run>/csv/metrics.csv``). Where there is none, or it
holds no training curve (``checkpoint=random``, a state dict from elsewhere), the figure is left
out and the log says why. Logged keys: none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from cnnft.analysis import Analysis, AnalysisContext, save_figure, write_table
from cnnft.errors import ConfigError
from cnnft.models.tapped import submodule
from cnnft.plotting import filter_grid, pyplot, read_metrics_csv, show_filter_grid

log = logging.getLogger(__name__)

#: Keys of ``csv/metrics.csv`` drawn by :func:`plot_training_curves` (see ``cnnft.module``).
CURVE_KEYS = ("train/loss", "val/top1")


def figure_name(iteration: int) -> str:
    return f"filter_viz_iter_{iteration:07d}"


def plot_filter_grid(grid: torch.Tensor, title: str) -> Any:
    """One figure of a :func:`cnnft.plotting.filter_grid` image, about 6 inches on its long side."""
    height, width = grid.shape[1:]
    scale = 6.0 / max(height, width)
    fig, ax = pyplot().subplots(figsize=(max(width * scale, 2.0), max(height * scale, 2.0) + 0.4))
    show_filter_grid(ax, grid, title)
    return fig


def plot_training_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                         marks: Sequence[int] = ()) -> Any:
    """Training loss (left axis) and validation top-1 (right axis, %) against iteration, with
    dotted vertical lines at ``marks`` (the iterations whose filters are drawn)."""
    fig, ax = pyplot().subplots(figsize=(8, 3.2))
    handles = []
    if "train/loss" in curves:
        handles += ax.plot(*curves["train/loss"], color="tab:blue", lw=1.0, label="training loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    if "val/top1" in curves:
        right = ax.twinx()
        steps, top1 = curves["val/top1"]
        handles += right.plot(steps, 100 * top1, color="tab:red", marker="o", label="val top-1")
        right.set_ylabel("validation top-1 (%)")
    for mark in marks:
        ax.axvline(mark, color="grey", lw=0.8, ls=":")
    if handles:
        # above the axes: inside, it covered the curves' ends
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8,
                  frameon=False)
    ax.grid(alpha=0.3)
    return fig


def training_curves_figure(metrics_csv: str | os.PathLike[str], marks: Sequence[int] = ()) -> Any:
    """Fig. 5 (bottom) from a run's ``csv/metrics.csv``."""
    return plot_training_curves(read_metrics_csv(metrics_csv, CURVE_KEYS), marks)


class FilterViz(Analysis):
    """conv1 filter grids per iteration and the training curves (see module doc)."""

    name = "filter_viz"

    def __init__(self, *, layer: str = "conv1", padding: int = 1, at_snapshots: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(at_snapshots=at_snapshots, **kwargs)
        self.layer, self.padding = layer, padding

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        net = getattr(model, "net", model)
        module = submodule(net, self.layer)
        if not isinstance(module, nn.Conv2d):
            raise ConfigError(f"filter_viz layer={self.layer!r} is not a convolution of the network; "
                              "expected its first convolution (model.first_conv: conv1 in CaffeNet) "
                              "or another conv with 1 or 3 input channels")
        iteration = int(ctx.step or 0)
        grid = filter_grid(module.weight, padding=self.padding)
        fig = plot_filter_grid(grid, f"{self.layer} filters, iteration {iteration}")
        path = save_figure(ctx, fig, figure_name(iteration))
        self.history = [h for h in self.history if h["iteration"] != iteration]
        self.history.append({"iteration": iteration, "figure": str(path.resolve())})
        return {}

    def finalize(self, ctx: AnalysisContext) -> None:
        if not self.history:
            return
        root = ctx.output_dir.resolve()
        rows = [{"iteration": h["iteration"], "figure": os.path.relpath(h["figure"], root)}
                for h in sorted(self.history, key=lambda h: h["iteration"])]
        write_table(ctx, self.name, rows)
        target = ctx.output_dir / "figures" / "training_curves.png"
        metrics_csv = self.metrics_csv(ctx)
        curves = read_metrics_csv(metrics_csv, CURVE_KEYS) if metrics_csv is not None else {}
        if curves:
            save_figure(ctx, plot_training_curves(curves, [r["iteration"] for r in rows]),
                        "training_curves")
            return
        where = (f"{metrics_csv} has no {' or '.join(CURVE_KEYS)} values" if metrics_csv is not None
                 else f"no training run's csv/metrics.csv found for {ctx.checkpoint or ctx.output_dir}")
        log.info("filter_viz: %s; %s left out", where, target)
        target.unlink(missing_ok=True)  # never leave an earlier call's figure of other data

    @staticmethod
    def metrics_csv(ctx: AnalysisContext) -> Path | None:
        """The training run's ``csv/metrics.csv`` if there is one: the run directory's during
        training (CSV loggers flushed first), else the one beside the analysed checkpoint's
        ``checkpoints/`` or ``snapshots/`` folder."""
        if ctx.checkpoint is None:
            for logger in ctx.loggers:
                if isinstance(logger, CSVLogger):
                    logger.save()
            path = ctx.output_dir / "csv" / "metrics.csv"
        else:
            folder = Path(ctx.checkpoint).resolve().parent
            if folder.name not in ("checkpoints", "snapshots"):
                return None
            path = folder.parent / "csv" / "metrics.csv"
        return path if path.is_file() else None
