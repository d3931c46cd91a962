"""The plotting helpers every figure uses: pyplot on the Agg backend, PNG writing, conv filter
grids, and Lightning's ``metrics.csv`` read into curves.

matplotlib is imported on first use (:func:`pyplot`), so importing an analysis stays cheap; this
is the one place that selects the Agg backend.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnft.errors import DataError
from cnnft.io import atomic_write

__all__ = ["filter_grid", "pyplot", "read_metrics_csv", "save_png", "show_filter_grid"]

#: Columns of a Lightning ``metrics.csv`` that are not metrics.
INDEX_COLUMNS = ("step", "epoch")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike[str], *, dpi: int) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically, tight bounding box) and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    pyplot().close(fig)
    return Path(path)


def filter_grid(weight: torch.Tensor, *, nrow: int | None = None, padding: int = 1) -> torch.Tensor:
    """``[3, H, W]`` image in [0, 1] of the filters ``weight[out, 1 or 3, kh, kw]``, each min-max
    normalised on its own (all its channels together), ``nrow`` per row (default: a square-ish
    grid), ``padding`` white pixels between and around them."""
    from torchvision.utils import make_grid

    if weight.dim() != 4 or weight.shape[1] not in (1, 3):
        raise ValueError(f"expected filters [out, 1 or 3, kh, kw] to draw as images, "
                         f"got {tuple(weight.shape)}")
    nrow = nrow or math.ceil(math.sqrt(weight.shape[0]))
    return make_grid(weight.detach().float().cpu(), nrow=nrow, padding=padding, normalize=True,
                     scale_each=True, pad_value=1.0)


def show_filter_grid(ax: Any, grid: torch.Tensor, title: str, *, fontsize: float = 10) -> None:
    """Draw a :func:`filter_grid` image on ``ax`` (pixels unsmoothed, no axis) with a title."""
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), interpolation="nearest",
              cmap="gray" if grid.shape[0] == 1 else None)
    ax.set_axis_off()
    ax.set_title(title, fontsize=fontsize)


def read_metrics_csv(path: str | os.PathLike[str], keys: Sequence[str] | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps, values)}`` from a Lightning ``metrics.csv`` (sparse rows; empty cells and
    rows without a step skipped, the last value of a step kept, sorted by step). ``keys``: the
    columns to read (default: every column but ``step`` and ``epoch``); keys absent from the file
    or without a value are left out."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file {path} does not exist; expected a run's csv/metrics.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "step" not in columns:
            raise DataError(f"{path} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
        wanted = [c for c in columns if c not in INDEX_COLUMNS] if keys is None else keys
        points: dict[str, dict[int, float]] = {k: {} for k in wanted if k in columns}
        for line, row in enumerate(reader, start=2):
            if row.get("step") in (None, ""):
                continue
            for key, series in points.items():
                if row.get(key) not in (None, ""):
                    try:
                        series[int(float(row["step"]))] = float(row[key])
                    except ValueError as e:
                        raise DataError(f"{path} line {line}: column {key!r} or 'step' is not a "
                                        f"number ({e})") from e
    return {key: (np.array(sorted(s), dtype=np.int64), np.array([s[i] for i in sorted(s)], dtype=np.float64))
            for key, s in points.items() if s}
