"""Paired bootstrap over test images: the weighted AP equals AP on repeated items, the vectorised
resampling equals a plain loop, the score files round-trip, and the report's margin table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnft.bootstrap import (
    ClassRanking,
    paired_bootstrap,
    probe_rankings,
    resample_counts,
    resampled_map,
    weighted_ap,
)
from cnnft.detection.evaluation import detection_average_precision, match_class
from cnnft.errors import DataError
from cnnft.metrics import average_precision
from cnnft.scores import DetectionScores, ProbeScores, load_arrays, save_arrays, scores_path


def _probe_data(seed: int, n: int = 60, classes: int = 4, boxes_per_image: int = 1):
    """Items grouped by image (``boxes_per_image`` each), scores rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    items = n * boxes_per_image
    labels = rng.random((items, classes)) < 0.25
    labels[:classes, :] = np.eye(classes, dtype=bool)  # every class has a positive
    ignore = (rng.random((items, classes)) < 0.1) & ~np.eye(items, classes, dtype=bool)
    scores = (labels * 0.8 + rng.normal(size=(items, classes))).round(1)
    return scores, labels, ignore, np.repeat(np.arange(n), boxes_per_image)


def _loop_ap(scores, labels, ignore, image_index, counts, c: int, mode: str = "voc07") -> float:
    """AP of class ``c`` on the items of each image repeated ``counts[image]`` times."""
    rows = np.concatenate([np.flatnonzero(image_index == i).repeat(k) for i, k in enumerate(counts)])
    try:
        return average_precision(scores[rows, c], labels[rows, c], difficult=ignore[rows, c], mode=mode)
    except ValueError:  # no positive drawn
        return float("nan")


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_identity_resample_is_average_precision(mode: str) -> None:
    scores, labels, ignore, index = _probe_data(0)
    rankings = probe_rankings(scores, labels, ignore, index, 60)
    ones = np.ones((1, 60), dtype=int)
    for c, r in enumerate(rankings):
        want = average_precision(scores[:, c], labels[:, c], difficult=ignore[:, c], mode=mode)
        assert weighted_ap(r, ones, mode=mode)[0] == pytest.approx(want, abs=1e-12)


def test_hand_computed_resample() -> None:
    # images 0, 1, 2 with one item each: scores .9 (neg), .5 (pos), .1 (pos)
    r = ClassRanking(np.array([0.9, 0.5, 0.1]), np.array([False, True, True]), np.arange(3),
                     np.array([0, 1, 1]))
    # image 0 twice, image 2 once: ranking neg, neg (tied), pos -> precision 1/3 at recall 1
    assert weighted_ap(r, np.array([[2, 0, 1]]))[0] == pytest.approx(1 / 3)
    # identity: (r .5, p .5), (r 1, p 2/3) -> 11-point: 11 * 2/3 / 11
    assert weighted_ap(r, np.array([[1, 1, 1]]))[0] == pytest.approx(2 / 3)
    # image 0 only: no positive, AP undefined
    assert np.isnan(weighted_ap(r, np.array([[3, 0, 0]]))[0])


@pytest.mark.parametrize("boxes_per_image", [1, 3])
def test_vectorised_resamples_equal_a_plain_loop(boxes_per_image: int) -> None:
    """Image classification (1 item per image) and GT boxes (3 per image, resampled together)."""
    scores, labels, ignore, index = _probe_data(1, n=40, boxes_per_image=boxes_per_image)
    counts = resample_counts(40, 25, seed=3)
    got = resampled_map(probe_rankings(scores, labels, ignore, index, 40), counts)
    want = np.array([[_loop_ap(scores, labels, ignore, index, row, c) for c in range(4)] for row in counts])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert not np.isnan(want).all()


def test_resample_counts_are_seeded_draws_with_replacement() -> None:
    counts = resample_counts(50, 200, seed=7)
    assert counts.shape == (200, 50) and (counts.sum(1) == 50).all()
    np.testing.assert_array_equal(counts, resample_counts(50, 200, seed=7))
    assert not np.array_equal(counts, resample_counts(50, 200, seed=8))
    assert 0.3 < (counts == 0).mean() < 0.43  # (1 - 1/50)^50 = 0.364 of images left out
    with pytest.raises(ValueError, match="num_images >= 1"):
        resample_counts(0, 10)


def test_paired_bootstrap_equals_a_loop_over_resamples() -> None:
    scores, labels, ignore, index = _probe_data(2, n=50, boxes_per_image=2)
    rng = np.random.default_rng(5)
    worse = scores + rng.normal(scale=1.5, size=scores.shape)
    a = probe_rankings(scores, labels, ignore, index, 50)
    b = probe_rankings(worse, labels, ignore, index, 50)
    m = paired_bootstrap(a, b, num_images=50, samples=60, seed=11)
    margins = []
    for row in resample_counts(50, 60, seed=11):
        ap_a = [_loop_ap(scores, labels, ignore, index, row, c) for c in range(4)]
        ap_b = [_loop_ap(worse, labels, ignore, index, row, c) for c in range(4)]
        margins.append(np.nanmean(ap_a) - np.nanmean(ap_b))
    assert (m.low, m.high) == pytest.approx(tuple(np.percentile(margins, [2.5, 97.5])), abs=1e-12)
    full = [np.mean([average_precision(s[:, c], labels[:, c], difficult=ignore[:, c]) for c in range(4)])
            for s in (scores, worse)]
    assert (m.map_a, m.map_b) == pytest.approx(tuple(full), abs=1e-12)
    assert m.margin == pytest.approx(full[0] - full[1]) and m.low < m.margin < m.high
    same = paired_bootstrap(a, a, num_images=50, samples=30)
    assert (same.margin, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_refuses_mismatched_inputs() -> None:
    scores, labels, ignore, index = _probe_data(0)
    a = probe_rankings(scores, labels, ignore, index, 60)
    with pytest.raises(ValueError, match="same classes for both networks, got 4 and 3"):
        paired_bootstrap(a, a[:3], num_images=60)
    with pytest.raises(ValueError, match="counts positives of 60 images, expected 61"):
        paired_bootstrap(a, a, num_images=61)


def _detections(seed: int, n: int = 30, classes: int = 3):
    """Per class, per image: detections (boxes, scores) and ground truth (boxes, difficult)."""
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(classes):
        d_cls, g_cls = [], []
        for _ in range(n):
            m = rng.integers(0, 3)
            gt = np.array([[10 * j, 0, 10 * j + 8, 8] for j in range(m)], dtype=float)
            difficult = rng.random(m) < 0.2
            k = rng.integers(0, 5)
            boxes = np.array([[10 * j + rng.integers(0, 4), 0, 10 * j + 8, 8] for j in rng.integers(0, 3, k)],
                             dtype=float).reshape(-1, 4)
            d_cls.append((boxes, rng.normal(size=k).round(1)))
            g_cls.append((gt, difficult))
        dets.append(d_cls)
        gts.append(g_cls)
    return dets, gts


def test_detection_resamples_equal_the_devkit_ap_on_repeated_images() -> None:
    dets, gts = _detections(4)
    matched = [match_class(d, g) for d, g in zip(dets, gts)]
    store = DetectionScores()
    store.add("pool5/unroll", [f"im{i}" for i in range(30)], matched)
    rankings = store.rankings("pool5/unroll")
    ones = np.ones((1, 30), dtype=int)
    for k in range(3):
        want = detection_average_precision(dets[k], gts[k])
        assert weighted_ap(rankings[k], ones)[0] == pytest.approx(want, abs=1e-7)  # float32 scores
    for row in resample_counts(30, 15, seed=2):
        images = np.repeat(np.arange(30), row)
        for k in range(3):
            try:
                want = detection_average_precision([dets[k][i] for i in images], [gts[k][i] for i in images])
            except ValueError:
                want = float("nan")
            assert weighted_ap(rankings[k], row[None])[0] == pytest.approx(want, abs=1e-7, nan_ok=True)


def test_score_files_round_trip(tmp_path: Path) -> None:
    scores, labels, ignore, index = _probe_data(0, n=10, boxes_per_image=2)
    probe = ProbeScores([f"im{i}" for i in range(10)], index, labels, ignore, {"pool5/unroll": scores})
    path = save_arrays(scores_path(tmp_path, "probe_gtbox"), probe.arrays())
    assert path.name == "probe_gtbox_scores.npz" and not list(tmp_path.glob(".*tmp"))
    back = ProbeScores.from_arrays(load_arrays(path))
    assert back.image_ids == probe.image_ids and back.scores["pool5/unroll"].dtype == np.float32
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_array_equal(back.image_index, index)
    dets, gts = _detections(1, n=5)
    store = DetectionScores()
    store.add("relu7/unroll", list("abcde"), [match_class(d, g) for d, g in zip(dets, gts)])
    again = DetectionScores.from_arrays(load_arrays(save_arrays(tmp_path / "d.npz", store.arrays())))
    assert again.image_ids == list("abcde") and again.positives.shape == (5, 3)
    for f in ("score", "tp", "image", "cls"):
        np.testing.assert_array_equal(again.detections["relu7/unroll"][f],
                                      store.detections["relu7/unroll"][f])
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"cannot read score file .*bad\.npz"):
        load_arrays(tmp_path / "bad.npz")
    with pytest.raises(DataError, match=r"no probe scores 'relu7/unroll'; saved: \['pool5/unroll'\]"):
        back.rankings("relu7/unroll")


def assert_scores_match_results(results: Path, name: str) -> None:
    """The score file of analysis ``name`` gives every mAP its results JSON holds (VOC07)."""
    rows = json.loads((results / f"{name}.json").read_text())["rows"]
    arrays = load_arrays(scores_path(results, name))
    store = DetectionScores.from_arrays(arrays) if name == "detection" else ProbeScores.from_arrays(arrays)
    means = {f"{r['layer']}/{r['ablation']}": r["ap"] for r in rows if r["class"] == "mAP"}
    assert means and set(means) == set(store.detections if name == "detection" else store.scores)
    ones = np.ones((1, len(store.image_ids)), dtype=int)
    for key, want in means.items():
        assert resampled_map(store.rankings(key), ones).mean() == pytest.approx(want, abs=1e-6), key


# ------------------------------------------------------------------ the report


def _fake_probe(folder: Path, name: str, layers_scores: dict[str, np.ndarray], labels, ignore, index,
                ids) -> None:
    probe = ProbeScores(ids, index, labels, ignore, layers_scores)
    save_arrays(scores_path(folder / "results", name), probe.arrays())
    rows = [{"layer": k.split("/")[0], "ablation": "unroll", "class": "mAP",
             "ap": float(resampled_map(probe.rankings(k), np.ones((1, len(ids)), int)).mean())}
            for k in layers_scores]
    (folder / "results" / f"{name}.json").write_text(json.dumps({"rows": rows}))


@pytest.fixture()
def margin_root(tmp_path: Path) -> Path:
    """pretrained, random and control scores of image and GT-box classification and detection."""
    from cnnft.data.voc import VOC_CLASSES

    rng = np.random.default_rng(0)
    n, ids, c = 40, [f"{i:06d}" for i in range(40)], len(VOC_CLASSES)
    root, control_arrays = tmp_path / "root", {}
    for task, per_image in (("probe_cls", 1), ("probe_gtbox", 2)):
        index = np.repeat(np.arange(n), per_image)
        labels = np.zeros((len(index), c), bool)
        labels[np.arange(len(index)), np.arange(len(index)) % c] = True
        ignore = np.zeros_like(labels)
        ignore[5, 5] = True
        good = labels + rng.normal(scale=0.3, size=labels.shape)
        noise = {k: rng.normal(size=labels.shape) for k in ("a", "b", "c", "d", "e")}
        _fake_probe(root / "analyze" / "pretrained", task, {"pool5/unroll": good, "relu7/unroll": good},
                    labels, ignore, index, ids)
        _fake_probe(root / "analyze" / "random", task,
                    {"pool5/unroll": noise["a"], "relu7/unroll": good}, labels, ignore, index, ids)
        control = ProbeScores(ids, index, labels, ignore, {
            "colour": noise["b"], "gradient": labels + noise["c"], "colour+gradient": noise["d"]})
        control_arrays.update(control.arrays(f"{task.split('_')[1]}/"))  # cls/..., gtbox/...
    save_arrays(scores_path(root / "analyze" / "control" / "results", "lowlevel_control"), control_arrays)
    (root / "analyze" / "control" / "results" / "lowlevel_control.json").write_text(json.dumps({"rows": []}))
    return root


def test_margin_rows_and_the_rendered_table(margin_root: Path, tmp_path: Path) -> None:
    from cnnft.report.build import baselines_md
    from cnnft.report.load import load_results
    from cnnft.report.margins import margin_rows, write_margins

    res = load_results([margin_root])
    assert sorted(res.scores["pretrained"]) == ["probe_cls", "probe_gtbox"]
    rows = margin_rows(res, samples=200)
    by = {(r["task"], r["layer"], r["baseline"]): r for r in rows}
    assert len(rows) == 8  # 2 tasks x (random pool5, random relu7, control) + detection x 2
    # the same number as a direct paired bootstrap on the saved scores
    pre = ProbeScores.from_arrays(load_arrays(res.scores["pretrained"]["probe_gtbox"]))
    rnd = ProbeScores.from_arrays(load_arrays(res.scores["random"]["probe_gtbox"]))
    m = paired_bootstrap(pre.rankings("pool5/unroll"), rnd.rankings("pool5/unroll"), num_images=40,
                         samples=200, seed=0)
    row = by[("GT-box classification", "pool5", "random init")]
    want = (100 * m.margin, 100 * m.low, 100 * m.high)
    assert (row["margin"], row["low"], row["high"]) == pytest.approx(want)
    assert row["holds"] is True and row["low"] > 0 and row["margin"] >= 5
    # relu7: the "random" network has the pretrained scores: margin 0, criterion fails
    same = by[("image classification", "relu7", "random init")]
    assert (same["margin"], same["low"], same["high"], same["holds"]) == (0.0, 0.0, 0.0, False)
    # the control's strongest feature set (gradient) is the baseline
    ctrl = by[("image classification", "pool5", "low-level control: gradient histograms")]
    assert ctrl["pretrained_map"] > ctrl["baseline_map"] > 20 and ctrl["holds"] is not None
    det = by[("detection", "pool5", "random init")]
    assert det["holds"] is None and det["note"] == "no detection score file for alex-net"
    md = baselines_md(res, rows)
    assert "### The margin over each baseline, with a bootstrap 95% interval" in md
    assert (f"| GT-box classification | pool5 | random init | {row['pretrained_map']:.1f} | "
            f"{row['baseline_map']:.1f} | {row['margin']:+.1f} | [{row['low']:.1f}, {row['high']:.1f}] | "
            f"**yes** ({row['note']}) |") in md
    assert row["note"].endswith("resample(s) left a class without a positive")
    assert "| image classification | relu7 | random init | " in md and "| +0.0 | [0.0, 0.0] | **no** (" in md
    assert "over 200 paired resamples of the test images" in md
    assert ("| detection | pool5 | random init | n/a | n/a | n/a | n/a | "
            "n/a (no detection score file for alex-net) |") in md
    assert "margin >= 5 mAP points and the lower bound of the bootstrap 95% interval > 0" in md
    path = write_margins(rows, tmp_path / "tables", samples=200)
    saved = json.loads(path.read_text())
    assert saved["samples"] == 200 and saved["min_margin_points"] == 5.0 and len(saved["rows"]) == 8
    assert saved["rows"][0]["task"] == "image classification"
    lines = (tmp_path / "tables" / "baseline_margins.csv").read_text().splitlines()
    assert lines[0] == "task,layer,baseline,pretrained_map,baseline_map,margin,low,high,holds,samples,note"
    assert len(lines) == 9


def test_unpaired_score_files_are_named(margin_root: Path) -> None:
    from cnnft.report.load import load_results
    from cnnft.report.margins import margin_rows

    path = margin_root / "analyze" / "random" / "results" / "probe_cls_scores.npz"
    arrays = load_arrays(path)
    arrays["image_ids"] = arrays["image_ids"][::-1].copy()
    save_arrays(path, arrays)
    rows = margin_rows(load_results([margin_root]), samples=20)
    row = next(r for r in rows if r["task"] == "image classification" and r["baseline"] == "random init")
    assert row["holds"] is None and row["note"] == "not paired: different test images (40 vs 40)"


def test_build_report_writes_the_margins(margin_root: Path, tmp_path: Path) -> None:
    from cnnft.report import build_report

    md = build_report([margin_root], tmp_path / "report").read_text()
    saved = json.loads((tmp_path / "report" / "tables" / "baseline_margins.json").read_text())
    assert saved["samples"] == 1000 and saved["criterion"] == (
        "margin >= 5 mAP points and the lower bound of the bootstrap 95% interval > 0")
    held = [(r["task"], r["layer"], r["baseline"]) for r in saved["rows"] if r["holds"]]
    assert held == [("image classification", "pool5", "random init"),
                    ("image classification", "pool5", "low-level control: gradient histograms"),
                    ("GT-box classification", "pool5", "random init"),
                    ("GT-box classification", "pool5", "low-level control: gradient histograms")]
    section = md[md.index("## Baselines: what pretraining adds"):md.index("## Tables")]
    assert "over 1000 paired resamples of the test images" in section
    assert section.count("| **yes** (") == 4 and section.count("| **no** (") == 2
