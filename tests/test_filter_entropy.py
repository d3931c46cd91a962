"""Area under the entropy curve against a plain loop and on planted filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyses.filter_entropy import area_under_entropy


def _entropy(labels: np.ndarray, num_classes: int) -> float:
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def loop_aue(acts: np.ndarray, labels: np.ndarray, num_classes: int, t: int, mode: str) -> np.ndarray:
    """The definition, one filter and one threshold at a time."""
    n, f = acts.shape
    out = np.zeros(f)
    for k in range(f):
        a = acts[:, k]
        order = sorted(range(n), key=lambda i: (-a[i], i))  # descending, ties by sample order
        hs = []
        for j in range(1, t + 1):
            if mode == "rank":
                kept = order[: math.ceil(j * n / t)]
            else:
                thr = a.max() - j * (a.max() - a.min()) / t
                kept = [i for i in range(n) if a[i] >= thr - 1e-12]
            hs.append(_entropy(labels[kept], num_classes))
        out[k] = np.mean(hs)
    return out


@pytest.mark.parametrize("mode", ["rank", "value"])
def test_matches_plain_loop(mode: str) -> None:
    rng = np.random.default_rng(0)
    acts = rng.random((203, 7))
    acts[:, 3] = np.round(acts[:, 3] * 4)  # ties
    labels = rng.integers(0, 5, 203)
    got = area_under_entropy(torch.from_numpy(acts), torch.from_numpy(labels), 5, num_thresholds=17,
                             threshold_mode=mode)
    np.testing.assert_allclose(got.numpy(), loop_aue(acts, labels, 5, 17, mode), atol=1e-6)


def test_selective_filter_low_and_random_filter_at_prior() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, 20000)
    selective = (labels == 3).astype(float) + 0.01 * rng.random(20000)
    random = rng.random(20000)
    acts = torch.from_numpy(np.stack([selective, random], 1))
    prior = _entropy(labels, 20)
    value = area_under_entropy(acts, torch.from_numpy(labels), 20, threshold_mode="value")
    assert value[0] < 0.1 and abs(value[1] - prior) < 0.05
    rank = area_under_entropy(acts, torch.from_numpy(labels), 20)
    assert rank[0] < rank[1] - 0.1 and abs(rank[1] - prior) < 0.05


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="threshold_mode"):
        area_under_entropy(torch.rand(4, 2), torch.zeros(4), 2, threshold_mode="quantile")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        area_under_entropy(torch.rand(4, 2), torch.tensor([0, 1, 2, 0]), 2)


def test_float32_ties_and_large_n_match_loop_in_rank_mode() -> None:
    """Many exact ties (ReLU zeros, negative values, -0.0) and chunking across threads."""
    rng = np.random.default_rng(3)
    acts = np.maximum(rng.standard_normal((997, 37)), -0.5).astype(np.float32)
    acts[:50, 0] = -0.0
    labels = rng.integers(0, 20, 997)
    got = area_under_entropy(torch.from_numpy(acts), torch.from_numpy(labels), 20, num_thresholds=13)
    np.testing.assert_allclose(got.numpy(), loop_aue(acts.astype(np.float64), labels, 20, 13, "rank"),
                               atol=1e-6)


def test_layer_aue_positions_and_spatial_max() -> None:
    from analyses.filter_entropy import layer_aue

    rng = np.random.default_rng(4)
    maps = torch.from_numpy(rng.random((40, 3, 2, 2)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, 40))
    per_position = maps.permute(0, 2, 3, 1).reshape(-1, 3)  # box-major, then position
    expected = area_under_entropy(per_position, labels.repeat_interleave(4), 4)
    torch.testing.assert_close(layer_aue(maps, labels, 4), expected)
    torch.testing.assert_close(layer_aue(maps, labels, 4, spatial_max=True),
                               area_under_entropy(maps.amax(dim=(2, 3)), labels, 4))


def test_topk_curve_and_compare() -> None:
    from analyses.filter_entropy import compare_aue, topk_curve, topk_points

    assert topk_points(256)[0] == 1 and topk_points(256)[-1] == 256 and len(topk_points(256)) == 30
    assert topk_points(5) == [1, 2, 3, 4, 5]
    curve = dict(topk_curve(torch.tensor([3.0, 1.0, 2.0, 4.0]), points=4))
    assert curve == {1: 1.0, 2: 1.5, 3: 2.0, 4: 2.5}
    a = {"rows": [{"layer": "pool5", "filter": i, "aue": v} for i, v in enumerate([2.0, 3.0])]
         + [{"layer": "relu7", "filter": 0, "aue": 4.0}]}
    b = [{"layer": "pool5", "filter": i, "aue": v} for i, v in enumerate([1.0, 2.0])]
    (row,) = compare_aue(a, b)
    assert row["layer"] == "pool5" and row["change"] == pytest.approx(-1.0)
    assert row["mean_aue_a"] == pytest.approx(2.5) and row["relative_change"] == pytest.approx(-0.4)
    from cnnft.errors import DataError

    with pytest.raises(DataError, match="filter_entropy results"):
        compare_aue({"rows": [{"class": "x"}]}, b)


def test_analyze_filter_entropy_end_to_end(data_dir, tmp_path) -> None:
    """cnnft-analyze on the tiny demo set: files, numbers, and the comparison with a reference."""
    import json

    from cnnft.analyze import analyze
    from tests.test_probes import analyze_cfg

    over = ["checkpoint=random", "analyses=[filter_entropy]", "layers=[pool2,pool5,relu7]",
            "analyses.filter_entropy.num_thresholds=20"]
    metrics = analyze(analyze_cfg(over, tmp_path / "a", data_dir))["random"]
    payload = json.loads((tmp_path / "a" / "results" / "filter_entropy.json").read_text())
    rows = payload["rows"]
    assert {r["layer"] for r in rows} == {"pool2", "pool5", "relu7"}
    pool5 = [r["aue"] for r in rows if r["layer"] == "pool5"]
    assert [r["filter"] for r in rows if r["layer"] == "pool5"] == list(range(len(pool5)))
    assert all(0.0 <= a <= math.log2(20) for a in pool5)
    assert metrics["filter_entropy/pool5/mean_aue"] == pytest.approx(np.mean(pool5))
    assert payload["summary"]["filter_entropy/pool5/mean_aue"] == pytest.approx(np.mean(pool5))
    topk = json.loads((tmp_path / "a" / "results" / "filter_entropy_topk.json").read_text())["rows"]
    curve = [r for r in topk if r["layer"] == "pool5"]
    assert curve[0]["k"] == 1 and curve[-1]["k"] == len(pool5) and len(curve) == min(30, len(pool5))
    assert curve[0]["mean_aue"] == pytest.approx(min(pool5))
    assert curve[-1]["mean_aue"] == pytest.approx(np.mean(pool5))
    for fig in ("filter_entropy", "filter_entropy_hist"):
        assert (tmp_path / "a" / "figures" / f"{fig}.png").stat().st_size > 1000
    # the same network as its own reference: zero change everywhere
    ref = tmp_path / "a" / "results" / "filter_entropy.json"
    metrics = analyze(analyze_cfg([*over, f"analyses.filter_entropy.reference={ref}"], tmp_path / "b",
                                  data_dir))["random"]
    change = json.loads((tmp_path / "b" / "results" / "filter_entropy_change.json").read_text())["rows"]
    assert {r["layer"] for r in change} == {"pool2", "pool5", "relu7"}
    assert all(r["change"] == pytest.approx(0.0, abs=1e-12) for r in change)
    assert metrics["filter_entropy/pool5/mean_aue_change"] == pytest.approx(0.0, abs=1e-12)
    assert (tmp_path / "b" / "figures" / "filter_entropy_compare.png").stat().st_size > 1000
