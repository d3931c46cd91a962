"""Weights converted from Caffe (BGR conv1, ``pretrained_format=caffe``) and Caffe's mean image
(``model.mean_image``): the converted network on RGB input computes what Caffe's computed on BGR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnft.checkpoint import load_pretrained, pretrained_state, read_checkpoint, state_dict_keys
from cnnft.data.datasets import WindowDataset
from cnnft.data.transforms import (
    caffe_test_view,
    caffe_train_view,
    load_mean_image,
    mean_key,
    window_source,
)
from cnnft.data.windows import context_boxes, warp_boxes
from cnnft.errors import CheckpointError, ConfigError
from cnnft.models.caffenet import CaffeNet

TAPS = ["conv1", "pool5", "relu7", "fc8"]


def _caffe_net() -> CaffeNet:
    torch.manual_seed(0)
    net = CaffeNet(1000, width=0.125, input_size=67).eval()
    with torch.no_grad():  # larger weights than Caffe's init, so every layer's output is far from 0
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net


@pytest.mark.parametrize("blob_keys", [False, True], ids=["weight_bias", "caffe_blobs"])
def test_converted_caffe_weights_on_rgb_equal_caffe_weights_on_bgr(tmp_path: Path, blob_keys: bool) -> None:
    caffe = _caffe_net()
    state = caffe.state_dict()
    if blob_keys:  # Caffe's blob order: <layer>.0 weights, <layer>.1 biases
        state = {k.replace(".weight", ".0").replace(".bias", ".1"): v for k, v in state.items()}
    path = tmp_path / "caffenet_from_caffe.pt"
    torch.save(state, path)
    ours = CaffeNet(1000, width=0.125, input_size=67).eval()
    load_pretrained(ours, path, skip=(), fmt="caffe")
    rgb = torch.rand(2, 3, 67, 67) * 255 - 120
    bgr = rgb.flip(1)
    with torch.no_grad():
        want = caffe.forward_taps(bgr, TAPS)     # Caffe's weights fed BGR, as Caffe fed them
        got = ours.forward_taps(rgb, TAPS)       # converted weights fed cnnft's RGB
    for layer in TAPS:
        assert torch.allclose(got[layer], want[layer], rtol=1e-4, atol=1e-3 * want[layer].abs().max()), layer
    assert torch.equal(ours.conv1.weight, caffe.conv1.weight.flip(1))
    if not blob_keys:  # read as cnnft weights (no flip), the same file gives other features
        naive = CaffeNet(1000, width=0.125, input_size=67).eval()
        load_pretrained(naive, path, skip=(), fmt="cnnft")
        with torch.no_grad():
            wrong = naive.forward_taps(rgb, ["conv1"])["conv1"]
        assert (wrong - want["conv1"]).abs().max() > 1.0


def test_pretrained_format_value_is_validated(tmp_path: Path) -> None:
    from cnnft.module import CaffeNetModule

    with pytest.raises(ConfigError, match=r"pretrained_format='bgr'; expected one of \['cnnft', 'caffe'\]"):
        CaffeNetModule(21, {"width": 0.125, "input_size": 67}, {}, pretrained_format="bgr")
    with pytest.raises(ConfigError, match="pretrained_format='auto'"):
        pretrained_state({}, tmp_path / "x.pt", "auto")


@pytest.mark.parametrize("fmt", ["cnnft", "caffe"])
def test_foreign_layout_is_refused_naming_file_and_keys(tmp_path: Path, fmt: str) -> None:
    state = dict(CaffeNet(1000, width=0.125, input_size=67).state_dict())
    state["features.0.weight"] = state.pop("conv2.weight")  # e.g. a torchvision AlexNet name
    path = tmp_path / "alexnet_like.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(CaffeNet(21, width=0.125, input_size=67), path, fmt=fmt)
    text = str(e.value)
    assert str(path) in text and f"pretrained_format={fmt}" in text
    assert "missing keys ['conv2.weight']" in text and "unexpected keys ['features.0.weight']" in text


def test_caffe_format_refuses_a_cnnft_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"cnnft": {"arch": {}}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="is a cnnft/Lightning checkpoint.*pretrained_format=cnnft"):
        pretrained_state(read_checkpoint(path), path, "caffe")


def test_bad_weights_fail_before_training_writes_anything(tiny_cfg, tmp_path: Path) -> None:
    from cnnft.train import train

    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(12, 3, 11, 11), "extra": torch.zeros(1)}, bad)
    out = tmp_path / "run"
    cfg = tiny_cfg("stage=finetune", f"pretrained={bad}", "pretrained_format=caffe", output_dir=out)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*unexpected keys \['extra'\]"):
        train(cfg)
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    assert state_dict_keys()[:2] == ["conv1.weight", "conv1.bias"]


# ---------------------------------------------------------------- the mean image


def _mean_file(tmp_path: Path, size: int = 20) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    bgr = rng.uniform(60, 180, size=(3, size, size)).astype(np.float32)
    path = tmp_path / "mean.npy"
    np.save(path, bgr)
    return path, bgr


def test_mean_image_is_read_as_rgb_and_validated(tmp_path: Path) -> None:
    path, bgr = _mean_file(tmp_path)
    mean = load_mean_image(path)
    assert mean.shape == (3, 20, 20) and torch.equal(mean, torch.from_numpy(bgr[::-1].copy()))
    np.save(tmp_path / "hwc.npy", np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ConfigError, match=r"hwc\.npy holds a float32 array of shape \(20, 20, 3\).*3xHxW"):
        load_mean_image(tmp_path / "hwc.npy")
    with pytest.raises(ConfigError, match="does not exist"):
        load_mean_image(tmp_path / "missing.npy")
    assert mean_key((1.0, 2.0, 3.0)) == (1.0, 2.0, 3.0)  # mean-pixel cache keys are unchanged
    assert mean_key(mean) != mean_key(mean + 1) and "mean_image" in mean_key(mean)


def test_whole_image_views_crop_the_mean_image_where_caffe_does(tmp_path: Path) -> None:
    path, _ = _mean_file(tmp_path)
    mean = load_mean_image(path)
    image = np.random.default_rng(1).integers(0, 256, size=(30, 26, 3), dtype=np.uint8)
    zero = (0.0, 0.0, 0.0)
    # test: centre crop of image and mean
    got = caffe_test_view(image, resize=20, crop=16, mean=mean)
    plain = caffe_test_view(image, resize=20, crop=16, mean=zero)
    assert torch.allclose(got, plain - mean[:, 2:18, 2:18])
    # train: the mean is cropped at the image's random offset and subtracted before the mirror
    for seed in range(6):
        got = caffe_train_view(image, np.random.default_rng(seed), resize=20, crop=16, mean=mean)
        plain = caffe_train_view(image, np.random.default_rng(seed), resize=20, crop=16, mean=zero)
        rng = np.random.default_rng(seed)
        top, left = (int(v) for v in rng.integers(0, 5, size=2))
        flip = rng.random() < 0.5
        crop = mean[:, top:top + 16, left:left + 16]
        assert torch.allclose(got, plain - (crop.flip(-1) if flip else crop)), seed


@pytest.mark.parametrize("method", ["per_box", "batched"])
def test_windows_subtract_the_centre_mean_inside_the_image(tmp_path: Path, method: str) -> None:
    path, _ = _mean_file(tmp_path, size=24)
    mean = load_mean_image(path)
    image = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(3, 40, 50), dtype=np.uint8))
    boxes = torch.tensor([[-6.0, 4.0, 20.0, 30.0], [10.0, 8.0, 45.0, 36.0]])  # the first leaves the image
    source, mean_crop = window_source(image, mean, 16)
    assert torch.equal(mean_crop, mean[:, 4:20, 4:20])  # R-CNN: centre crop of the mean
    got = warp_boxes(source, boxes, crop=16, pad=2, method=method, mean_image=mean_crop)
    raw = warp_boxes(image.float(), boxes, crop=16, pad=2, method=method)
    inside = warp_boxes(torch.ones(3, 40, 50), boxes, crop=16, pad=2, method=method) > 0.5
    assert not inside[0].all() and inside[1].all() and context_boxes(boxes, 16, 2)[0, 0] < 0
    assert torch.allclose(got, torch.where(inside, raw - mean_crop, torch.zeros(())), atol=1e-3)


def test_mirrored_window_subtracts_the_unmirrored_mean(tmp_path: Path) -> None:
    """Caffe's WindowDataLayer mirrors the warped window, then subtracts the mean unmirrored."""
    path, _ = _mean_file(tmp_path, size=24)
    mean = load_mean_image(path)
    pixels = np.random.default_rng(3).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    image_path = tmp_path / "im.png"
    import cv2

    cv2.imwrite(str(image_path), pixels[..., ::-1])
    boxes = np.array([[-6.0, 4.0, 20.0, 30.0]], np.float32)
    data = WindowDataset([image_path], np.array([0]), boxes, np.array([1]), crop=16, pad=2, mean=mean,
                         mirror=True)
    flat = WindowDataset([image_path], np.array([0]), boxes, np.array([1]), crop=16, pad=2,
                         mean=(0.0, 0.0, 0.0), mirror=True)
    raw = torch.from_numpy(pixels).permute(2, 0, 1).float()
    inside = warp_boxes(torch.ones(3, 40, 50), torch.from_numpy(boxes), crop=16, pad=2)[0] > 0.5
    seen = set()
    for seed in range(8):
        x, _ = data[(0, seed)]
        plain, _ = flat[(0, seed)]
        mirrored = not torch.equal(plain, warp_boxes(raw, torch.from_numpy(boxes), crop=16, pad=2)[0])
        mask = inside.flip(-1) if mirrored else inside
        assert torch.allclose(x, torch.where(mask, plain - mean[:, 4:20, 4:20], torch.zeros(())), atol=1e-3)
        seen.add(mirrored)
    assert seen == {True, False}
