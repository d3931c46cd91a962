"""``data.skip_corrupt`` in the analyses: a truncated VOC JPEG is left out of probes, unit analyses
and detection (counted in each results JSON, labels kept aligned), or named in the error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cnnft.detection.pipeline
import cnnft.probing
from cnnft.analysis import AnalysisContext
from cnnft.analyze import analyze
from cnnft.data.voc import VOC_CLASSES, load_voc, read_class_labels
from cnnft.errors import CorruptImageError
from tests.conftest import TINY_DATA, compose_cfg

JOB = [*TINY_DATA, "checkpoint=random", "model.width=0.125", "model.input_size=67", "model.resize=76",
       "model.context_pad=5", "data.num_workers=0", "logger=csv", "progress=false", "batch_size=16",
       "probe.c_grid=[1.0]", "probe.folds=2", "data.generate_demo=false", "proposals.workers=1"]


def _victim(voc: Path) -> str:
    """A test image whose loss leaves every class a non-difficult positive (image and box level)."""
    ids, table = read_class_labels(voc, "test")
    images = load_voc(voc, "test")
    for i, im in enumerate(images):
        rest = [o for o in images if o is not im]
        boxes = np.zeros(len(VOC_CLASSES), int)
        for o in rest:
            np.add.at(boxes, o.labels[~o.difficult], 1)
        if ((np.delete(table, i, axis=0) == 1).sum(0) > 0).all() and (boxes > 0).all():
            return ids[i]
    raise AssertionError("no test image can be spared")


@pytest.fixture()
def broken_voc(data_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the tiny demo VOC with one test JPEG truncated to 400 bytes."""
    voc = tmp_path / "VOC2007"
    shutil.copytree(data_dir / "demo" / "VOC2007", voc)
    victim = _victim(voc)
    path = voc / "JPEGImages" / f"{victim}.jpg"
    path.write_bytes(path.read_bytes()[:400])
    return voc, victim


def _cfg(voc: Path, tmp_path: Path, data_dir: Path, *overrides: str, out: str = "out"):
    return compose_cfg([*JOB, f"data.voc_root={voc}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides],
                       tmp_path / out, data_dir, name="analyze")


def _summary(out: Path, name: str) -> dict:
    return json.loads((out / "results" / f"{name}.json").read_text())["summary"]


def test_probes_and_unit_analyses_leave_a_corrupt_image_out(broken_voc, data_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    voc, victim = broken_voc
    scored = []  # (rows scored, label rows) of every AP computed by the probes
    real_map = cnnft.probing.mean_average_precision

    def spy(scores, labels, **kw):
        scored.append((len(scores), len(labels)))
        return real_map(scores, labels, **kw)

    monkeypatch.setattr(cnnft.probing, "mean_average_precision", spy)
    analyses = "analyses=[probe_cls,probe_gtbox,filter_entropy,unit_selectivity]"
    with caplog.at_level("WARNING", logger="cnnft.analysis"):
        metrics = analyze(_cfg(voc, tmp_path, data_dir, analyses, "layers=[pool5]",
                               "data.skip_corrupt=true"))["random"]
    assert "probe_cls/pool5/mAP" in metrics and "probe_gtbox/pool5/mAP" in metrics
    out = tmp_path / "out"
    for name in ("probe_cls", "probe_gtbox", "filter_entropy"):  # they read the test split
        summary = _summary(out, name)
        assert summary["skipped_images"] == 1, name
        assert victim in summary["skipped_image_ids"]["test"]
    assert _summary(out, "unit_selectivity")["skipped_images"] == 0  # trainval only: none lost
    assert "leaving out 1 corrupt image(s) of split 'test'" in caplog.text and f"{victim}.jpg" in caplog.text
    # the probes scored 23 test images (of 24) and as many labels; gtbox: the victim's boxes gone
    test_images = load_voc(voc, "test")
    boxes = sum(len(im.labels) for im in test_images if im.image_id != victim)
    assert set(scored) == {(len(test_images) - 1,) * 2, (boxes,) * 2}
    # the label rows are the devkit's rows of the images kept, in order
    ctx = AnalysisContext.from_config({"data": {"voc_root": str(voc), "skip_corrupt": True},
                                       "model": {"input_size": 67, "context_pad": 5, "mean": [0, 0, 0]},
                                       "paths": {"cache_dir": str(tmp_path / "cache")}}, tmp_path, "m")
    split = cnnft.probing.image_split(ctx, "test")
    ids, table = read_class_labels(voc, "test")
    kept = [i for i, image_id in enumerate(ids) if image_id != victim]
    assert len(split.dataset) == len(kept) and np.array_equal(split.labels, table[kept] == 1)
    assert ctx.skipped == {"test": [victim]}


def test_probe_without_skip_corrupt_names_the_file(broken_voc, data_dir: Path, tmp_path: Path) -> None:
    voc, victim = broken_voc
    # in a DataLoader worker too: the file comes first, not deep in the worker's traceback
    with pytest.raises(CorruptImageError, match=rf"^cannot decode image {voc}/JPEGImages/{victim}\.jpg: "
                                                r".*\(VOC split 'test'\); data.skip_corrupt=true leaves"):
        analyze(_cfg(voc, tmp_path, data_dir, "analyses=[probe_gtbox]", "layers=[pool5]",
                     "data.num_workers=1"))
    assert not (tmp_path / "out" / "results" / "probe_gtbox.json").exists()


def test_detection_skips_a_corrupt_image(broken_voc, data_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Selective search and region features never see the broken image (skip_corrupt=true), or
    selective search names it (false)."""
    voc, victim = broken_voc
    job = ("analyses=[detection]", "layers=[pool5]", "recipe.detection.retrain_limit=300",
           "proposals.ks=[100]", "proposals.color_spaces=[hsv]", "analyses.detection.max_proposals=50")
    with pytest.raises(CorruptImageError, match=rf"{victim}\.jpg"):
        analyze(_cfg(voc, tmp_path, data_dir, *job, out="strict"))
    seen: dict[str, list[str]] = {}
    real = cnnft.detection.pipeline.split_regions

    def spy(images, split, **kw):
        seen[split] = [im.image_id for im in images]
        return real(images, split, **kw)

    monkeypatch.setattr(cnnft.detection.pipeline, "split_regions", spy)
    metrics = analyze(_cfg(voc, tmp_path, data_dir, *job, "data.skip_corrupt=true"))["random"]
    assert 0.0 <= metrics["detection/pool5/mAP"] <= 1.0
    assert len(seen["test"]) == len(load_voc(voc, "test")) - 1 and victim not in seen["test"]
    assert len(seen["trainval"]) == len(load_voc(voc, "trainval"))
    cached = {p.stem for p in (tmp_path / "cache" / "proposals").rglob("*") if p.is_file()}
    assert victim not in " ".join(cached) and any(i in " ".join(cached) for i in seen["test"])
    summary = _summary(tmp_path / "out", "detection")
    assert summary["skipped_images"] == 1
    assert summary["skipped_image_ids"] == {"trainval": [], "test": [victim]}
