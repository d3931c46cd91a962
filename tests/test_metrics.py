"""Average precision: hand-computed PR curves, ties, difficult items, and independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from cnnft.metrics import AveragePrecision, average_precision, mean_average_precision, precision_recall


def _loop_ap(scores: list[float], labels: list[int], mode: str) -> float:
    """Devkit-style reference, one item at a time (valid for distinct scores only)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    npos, tp, fp, prec, rec = sum(labels), 0, 0, [], []
    for i in order:
        tp, fp = tp + labels[i], fp + (1 - labels[i])
        prec.append(tp / (tp + fp))
        rec.append(tp / npos)
    if mode == "voc07":
        return sum(max([p for p, r in zip(prec, rec) if r >= t / 10], default=0.0) for t in range(11)) / 11
    ap, prev = 0.0, 0.0
    for k, r in enumerate(rec):
        ap, prev = ap + (r - prev) * max(prec[k:]), r
    return ap


def test_hand_computed_without_ties() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 1])
    # (recall, precision): (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2), (1, 3/5)
    # envelope:            1,        2/3,       2/3,       3/5,       3/5
    # area = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45
    assert average_precision(scores, labels, mode="area") == pytest.approx(34 / 45)
    # voc07: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7, .8, .9, 1 -> 3/5
    # (4 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11 = 42/55
    assert average_precision(scores, labels, mode="voc07") == pytest.approx(42 / 55)
    assert average_precision(scores, labels) == pytest.approx(42 / 55)  # voc07 is the default


def test_hand_computed_with_a_tie() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    labels = np.array([1, 1, 0, 1])
    # the tied pair enters together: (recall, precision) = (1/3, 1), (2/3, 2/3), (1, 3/4)
    # envelope 1, 3/4, 3/4 -> area = 1/3 + 1/3 * 3/4 + 1/3 * 3/4 = 5/6
    # voc07: t = 0..0.3 -> 1; t = .4..1 (7 values) -> 3/4 -> (4 + 7 * 3/4) / 11 = 37/44
    # (a stable sort would give 11/12 area with the positive first, 5/6 with the negative first)
    for order in ([0, 1, 2, 3], [0, 2, 1, 3], [3, 2, 1, 0]):
        assert average_precision(scores[order], labels[order], mode="area") == pytest.approx(5 / 6)
        assert average_precision(scores[order], labels[order], mode="voc07") == pytest.approx(37 / 44)


def test_voc07_recall_exactly_on_a_threshold() -> None:
    # 10 positives: 3 first (recall 0.3, precision 1), 8 negatives, the other 7 positives last
    # (final precision 10/18, the envelope beyond recall 0.3). t = 0.3 must see precision 1:
    # (4 * 1 + 7 * 10/18) / 11 = 71/99; with t from np.arange(0, 1.1, 0.1) (0.30000000000000004)
    # it would be (3 + 8 * 10/18) / 11.
    labels = np.array([1] * 3 + [0] * 8 + [1] * 7)
    scores = np.arange(labels.size, 0, -1, dtype=float)
    assert average_precision(scores, labels) == pytest.approx(71 / 99)


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_perfect_ranking_is_one(mode: str) -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.linspace(1, 0, labels.size)
    assert average_precision(scores, labels, mode=mode) == 1.0
    assert average_precision(scores.tolist(), labels.astype(bool).tolist(), mode=mode) == 1.0


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_reversed_ranking(mode: str) -> None:
    # 7 negatives above 3 positives: precision rises to 3/10 at full recall, the envelope is 3/10
    labels = np.array([0] * 7 + [1] * 3)
    scores = np.arange(10, 0, -1, dtype=float)
    assert average_precision(scores, labels, mode=mode) == pytest.approx(0.3)


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_ties_are_order_independent(mode: str) -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    reference = average_precision(scores, labels, mode=mode)
    for _ in range(20):
        perm = rng.permutation(60)
        assert average_precision(scores[perm], labels[perm], mode=mode) == reference


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_difficult_items_are_ignored(mode: str) -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 1])
    base = average_precision(scores, labels, mode=mode)
    for extra_label in (1, 0):  # a difficult positive or a difficult negative ranked first
        s = np.append(scores, 2.0)
        y = np.append(labels, extra_label)
        d = np.array([False] * 5 + [True])
        assert average_precision(s, y, difficult=d, mode=mode) == pytest.approx(base)
        assert average_precision(s, y, mode=mode) != pytest.approx(base)
    # difficult items anywhere, as torch tensors
    d = torch.tensor([False, True, False, True, False])
    clean = average_precision(scores[[0, 2, 4]], labels[[0, 2, 4]], mode=mode)
    ap = average_precision(torch.tensor(scores), torch.tensor(labels), difficult=d, mode=mode)
    assert ap == clean == 1.0


def test_no_positives_raises() -> None:
    with pytest.raises(ValueError, match="class has no positives; AP is undefined"):
        average_precision(np.array([0.3, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="class has no positives; AP is undefined"):  # only difficult ones
        average_precision(np.array([0.3, 0.2]), np.array([1, 0]), difficult=np.array([True, False]))
    with pytest.raises(ValueError, match="no positives"):
        average_precision(np.array([]), np.array([], dtype=bool))


def test_bad_arguments_raise() -> None:
    s, y = np.array([0.3, 0.2, 0.1]), np.array([1, 0, 1])
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        average_precision(s, y[:2])
    with pytest.raises(ValueError, match=r"scores must be 1-D, got shape \(3, 1\)"):
        average_precision(s[:, None], y)
    with pytest.raises(ValueError, match=r"unknown AP mode 'voc12'; expected one of \['voc07', 'area'\]"):
        average_precision(s, y, mode="voc12")
    with pytest.raises(ValueError, match=r"labels must be boolean or 0/1, got value\(s\) \[-1\]"):
        average_precision(s, np.array([1, -1, 0]))
    with pytest.raises(ValueError, match="difficult has length 2"):
        average_precision(s, y, difficult=np.array([True, False]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([0.3, np.nan, 0.1]), y)


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_matches_one_item_at_a_time_reference(mode: str) -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 50, 333):
        scores = rng.normal(size=n)
        labels = (rng.random(n) < 0.3).astype(int)
        labels[rng.integers(n)] = 1
        expected = _loop_ap(scores.tolist(), labels.tolist(), mode)
        assert average_precision(scores, labels, mode=mode) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_relations_to_sklearn(tied: bool) -> None:
    """sklearn's AP is sum_k (R_k - R_{k-1}) P_k over distinct thresholds, without interpolation.

    Hence: it equals that sum over our PR points; area AP (envelope >= P) is >= it; and, with
    E the non-increasing envelope over recall, area = integral of E on [0, 1] while
    voc07 = mean of E(0), E(.1), ..., E(1), so 10 area + E(1) <= 11 voc07 <= 10 area + E(0),
    where E(1) = positives / items and E(0) <= 1."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(2, 200))
        scores = rng.integers(0, 6, size=n).astype(float) if tied else rng.random(n)
        labels = rng.random(n) < rng.uniform(0.05, 0.7)
        labels[0] = True
        sk = average_precision_score(labels, scores)
        precision, recall = precision_recall(scores, labels)
        assert np.sum(np.diff(recall, prepend=0.0) * precision) == pytest.approx(sk, abs=1e-12)
        area = average_precision(scores, labels, mode="area")
        voc07 = average_precision(scores, labels, mode="voc07")
        assert area >= sk - 1e-12
        assert 10 * area + labels.mean() <= 11 * voc07 + 1e-12
        assert 11 * voc07 <= 10 * area + 1 + 1e-12


@pytest.mark.parametrize("mode", ["voc07", "area"])
def test_metric_over_updates_equals_function(mode: str) -> None:
    rng = np.random.default_rng(3)
    metric = AveragePrecision(mode=mode)
    parts = []
    for n, with_difficult in ((10, True), (1, False), (25, True)):
        s = torch.from_numpy(rng.normal(size=n))
        y = torch.from_numpy(rng.random(n) < 0.4)
        d = torch.from_numpy(rng.random(n) < 0.2) if with_difficult else None
        metric.update(s, y.int(), d)
        parts.append((s, y, torch.zeros(n, dtype=torch.bool) if d is None else d))
    s, y, d = (torch.cat(p) for p in zip(*parts))
    expected = average_precision(s, y, difficult=d, mode=mode)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_compute_without_data_raises() -> None:
    metric = AveragePrecision()
    metric.update(torch.tensor([0.5]), torch.tensor([True]))
    assert metric.compute().item() == 1.0
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_metric_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown AP mode"):
        AveragePrecision(mode="11pt")
    metric = AveragePrecision()
    with pytest.raises(ValueError, match="labels has length 2, expected 3"):
        metric.update(torch.rand(3), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="labels must be boolean or 0/1"):
        metric.update(torch.rand(2), torch.tensor([2, 0]))


def test_mean_average_precision() -> None:
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(40, 3))
    labels = rng.random((40, 3)) < 0.3
    labels[0] = True
    difficult = rng.random((40, 3)) < 0.1
    difficult[0] = False
    per_class, mean = mean_average_precision(scores, labels, difficult=difficult, mode="area")
    expected = [average_precision(scores[:, c], labels[:, c], difficult=difficult[:, c], mode="area")
                for c in range(3)]
    np.testing.assert_allclose(per_class, expected)
    assert mean == pytest.approx(np.mean(expected))
    labels[:, 2] = False
    with pytest.raises(ValueError, match="class 2: class has no positives"):
        mean_average_precision(torch.from_numpy(scores), torch.from_numpy(labels))
    with pytest.raises(ValueError, match=r"labels has shape \(40, 2\)"):
        mean_average_precision(scores, labels[:, :2])


def test_metric_states_concatenate_across_ranks() -> None:
    """Sync with a stand-in gather: the second rank holds the same items with negated scores."""
    s, y = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 0, 1])
    d = torch.tensor([False, False, True, False])
    gathered = []

    def gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
        gathered.append(t.numel())
        return [t, -t if t.is_floating_point() else t.clone()]

    metric = AveragePrecision(mode="area", dist_sync_fn=gather, distributed_available_fn=lambda: True)
    metric.update(s, y, d)
    expected = average_precision(torch.cat([s, -s]), y.repeat(2), difficult=d.repeat(2), mode="area")
    assert expected != pytest.approx(average_precision(s, y, difficult=d, mode="area"))
    assert metric.compute().item() == pytest.approx(expected)
    assert gathered == [4, 4, 4]  # scores, labels, difficult


def _gloo_rank(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(2, 30, generator=g), torch.rand(2, 30, generator=g) < 0.4
    metric = AveragePrecision(mode="area")
    metric.update(s[rank], y[rank])
    got = metric.compute().item()
    if rank == 0:
        expected = average_precision(s.flatten(), y.flatten(), mode="area")
        torch.save(torch.tensor([got, expected]), path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_metric_syncs_over_two_gloo_processes(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ap.pt"
    mp.spawn(_gloo_rank, args=(port, str(out)), nprocs=2)
    got, expected = torch.load(out).tolist()
    assert got == pytest.approx(expected, rel=1e-6)
