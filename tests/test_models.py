"""Any network: the model config group, taps by module name, weights from a local file, the layer
listing, and the analyses on torchvision and user networks (``cnnft.models.build``,
``cnnft.models.tapped``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from cnnft.analyze import analyze, load_network
from cnnft.errors import CheckpointError, ConfigError
from cnnft.features import extract
from cnnft.hashing import layer_digests
from cnnft.layers import format_layers
from cnnft.models.build import build_network, replace_head
from cnnft.models.tapped import TappedNet, layer_table
from tests.conftest import TINY_DATA, compose_cfg

RESNET = {"family": "torchvision", "name": "resnet18", "input_size": 64, "kwargs": {},
          "input_std": [58.395, 57.12, 57.375], "weights": None, "head": None}


class SmallNet(nn.Module):
    """A user's own network (model=custom): not a Sequential, a shared ReLU, a classifier."""

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 5, stride=2)
        self.act = nn.ReLU()  # not in place: it also runs on the block's ReLU output (training)
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.pool(self.act(self.block(x)))
        return self.fc(x.flatten(1))


def custom_model(**extra: object) -> dict[str, object]:
    return {"family": "custom", "_target_": "tests.test_models.SmallNet", "kwargs": {"channels": 8},
            "input_size": 40, "input_std": None, "weights": None, **extra}


def test_taps_equal_a_plain_forward_and_stop_after_the_last():
    torch.manual_seed(0)
    net = build_network(RESNET).eval()
    x = torch.randn(2, 3, 64, 64) * 50
    net.check_layers(["layer2"])  # the first check runs one pass to count each module's calls
    ran: list[str] = []
    net.module.layer4.register_forward_hook(lambda *_: ran.append("layer4"))
    taps = net.forward_taps(x, ["layer2", "maxpool"])
    assert list(taps) == ["layer2", "maxpool"] and ran == []  # layer3/4 never ran
    m = net.module
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x / net.input_std))))
        torch.testing.assert_close(taps["maxpool"], h)
        torch.testing.assert_close(taps["layer2"], m.layer2(m.layer1(h)))
        torch.testing.assert_close(net(x), m(x / net.input_std))


def test_a_tapped_output_is_safe_from_a_later_inplace_relu():
    torch.manual_seed(0)
    net = build_network({**RESNET, "name": "alexnet", "input_size": 67, "head": "classifier.6"}).eval()
    with torch.no_grad():
        taps = net.forward_taps(torch.randn(1, 3, 67, 67) * 50, ["features.0", "features.1"])
    assert float(taps["features.0"].min()) < 0 and float(taps["features.1"].min()) == 0
    torch.testing.assert_close(taps["features.0"].clamp(min=0), taps["features.1"])


def test_unknown_and_shared_layers_are_clear_errors():
    net = build_network(RESNET)
    with pytest.raises(ConfigError, match=r"unknown layer\(s\) \['pool5'\] for model resnet18; valid "
                                          r"layers: \['conv1', 'bn1', 'relu', 'maxpool', 'layer1'"):
        net.check_layers(["layer1", "pool5"])
    with pytest.raises(ConfigError, match=r"layer1\.0\.relu runs 2 times.*such as \['layer1\.0'\]"):
        net.check_layers(["layer1.0.relu"])
    net.check_layers(["relu"])  # the stem's ReLU runs once


def test_model_names_and_families_are_checked():
    with pytest.raises(ConfigError, match=r"model.name='resnet5' is not a torchvision classification "
                                          r"model; expected one of \[.*'resnet50'"):
        build_network({**RESNET, "name": "resnet5"})
    with pytest.raises(ConfigError, match=r"model.family='timm'; expected one of"):
        build_network({**RESNET, "family": "timm"})
    with pytest.raises(ConfigError, match=r"model._target_='nosuch.Net' cannot be imported"):
        build_network(custom_model(_target_="nosuch.Net"))


def test_weights_load_exactly_and_a_misfit_names_keys_and_shapes(tmp_path: Path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = build_network({**RESNET, "weights": str(path), "kwargs": {"num_classes": 7}}).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x), source.eval()(x / net.input_std))
    # fine-tuning: a new 21-way head replaces the 7-way one, the rest loads
    tuned = build_network({**RESNET, "weights": str(path), "kwargs": {"num_classes": 7}}, num_classes=21)
    assert tuned.module.fc.out_features == 21
    torch.testing.assert_close(tuned.module.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match=r"weights .*resnet18.pth do not fit the model: missing keys "
                                              r"\[\], unexpected keys \[\], shape mismatches "
                                              r"\['fc.bias: file \(7,\) vs model \(1000,\)'"):
        build_network({**RESNET, "weights": str(path)})
    state = source.state_dict()
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['layer4.1.bn2.running_var'\], "
                                              r"unexpected keys \['extra.weight'\]"):
        build_network({**RESNET, "weights": str(path), "kwargs": {"num_classes": 7}})


def test_custom_network_head_and_layer_listing():
    torch.manual_seed(0)
    net = build_network(custom_model())
    assert isinstance(net, TappedNet) and net.model_name == "tests.test_models.SmallNet"
    assert replace_head(net, 21) == "fc" and net.module.fc.out_features == 21
    rows = {r["name"]: r for r in layer_table(net)}
    assert rows["stem"]["shape"] == (8, 18, 18) and rows["act"]["calls"] == 2
    assert rows["pool"]["shape"] == (8, 2, 2) and rows["fc"]["shape"] == (21,)
    text = format_layers({**custom_model(), "probe_layers": ["block", "pool"], "unit_layer": "pool",
                          "first_conv": "stem"})
    assert text.splitlines()[0] == ("tests.test_models.SmallNet: 7 layers at input 40x40 "
                                    "(* probe_layers, u unit_layer, f first_conv)")
    assert "  f stem" in text and " *u pool" in text and "runs 2x per pass: not tappable" in text
    caffenet = format_layers({"family": "caffenet", "input_size": 67, "width": 0.125,
                              "probe_layers": ["pool5"], "unit_layer": "pool5", "first_conv": "conv1"})
    assert " *u pool5    MaxPool2d              32x1x1" in caffenet and "  f conv1    Conv2d" in caffenet


def test_extract_and_layer_digests_on_a_torchvision_net():
    torch.manual_seed(0)
    net = build_network(RESNET)
    images = torch.randn(5, 3, 64, 64)
    feats = extract(net, [images[:3], images[3:]], ["layer3", "avgpool"])
    assert feats["layer3"].shape == (5, 256, 4, 4) and feats["avgpool"].shape == (5, 512, 1, 1)
    digests = layer_digests(net)
    assert set(digests) == set(net.layer_names) and len(set(digests.values())) == 1
    with torch.no_grad():
        net.module.fc.bias.add_(1)  # any weight changes every layer's key: the net is not a chain
    assert layer_digests(net)["conv1"] != digests["conv1"]


@pytest.mark.parametrize("model", ["alexnet", "vgg16", "resnet50"])
def test_the_model_group_composes(model: str, tmp_path: Path, data_dir: Path):
    cfg = compose_cfg([*TINY_DATA, f"model={model}", "checkpoint=random"], tmp_path, data_dir, name="analyze")
    assert cfg.model.family == "torchvision" and cfg.model.name == model
    assert list(cfg.layers) == list(cfg.model.probe_layers) and cfg.model.input_size == 163  # demo scale
    assert cfg.model.mean[0] == 123.675
    paper = compose_cfg([f"model={model}", "scale=paper", "checkpoint=random", "data.voc_root=v"],
                        tmp_path, data_dir, name="analyze")
    assert paper.model.input_size == 224
    caffenet = compose_cfg(["scale=paper", "checkpoint=random", "data.voc_root=v"], tmp_path, data_dir,
                           name="analyze")
    assert (caffenet.model.input_size, caffenet.model.width, caffenet.model.init) == (227, 1.0, "caffe")


def test_checkpoint_weights_needs_model_weights(tmp_path: Path, data_dir: Path):
    cfg = compose_cfg([*TINY_DATA, "model=resnet50", "checkpoint=weights"], tmp_path, data_dir,
                      name="analyze")
    with pytest.raises(ConfigError, match=r"checkpoint=weights analyses the file in model.weights, which "
                                          r"is not set"):
        load_network("weights", cfg)


ANALYSES = "[probe_cls,probe_gtbox,filter_entropy,unit_selectivity,unit_count,detection,filter_viz]"


@pytest.mark.parametrize("family", ["mobilenet_v3_small", "custom"])
def test_every_analysis_runs_on_another_network(family: str, tmp_path: Path, data_dir: Path):
    """cnnft-analyze on a torchvision MobileNet and a user's module (random weights, tiny inputs):
    every analysis writes its results for the model's own layer names."""
    if family == "mobilenet_v3_small":
        torch.manual_seed(0)
        weights = tmp_path / "mobilenet.pth"
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
        model = ["model=torchvision", "model.name=mobilenet_v3_small", f"model.weights={weights}",
                 "model.probe_layers=[features.6,avgpool]", "model.unit_layer=features.6",
                 "model.first_conv=features.0.0", "model.input_size=64", "checkpoint=weights"]
    else:
        model = ["model=custom", "model._target_=tests.test_models.SmallNet", "model.input_size=40",
                 "model.probe_layers=[block,pool]", "model.unit_layer=block", "model.first_conv=stem",
                 "checkpoint=random"]
    out = tmp_path / "run"
    cfg = compose_cfg([*TINY_DATA, *model, f"analyses={ANALYSES}", "ablations=[unroll,spatial_max]",
                       "logger=csv", "data.num_workers=0", "probe.c_grid=[1.0]", "probe.folds=2",
                       "model.context_pad=3", "progress=false",
                       "analyses.detection.max_proposals=20", "analyses.unit_count.ks=[1,2]",
                       "analyses.unit_selectivity.num_thresholds=20"], out, data_dir, name="analyze")
    analyze(cfg)
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    layers = {"mobilenet_v3_small": ["features.6", "avgpool"], "custom": ["block", "pool"]}[family]
    for name in ("probe_cls", "probe_gtbox", "detection"):
        maps = {(r["layer"], r["ablation"]) for r in results[name]["rows"] if r["class"] == "mAP"}
        # spatial max applies to maps only: avgpool's 1x1 maps take it, fc-like vectors would not
        assert {layer for layer, _ in maps} == set(layers), name
        assert all(0 <= r["ap"] <= 1 for r in results[name]["rows"] if r["class"] == "mAP")
    assert {r["layer"] for r in results["filter_entropy"]["rows"]} == set(layers)
    assert results["unit_selectivity"]["rows"] and results["unit_count"]["rows"]
    assert (out / "figures").is_dir() and any((out / "figures").glob("filter_viz*.png"))
    assert OmegaConf.select(cfg, "model.family") in ("torchvision", "custom")


def test_bad_input_std_weights_file_and_head_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model.input_std=\[1.0, 0.0, 1.0\]; expected three positive "
                                          r"floats"):
        build_network(custom_model(input_std=[1.0, 0.0, 1.0]))
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"net.fc.weight": torch.zeros(1)}, "epoch": 0}, ckpt)
    with pytest.raises(CheckpointError, match=r"model.weights=.*run.ckpt is a training checkpoint; "
                                              r"expected a plain state dict"):
        build_network(custom_model(weights=str(ckpt)))
    with pytest.raises(ConfigError, match=r"model.head='nosuch' is not a layer of "
                                          r"tests.test_models.SmallNet; valid layers: \['stem'"):
        replace_head(build_network(custom_model(head="nosuch")), 21)
    with pytest.raises(ConfigError, match=r"model.head='pool' is a AdaptiveAvgPool2d; expected an nn.Linear"):
        replace_head(build_network(custom_model(head="pool")), 21)
