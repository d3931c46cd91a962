"""Grandmother units: a planted class-specific unit is found; the analysis end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from analyses.unit_selectivity import best_units, selectivity_curves, unit_rows


def _planted(n: int = 400, units: int = 6, classes: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    maps = torch.rand(n, units, 2, 2, generator=g)
    maps[:, 3] *= 0.5
    maps[labels == 7, 3] += 1.0          # unit 3 fires strongly, everywhere, only for class 7
    return maps, labels


@pytest.mark.parametrize("mode", ["value", "rank"])
def test_planted_grandmother_unit_is_found(mode: str) -> None:
    maps, box_labels = _planted()
    rows_fn, units, positions = unit_rows(maps)
    labels = box_labels.repeat_interleave(positions)
    hits, kept, values = selectivity_curves(rows_fn, units, labels, 20, num_thresholds=1000,
                                            threshold_mode=mode)
    assert hits.shape == (6, 1000, 20) and kept.shape == values.shape == (6, 1000)
    assert int(kept[0, -1]) == labels.numel()                     # the last threshold keeps all
    counts = torch.bincount(labels, minlength=20)
    rows = best_units(hits, kept, counts, min_support=10, min_recall=0.5, top=3)
    top7 = [r for r in rows if r["class"] == 7]
    assert top7[0]["unit"] == 3 and top7[0]["rank"] == 1
    assert top7[0]["precision"] == pytest.approx(1.0)
    assert top7[0]["support"] == int(counts[7])                   # all of them, at precision 1
    others = [r for r in rows if r["class"] != 7 and r["rank"] == 1]
    assert max(r["precision"] for r in others) < 0.5


def test_support_requirement_and_definition() -> None:
    """One sample per unit-threshold check against direct counting."""
    acts = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    hits, kept, values = selectivity_curves(lambda s, e: acts[s:e], 1, labels, 2, num_thresholds=6,
                                            threshold_mode="rank")
    assert kept[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert hits[0, :, 1].tolist() == [1, 2, 2, 3, 3, 3]
    assert values[0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    counts = torch.tensor([3, 3])
    (r,) = [r for r in best_units(hits, kept, counts, min_support=3, min_recall=0.0) if r["class"] == 1]
    assert r["precision"] == pytest.approx(3 / 4) and r["support"] == 3 and r["threshold_index"] == 3
    (r,) = [r for r in best_units(hits, kept, counts, min_support=1, min_recall=0.0) if r["class"] == 1]
    assert r["precision"] == 1.0 and r["support"] == 2           # highest support among the ties


def test_analyze_unit_selectivity_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    from cnnft.analyze import analyze
    from cnnft.data.voc import VOC_CLASSES, load_voc
    from tests.test_probes import analyze_cfg

    metrics = analyze(analyze_cfg(["checkpoint=random", "analyses=[unit_selectivity]",
                                   "analyses.unit_selectivity.top=2",
                                   "analyses.unit_selectivity.min_support=2"], tmp_path, data_dir))["random"]
    payload = json.loads((tmp_path / "results" / "unit_selectivity.json").read_text())
    rows = payload["rows"]
    assert set(rows[0]) == {"class", "rank", "unit", "precision", "support", "threshold"}
    assert {r["class"] for r in rows} <= set(VOC_CLASSES) and len(rows) >= 2 * 15
    # support >= min_support, or all of the class's samples (one per box: pool5 is 1x1 here) for
    # a class rarer than that
    assert all(0 < r["precision"] <= 1 for r in rows)
    boxes = Counter(VOC_CLASSES[k] for im in load_voc(data_dir / "demo" / "VOC2007", "trainval")
                    for k in im.labels[~im.difficult])
    assert all(r["support"] >= 2 or r["support"] == boxes[r["class"]] for r in rows)
    assert any(r["support"] >= 2 for r in rows)
    firsts = [r["precision"] for r in rows if r["rank"] == 1]
    assert metrics["unit_selectivity/pool5/mean_best_precision"] == pytest.approx(sum(firsts) / len(firsts))
    assert (tmp_path / "figures" / "unit_selectivity.png").stat().st_size > 1000
