"""Feature extraction: one pass for many layers, mode restored, shards merged, cache verified."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cnnft.features import FeatureCache, extract, extract_cached, merge_shards
from cnnft.hashing import layer_digests
from cnnft.models import PROBE_LAYERS, CaffeNet


@pytest.fixture()
def net() -> CaffeNet:
    torch.manual_seed(0)
    return CaffeNet(5, width=0.125, input_size=67)


@pytest.fixture()
def loader() -> DataLoader:
    images = torch.randn(10, 3, 67, 67) * 50
    return DataLoader(TensorDataset(images, torch.arange(10)), batch_size=4)


def test_one_forward_pass_per_batch_for_all_layers(net: CaffeNet, loader: DataLoader) -> None:
    calls = []
    net.conv1.register_forward_hook(lambda *a: calls.append(1))
    feats = extract(net, loader, PROBE_LAYERS)
    assert len(calls) == 3  # 3 batches, not 3 x 7 layers
    assert feats["pool5"].shape == (10, 32, 1, 1) and feats["relu7"].shape == (10, 512)
    net.eval()
    x = loader.dataset.tensors[0]
    expected = net.forward_taps(x, ["relu3", "relu6"])
    assert torch.allclose(feats["relu3"], expected["relu3"], atol=1e-4)
    assert torch.allclose(feats["relu6"], expected["relu6"], atol=1e-4)


def test_mode_restored_and_no_grad(net: CaffeNet, loader: DataLoader) -> None:
    net.train()
    feats = extract(net, loader, ["relu7"])
    assert net.training and not feats["relu7"].requires_grad
    net.eval()
    extract(net, loader, ["relu7"])
    assert not net.training


def test_eval_mode_disables_dropout(net: CaffeNet, loader: DataLoader) -> None:
    net.train()
    a, b = extract(net, loader, ["fc8"])["fc8"], extract(net, loader, ["fc8"])["fc8"]
    assert torch.equal(a, b)


def test_merge_shards_drops_distributed_sampler_padding() -> None:
    dataset = TensorDataset(torch.arange(7.0)[:, None])
    shards = []
    for rank in range(3):  # 7 samples over 3 ranks: 2 padding duplicates
        indices = list(DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False))
        shards.append((indices, dataset.tensors[0][indices] * 10))
    assert sum(len(i) for i, _ in shards) == 9
    merged = merge_shards(shards, 7)
    assert torch.equal(merged[:, 0], torch.arange(7.0) * 10)
    with pytest.raises(RuntimeError, match="unfilled"):
        merge_shards(shards[:2], 7)


def test_cache_roundtrip_float16_and_keyed(net: CaffeNet, loader: DataLoader, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    parts = {"model": "abc", "data": "test", "transform": {"crop": 67}}
    first = extract_cached(net, loader, ["pool5", "relu7"], cache=cache, key_parts=parts)
    assert len(list(tmp_path.iterdir())) == 2 and not list(tmp_path.glob(".*"))
    calls = []
    net.conv1.register_forward_hook(lambda *a: calls.append(1))
    second = extract_cached(net, loader, ["pool5", "relu7"], cache=cache, key_parts=parts)
    assert not calls  # served from the cache
    for name in first:
        assert torch.equal(first[name], second[name])  # cached or not, the same values
    other = extract_cached(net, loader, ["relu7"], cache=cache, key_parts={**parts, "data": "val"})
    assert calls and len(list(tmp_path.iterdir())) == 3 and other["relu7"].shape == (10, 512)


def test_corrupt_cache_is_detected_and_recomputed(net: CaffeNet, loader: DataLoader, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = FeatureCache(tmp_path)
    parts = {"model": "abc"}
    first = extract_cached(net, loader, ["relu6"], cache=cache, key_parts=parts)
    data = next(tmp_path.glob("*/features.f16"))
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again = extract_cached(net, loader, ["relu6"], cache=cache, key_parts=parts)
    assert "corrupt or stale" in caplog.text
    assert torch.equal(first["relu6"], again["relu6"])
    key = FeatureCache.key(layer="relu6", model=layer_digests(net)["relu6"])
    assert cache.load(key) is not None  # rewritten


def test_networks_sharing_their_first_layers_share_cached_features(net: CaffeNet, loader: DataLoader,
                                                                   tmp_path: Path) -> None:
    """Fine-tuned with conv frozen: pool5 comes from the cache, relu7 is recomputed."""
    cache = FeatureCache(tmp_path)
    parts = {"data": "test", "transform": {"crop": 67}}
    first = extract_cached(net, loader, ["pool5", "relu7"], cache=cache, key_parts=parts)
    tuned = copy.deepcopy(net)
    with torch.no_grad():
        tuned.fc7.weight.mul_(2.0)
    before, after = layer_digests(net), layer_digests(tuned)
    assert [k for k in before if before[k] != after[k]] == ["fc7", "relu7", "drop7", "fc8"]
    second = extract_cached(tuned, loader, ["pool5", "relu7"], cache=cache, key_parts=parts)
    assert len(list(tmp_path.iterdir())) == 3  # one new entry: relu7
    assert torch.equal(first["pool5"], second["pool5"])
    assert not torch.allclose(first["relu7"], second["relu7"])


def test_extract_cached_streams_each_batch_into_the_cache(net: CaffeNet, loader: DataLoader,
                                                          tmp_path: Path) -> None:
    """While batch k is extracted the cache files already hold the rows of batches 1..k-1, and the
    values are those of ``extract`` rounded to float16 (the numbers of the in-memory path)."""
    cache = FeatureCache(tmp_path)
    layers = ["pool2", "pool5", "relu7"]
    written: list[list[int]] = []
    net.conv1.register_forward_hook(
        lambda *a: written.append(sorted(p.stat().st_size for p in tmp_path.glob(".*/features.f16"))))
    got = extract_cached(net, loader, layers, cache=cache, key_parts={"data": "test"})
    expected = {name: value.half().float() for name, value in extract(net, loader, layers).items()}
    written = written[:3]  # the second extraction's calls come after the cache is in place
    row_bytes = sorted(2 * expected[name][0].numel() for name in layers)
    assert written == [[0, 0, 0], [4 * b for b in row_bytes], [8 * b for b in row_bytes]]
    assert not list(tmp_path.glob(".*"))  # staging folders renamed into place
    for name in layers:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], expected[name])
        key = FeatureCache.key(layer=name, data="test", model=layer_digests(net)[name])
        assert torch.equal(cache.load(key), expected[name])


def test_appender_rows_shape_and_errors(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    rows = torch.randn(5, 3, 2)
    with cache.appender("k", layer="x") as append:
        append(rows[:2].numpy())
        append(rows[2:].numpy())
    assert torch.equal(cache.load("k"), rows.half().float())
    assert cache.open("k").shape == (5, 3, 2)
    error = r"rows of shape \[3, 3\] appended to an array of rows \[3, 2\]"
    with pytest.raises(ValueError, match=error), cache.appender("bad") as append:
        append(rows[:2].numpy())
        append(torch.zeros(1, 3, 3).numpy())
    assert cache.open("bad") is None and not list(tmp_path.glob(".*"))  # nothing left behind
