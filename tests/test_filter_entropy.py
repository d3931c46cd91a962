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
