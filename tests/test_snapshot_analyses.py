"""snapshot_eval and filter_viz: pure functions, firing at snapshots, a resumed training run and
cnnft-analyze over its snapshots (which must agree with what training found)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from analyses.filter_viz import plot_training_curves
from analyses.snapshot_eval import ITERATION_KEY, SnapshotEval, plot_snapshot_eval, snapshot_table
from cnnft.analysis import Analysis, define_step_axis
from cnnft.analyze import analyze
from cnnft.callbacks import IterationSnapshots
from cnnft.errors import ConfigError, DataError
from cnnft.plotting import filter_grid, read_metrics_csv
from cnnft.train import train
from tests.conftest import TINY_DATA, TINY_RUN, compose_cfg

FAST_PROBE = ["layers=[pool5,relu7]", "probe.c_grid=[1.0]", "probe.folds=2"]


# ---------------------------------------------------------------------- pure functions


def test_snapshot_table_fraction_of_final() -> None:
    history = [{"iteration": it, "layer": layer, "map": m} for it, layer, m in [
        (30, "pool5", 0.6), (10, "pool5", 0.3), (10, "fc7", 0.2), (30, "fc7", 0.0), (20, "pool5", 0.45)]]
    rows = snapshot_table(history)
    assert [(r["layer"], r["iteration"]) for r in rows] == [
        ("pool5", 10), ("pool5", 20), ("pool5", 30), ("fc7", 10), ("fc7", 30)]
    assert [r["fraction_of_final"] for r in rows[:3]] == pytest.approx([0.5, 0.75, 1.0])
    assert [r["fraction_of_final"] for r in rows[3:]] == [None, None]  # final mAP 0: undefined
    fig = plot_snapshot_eval(rows)
    left, right = fig.axes
    assert len(left.lines) == 2 and len(right.lines) == 1 + 1  # fc7 has no fractions; + the 1.0 line


def test_snapshot_eval_plain_features_only() -> None:
    with pytest.raises(ConfigError, match="unroll"):
        SnapshotEval(ablations={"shuffle": None})


def test_define_step_axis_on_wandb_only() -> None:
    calls: list[tuple[Any, ...]] = []
    run = SimpleNamespace(define_metric=lambda *a, **k: calls.append((a, k)))
    define_step_axis([WandbLogger(experiment=run), SimpleNamespace()], "snapshot_eval", ITERATION_KEY)
    assert calls == [((ITERATION_KEY,), {}),
                     (("snapshot_eval/*",), {"step_metric": ITERATION_KEY, "step_sync": True})]


def test_filter_grid_normalises_each_filter() -> None:
    weight = torch.randn(12, 3, 11, 11)
    weight[0] *= 1000.0  # a large filter does not wash out the others
    weight[1] = 0.0      # a constant filter stays finite
    grid = filter_grid(weight, nrow=4, padding=1)
    assert grid.shape == (3, 3 * 12 + 1, 4 * 12 + 1)
    for i in (0, 2):
        row, col = divmod(i, 4)
        tile = grid[:, 1 + 12 * row:12 + 12 * row, 1 + 12 * col:12 + 12 * col]
        assert tile.min() == pytest.approx(0.0) and tile.max() == pytest.approx(1.0)
    assert torch.isfinite(grid).all()
    with pytest.raises(ValueError, match=r"\[out, 1 or 3, kh, kw\]"):
        filter_grid(torch.randn(8, 16, 3, 3))


def test_read_metrics_csv_sparse_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    rows = [{"step": 0, "train/loss": 3.0}, {"step": 1, "train/loss": 2.5}, {"step": 1, "val/top1": 0.2},
            {"step": 1, "train/loss": 2.4}, {"step": 3, "val/top1": 0.4}, {"step": 2, "train/loss": 2.0}]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "val/top1"])
        writer.writeheader()
        writer.writerows(rows)
    curves = read_metrics_csv(path, keys=("train/loss", "val/top1", "val/top5"))
    assert set(curves) == {"train/loss", "val/top1"}
    assert curves["train/loss"][0].tolist() == [0, 1, 2]
    assert curves["train/loss"][1].tolist() == [3.0, 2.4, 2.0]  # the last value of a step wins
    assert curves["val/top1"][0].tolist() == [1, 3]
    fig = plot_training_curves(curves, marks=[1, 3])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1 + 2
    with pytest.raises(DataError, match="nowhere.csv"):
        read_metrics_csv(tmp_path / "nowhere.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="bad.csv.*'step'"):
        read_metrics_csv(tmp_path / "bad.csv")


class _Recorder(Analysis):
    name = "recorder"


def test_fires_at_snapshot_iterations_once_per_step(tmp_path: Path) -> None:
    """On a non-zero rank nothing runs, but the firing decisions (runs, last_step) are the same."""
    trainer = SimpleNamespace(callbacks=[IterationSnapshots([4, 2], tmp_path)], is_global_zero=False,
                              sanity_checking=False, global_step=0,
                              strategy=SimpleNamespace(barrier=lambda *a: None))
    analysis = _Recorder(at_snapshots=True, at_fit_end=True)
    analysis.setup(trainer, None, "fit")
    fired = []
    for step in range(1, 6):
        trainer.global_step = step
        runs = analysis.runs
        analysis.on_train_batch_end(trainer, None)
        if analysis.runs > runs:
            fired.append(step)
    assert fired == [2, 4]
    analysis.on_fit_end(trainer, None)
    assert (analysis.runs, analysis.last_step) == (3, 5)
    analysis.on_fit_end(trainer, None)  # the same step again: no second run
    assert analysis.runs == 3
    quiet = _Recorder(at_snapshots=False)
    quiet.setup(trainer, None, "fit")
    trainer.global_step = 2
    quiet.on_train_batch_end(trainer, None)
    assert quiet.runs == 0


# ---------------------------------------------------------------------- end to end


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Pretraining with both analyses: 4 steps, then resumed to 6 (snapshots at 2, 4, 6)."""
    out = tmp_path_factory.mktemp("snap") / "run"
    base = [*TINY_RUN, *FAST_PROBE, "analyses=[snapshot_eval,filter_viz]", "checkpoint_every=2"]
    train(compose_cfg([*base, "trainer.max_steps=4"], out, data_dir))
    train(compose_cfg([*base, "resume=auto"], out, data_dir))
    return out


def test_snapshot_eval_during_training_keeps_rows_across_resume(resumed_run: Path) -> None:
    rows = _rows(resumed_run / "results" / "snapshot_eval.json")
    assert [(r["layer"], r["iteration"]) for r in rows] == [
        (layer, it) for layer in ("pool5", "relu7") for it in (2, 4, 6)]
    for r in rows:
        assert 0.0 <= r["map"] <= 1.0
        final = next(f["map"] for f in rows if f["layer"] == r["layer"] and f["iteration"] == 6)
        assert r["fraction_of_final"] == pytest.approx(r["map"] / final)
    summary = json.loads((resumed_run / "results" / "snapshot_eval.json").read_text())["summary"]
    assert summary[ITERATION_KEY] == 6 and summary["snapshot_eval/pool5/mAP"] == rows[2]["map"]
    with (resumed_run / "csv" / "metrics.csv").open() as f:
        logged = [r for r in csv.DictReader(f) if r.get(ITERATION_KEY)]
    assert logged and all(int(float(r[ITERATION_KEY])) == int(r["step"]) for r in logged)
    assert (resumed_run / "figures" / "snapshot_eval.png").stat().st_size > 1000


def test_filter_viz_during_training(resumed_run: Path) -> None:
    rows = _rows(resumed_run / "results" / "filter_viz.json")
    assert rows == [{"iteration": i, "figure": f"figures/filter_viz_iter_{i:07d}.png"} for i in (2, 4, 6)]
    for r in rows:
        assert (resumed_run / r["figure"]).stat().st_size > 1000
    assert (resumed_run / "figures" / "training_curves.png").stat().st_size > 1000


def test_analyze_snapshots_matches_training(resumed_run: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY_DATA, "model.width=0.125", "model.input_size=67", "model.resize=76",
                       "model.context_pad=5", "data.num_workers=0", "logger=csv", "progress=false",
                       "batch_size=16", *FAST_PROBE, f"checkpoint={resumed_run / 'snapshots'}",
                       "analyses=[snapshot_eval,filter_viz]"], tmp_path, data_dir, name="analyze")
    results = analyze(cfg)
    assert len(results) == 3
    during, after = (
        {(r["layer"], r["iteration"]): r["map"] for r in _rows(run / "results" / "snapshot_eval.json")}
        for run in (resumed_run, tmp_path))
    # same weights, same probe; on a GPU, cuDNN's TF32 convolutions differ by batch size (~1e-3)
    assert after == pytest.approx(during, abs=0.01 if torch.cuda.is_available() else 1e-6)
    figures = _rows(tmp_path / "results" / "filter_viz.json")
    assert [r["figure"] for r in figures] == [
        f"iter_{i:07d}/figures/filter_viz_iter_{i:07d}.png" for i in (2, 4, 6)]
    assert all((tmp_path / r["figure"]).is_file() for r in figures)
    # the training run's metrics.csv is found from the checkpoints' run directory
    assert (tmp_path / "figures" / "training_curves.png").is_file()
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get(ITERATION_KEY)]
    assert steps == [2, 4, 6]
