"""cnnft.plotting: the one Agg backend switch, PNG writing, filter grids and metrics.csv curves."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from cnnft.errors import DataError
from cnnft.plotting import filter_grid, pyplot, read_metrics_csv, save_png

ROOT = Path(__file__).resolve().parents[1]


def test_agg_backend_selected_in_one_place() -> None:
    sources = {str(p.relative_to(ROOT)): p.read_text()
               for p in [*ROOT.glob("cnnft/**/*.py"), *ROOT.glob("analyses/*.py")]}
    switches = [name for name, text in sources.items() if 'matplotlib.use("Agg")' in text]
    assert switches == ["cnnft/plotting.py"]
    assert pyplot().get_backend().lower() == "agg"


def test_save_png_writes_and_closes(tmp_path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "a" / "fig.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()


def test_figure5_tiles_conv1_with_filter_grid(tmp_path: Path) -> None:
    from cnnft.report.figures import _conv1_grid

    weight = torch.randn(10, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.save({"conv1.weight": weight}, tmp_path / "iter_0000010.ckpt")
    grid = _conv1_grid(tmp_path / "iter_0000010.ckpt")
    assert torch.equal(grid, filter_grid(weight))
    assert grid.shape == (3, 3 * 6 + 1, 4 * 6 + 1)  # 4 per row, 1-px white padding around each


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_read_metrics_csv_every_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", ["epoch", "step", "train/loss", "val/top1", "lr"],
                  [[0, 0, 3.0, "", 0.01], [0, "", 2.9, "", ""], [0, 1, 2.5, 0.2, ""], [0, 1, 2.4, "", ""]])
    curves = read_metrics_csv(path)
    assert sorted(curves) == ["lr", "train/loss", "val/top1"]  # step and epoch are no curves
    assert curves["train/loss"][0].tolist() == [0, 1] and curves["train/loss"][1].tolist() == [3.0, 2.4]
    assert curves["val/top1"][1].tolist() == [0.2]
    bad = _write(tmp_path / "bad.csv", ["step", "train/loss"], [[0, 3.0], [1, "nan?"]])
    with pytest.raises(DataError, match=r"bad\.csv line 3: column 'train/loss'"):
        read_metrics_csv(bad)


def test_report_reads_curves_with_the_same_parser(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cnnft.report.load import read_curves

    (tmp_path / "csv").mkdir()
    _write(tmp_path / "csv" / "metrics.csv", ["epoch", "step", "train/loss"], [[0, 2, 1.5], [0, 1, 2.0]])
    curves = read_curves(tmp_path)
    assert list(curves) == ["train/loss"] and curves["train/loss"][0].tolist() == [1, 2]
    _write(tmp_path / "csv" / "metrics.csv", ["step", "train/loss"], [[1, "x"]])
    with caplog.at_level(logging.WARNING):
        assert read_curves(tmp_path) == {}
    assert "training curves left out" in caplog.text and "metrics.csv line 2" in caplog.text
    assert read_curves(tmp_path / "nowhere") == {}
