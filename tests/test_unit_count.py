"""Units needed per class: masked batched SVMs, a planted 3-unit class, the analysis end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.unit_count import clip_ks, unit_count_curves, units_needed
from cnnft.svm import SVMConfig, train_svms
from tests.svm_reference import sklearn_solver


def test_feature_mask_equals_training_on_the_subset() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] + x[:, 5] > 0, x[:, 2] > 0.5], 1)
    cfg = SVMConfig(dtype="float64", tol=1e-8, max_iter=200)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [0, 5, 6]] = True
    mask[1, [2]] = True
    W, b = train_svms(x, y, torch.tensor([0.1, 1.0]), cfg=cfg, feature_mask=mask)
    assert (W[~mask] == 0).all()
    for c in range(2):
        cols = torch.nonzero(mask[c]).squeeze(1)
        Ws, bs = train_svms(x[:, cols], y[:, c], [0.1, 1.0][c], cfg=cfg)
        torch.testing.assert_close(W[c, cols], Ws[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b[c], bs[0], atol=1e-6, rtol=1e-5)
    sk = SVMConfig(dtype="float64", tol=1e-8)
    Wk, bk = train_svms(x, y, torch.tensor([0.1, 1.0]), cfg=sk, feature_mask=mask,
                        solver=sklearn_solver(20000))
    torch.testing.assert_close(Wk, W, atol=1e-4, rtol=1e-3)


def _synthetic(n: int, seed: int, units: int = 40, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, classes, generator=g) < 0.3
    x = torch.rand(n, units, generator=g)
    x[:, :3] += 1.5 * y[:, :1]                     # class 0: units 0, 1, 2 only
    x[:, 3:20] += 0.4 * y[:, 1:2]                  # class 1: spread over 17 weak units
    x[:, 20:] += 0.2 * y[:, 2:3] * torch.rand(n, units - 20, generator=g)
    return x, y


def test_three_unit_class_needs_at_most_three_units() -> None:
    x, y = _synthetic(600, 0)
    xt, yt = _synthetic(600, 1)
    cfg = SVMConfig(c_grid=(0.1, 1.0, 10.0), folds=2)
    ks, ap, order = unit_count_curves(x, y, xt, yt, ks=[1, 2, 3, 5, 10, 20, 100], svm=cfg)
    assert ks == [1, 2, 3, 5, 10, 20, 40]
    assert ap.shape == (3, 7) and ((ap >= 0) & (ap <= 1)).all()
    assert set(order[0, :3].tolist()) == {0, 1, 2}
    needed = units_needed(ks, ap)
    assert needed[0, 1] <= 3 and needed[0, 0] <= needed[0, 1]
    assert needed[1, 1] > 3                        # the spread-out class needs more
    assert ap[0, -1] > 0.95


def test_units_needed_and_clip() -> None:
    ap = np.array([[0.1, 0.5, 0.95, 1.0], [0.6, 0.6, 0.6, 0.6]])
    assert units_needed([1, 2, 5, 8], ap).tolist() == [[2, 5], [1, 1]]
    assert clip_ks([1, 2, 3, 256, 2], 64) == [1, 2, 3, 64]
    with pytest.raises(ValueError, match="positive"):
        clip_ks([0, 3], 10)


def test_analyze_unit_count_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    from cnnft.analyze import analyze
    from cnnft.data.voc import VOC_CLASSES
    from tests.test_probes import analyze_cfg

    metrics = analyze(analyze_cfg(["checkpoint=random", "analyses=[unit_count]"], tmp_path,
                                  data_dir))["random"]
    rows = json.loads((tmp_path / "results" / "unit_count.json").read_text())["rows"]
    units = 32  # pool5 channels of the tiny net (width 0.125)
    ks = [k for k in (1, 2, 3, 5, 10, 15, 20, 25, 30) if k < units] + [units]
    assert [r["k"] for r in rows if r["class"] == "cat"] == ks
    assert len(rows) == 20 * len(ks) and all(0 <= r["ap"] <= 1 for r in rows)
    summary = json.loads((tmp_path / "results" / "unit_count_summary.json").read_text())["rows"]
    assert [r["class"] for r in summary] == list(VOC_CLASSES)
    for r in summary:
        assert r["k50"] <= r["k90"] <= units
        assert r["full_ap"] == pytest.approx(next(x["ap"] for x in rows if x["class"] == r["class"]
                                                  and x["k"] == units))
    assert metrics["unit_count/pool5/mean_k90"] == pytest.approx(np.mean([r["k90"] for r in summary]))
    assert (tmp_path / "figures" / "unit_count.png").stat().st_size > 1000
    # conf/analyses/unit_count.yaml runs the paper's Fig. 4 task (ground-truth boxes) and says so
    for name in ("unit_count", "unit_count_summary"):
        recorded = json.loads((tmp_path / "results" / f"{name}.json").read_text())["summary"]
        assert recorded["task"] == "gtbox" and recorded["layer"] == "pool5"


def test_unit_analyses_as_training_callbacks(tiny_cfg, tmp_path: Path) -> None:
    """All three analyses fire at the end of a tiny pretraining run and log their metrics."""
    from cnnft.train import train

    out = tmp_path / "run"
    train(tiny_cfg("analyses=[filter_entropy,unit_selectivity,unit_count]", "layers=[pool5]",
                   "probe.c_grid=[1.0]", "probe.folds=2", "analyses.filter_entropy.num_thresholds=10",
                   "analyses.unit_selectivity.num_thresholds=50", output_dir=out))
    for name in ("filter_entropy", "filter_entropy_topk", "unit_selectivity", "unit_count",
                 "unit_count_summary"):
        assert (out / "results" / f"{name}.json").exists(), name
    logged = (out / "csv" / "metrics.csv").read_text()
    for key in ("filter_entropy/pool5/mean_aue", "unit_selectivity/pool5/mean_best_precision",
                "unit_count/pool5/mean_k90"):
        assert key in logged
