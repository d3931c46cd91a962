"""Training any network (issue 16): pretraining and fine-tuning a user's module and a torchvision
ResNet, param groups and freezing by layer name, bad input refused before anything is written,
and the reproduce pipeline on a non-CaffeNet model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cnnft.analyze import load_network
from cnnft.checkpoint import read_checkpoint
from cnnft.errors import CheckpointError, ConfigError
from cnnft.freeze import FreezeScheme, reinitialise, resolve
from cnnft.models.build import build_network
from cnnft.module import CaffeNetModule
from cnnft.optim import param_groups
from cnnft.train import train
from tests.conftest import CONF, TINY_DATA, TINY_RUN, compose_cfg
from tests.test_models import RESNET, SmallNet

#: the user's own network (tests.test_models.SmallNet: stem, act, block, pool, fc)
CUSTOM = ["model=custom", "model._target_=tests.test_models.SmallNet", "model.input_size=40",
          "model.probe_layers=[block,pool]", "model.unit_layer=block", "model.first_conv=stem",
          "model.conv_layers=[stem,block]"]
SHORT = ["recipe.pretrain.max_steps=2", "recipe.pretrain.snapshots=[]", "recipe.finetune.max_steps=2"]
OPTIM = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_step": 10, "lr_mult": {"fc8": 10}}


def _net_state(path: Path) -> dict[str, torch.Tensor]:
    return {k[len("net.module."):]: v for k, v in read_checkpoint(path)["state_dict"].items()
            if k.startswith("net.module.")}


@pytest.fixture()
def pretrained_custom(tiny_cfg, tmp_path: Path) -> Path:
    out = tmp_path / "pretrain"
    train(tiny_cfg(*CUSTOM, *SHORT, output_dir=out))
    return out / "checkpoints" / "last.ckpt"


def test_pretrain_then_finetune_a_custom_network(tiny_cfg, pretrained_custom: Path, tmp_path: Path,
                                                 data_dir: Path) -> None:
    ckpt = read_checkpoint(pretrained_custom)
    assert ckpt["cnnft"]["arch"] == {"family": "custom", "name": "tests.test_models.SmallNet",
                                     "input_size": 40, "num_classes": 5, "head": "fc"}
    assert ckpt["cnnft"]["config"]["model"]["_target_"] == "tests.test_models.SmallNet"
    before = _net_state(pretrained_custom)
    assert before["fc.weight"].shape == (5, 32)  # the head at the data's class count

    out = tmp_path / "ft_fc"
    _, objs = train(tiny_cfg(*CUSTOM, *SHORT, "stage=finetune", "freeze=fc",
                             f"pretrained={pretrained_custom}", output_dir=out))
    after = _net_state(out / "checkpoints" / "last.ckpt")
    for key in ("stem.weight", "stem.bias", "block.0.weight", "block.0.bias"):  # model.conv_layers
        assert torch.equal(before[key], after[key]), key
    assert after["fc.weight"].shape == (21, 32)
    module = objs["module"]
    assert module.frozen_layers == ["stem", "block"]
    assert not module.net.module.stem.training and module.net.module.fc.training
    groups = {g["name"]: g for g in objs["trainer"].optimizers[0].param_groups}
    assert sorted(groups) == ["fc.bias", "fc.weight"]  # frozen layers leave the optimizer
    assert groups["fc.weight"]["lr_mult"] == 10 and groups["fc.bias"]["lr_mult"] == 20  # fc8's 10x

    # cnnft-analyze rebuilds the fine-tuned network from its checkpoint: the same function
    spec = str(out / "checkpoints" / "last.ckpt")
    cfg = compose_cfg([*TINY_DATA, *CUSTOM, f"checkpoint={spec}"], tmp_path / "an", data_dir, name="analyze")
    net, model_cfg, _, step = load_network(spec, cfg)
    assert model_cfg["family"] == "custom" and step == 2
    x = torch.randn(3, 3, 40, 40) * 50
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), module.net.eval()(x))


def test_finetune_from_a_state_dict_file_with_a_new_head(tiny_cfg, tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = SmallNet(num_classes=10)
    weights = tmp_path / "small.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "ft"
    _, objs = train(tiny_cfg(*CUSTOM, *SHORT, "stage=finetune", "freeze.upto=stem",
                             f"model.weights={weights}", output_dir=out))
    after = _net_state(out / "checkpoints" / "last.ckpt")
    assert torch.equal(after["stem.weight"], source.stem.weight)  # frozen by upto
    assert not torch.equal(after["block.0.weight"], source.block[0].weight)  # tuned
    assert after["fc.weight"].shape == (21, 32)
    assert objs["module"].frozen_layers == ["stem"]


def _resnet_module(**freeze: object) -> CaffeNetModule:
    torch.manual_seed(0)
    return CaffeNetModule(21, net={}, optim=OPTIM, freeze={"name": "x", **freeze}, model=dict(RESNET),
                          channels_last=False)


def test_param_groups_for_any_model() -> None:
    module = _resnet_module(upto="layer1")
    groups = {g["name"]: g for g in param_groups(module.net, lr=0.01, weight_decay=5e-4,
                                                 lr_mult={"fc8": 10, "layer4": 3, "layer4.1.conv2": 5})}
    assert not any(n.startswith(("conv1.", "bn1.", "layer1.")) for n in groups)  # frozen by upto
    assert groups["layer2.0.conv1.weight"]["lr"] == pytest.approx(0.01)
    assert groups["layer2.0.conv1.weight"]["weight_decay"] == 5e-4
    assert groups["layer2.0.bn1.weight"]["weight_decay"] == 0.0  # BatchNorm: no decay
    assert groups["layer2.0.bn1.bias"]["lr"] == pytest.approx(0.02)  # biases 2x, no decay
    assert groups["layer2.0.bn1.bias"]["weight_decay"] == 0.0
    assert groups["layer4.0.conv1.weight"]["lr"] == pytest.approx(0.03)  # a prefix
    assert groups["layer4.1.bn2.weight"]["lr"] == pytest.approx(0.03)
    assert groups["layer4.1.conv2.weight"]["lr"] == pytest.approx(0.05)  # the most specific key
    assert groups["fc.weight"]["lr"] == pytest.approx(0.1) and groups["fc.bias"]["lr"] == pytest.approx(0.2)
    head = {g["name"]: g["lr"] for g in param_groups(module.net, lr=0.01, weight_decay=5e-4,
                                                     lr_mult={"head": 10})}
    assert head["fc.weight"] == pytest.approx(0.1)
    trainable = [p for p in module.net.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)
    with pytest.raises(ConfigError, match=r"lr_mult names unknown layer\(s\) \['layer9'\].*valid layers: "
                                          r"\['conv1', 'bn1', 'relu', 'maxpool', 'layer1'"):
        param_groups(module.net, lr=0.01, weight_decay=5e-4, lr_mult={"layer9": 2})


def test_frozen_blocks_keep_batchnorm_statistics() -> None:
    module = _resnet_module(frozen=["layer1"])
    module.train()
    frozen_bn, tuned_bn = module.net.module.layer1[0].bn1, module.net.module.layer2[0].bn1
    assert not frozen_bn.training and tuned_bn.training
    stats = (frozen_bn.running_mean.clone(), tuned_bn.running_mean.clone())
    module(torch.randn(4, 3, 64, 64) * 50)
    assert torch.equal(frozen_bn.running_mean, stats[0])  # untouched
    assert not torch.equal(tuned_bn.running_mean, stats[1])
    assert not any(p.requires_grad for p in module.net.module.layer1.parameters())


def test_upto_and_reinit_by_name() -> None:
    net = build_network(RESNET)
    frozen, reinit = resolve(net, FreezeScheme("u", upto="layer1", reinit=["layer4.1"], valid=None))
    assert frozen[:3] == ["conv1", "bn1", "layer1.0.conv1"] and frozen[-1] == "layer1.1.bn2"
    assert len(frozen) == 2 + 8 and reinit == ["layer4.1"]
    with torch.no_grad():
        net.module.layer4[1].bn2.weight.fill_(3.0)
    kept, changed = net.module.layer4[0].conv1.weight.clone(), net.module.layer4[1].conv2.weight.clone()
    reinitialise(net, ["layer4.1"])  # reset_parameters() of every module under it
    assert torch.equal(net.module.layer4[0].conv1.weight, kept)
    assert not torch.equal(net.module.layer4[1].conv2.weight, changed)
    assert torch.equal(net.module.layer4[1].bn2.weight, torch.ones(512))


@pytest.mark.parametrize(("freeze", "message"), [
    ({"frozen": ["layer9"]}, r"freeze.frozen names unknown layer\(s\) \['layer9'\] in scheme 'x'; valid "
                             r"layers: \['conv1', 'bn1', 'layer1', 'layer1.0'"),
    ({"reinit": ["relu"]}, r"freeze.reinit names unknown layer\(s\) \['relu'\]"),
    ({"frozen": ["fc"]}, r"freeze scheme 'x' freezes the model's head 'fc'"),
    ({"upto": "fc"}, r"freezes the model's head 'fc'"),
    ({"frozen": [], "reinit": None}, r"freeze.reinit is null in scheme 'x'.*model.fc_layers"),
])
def test_freeze_schemes_are_checked_against_the_model(freeze: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _resnet_module(**freeze)


def _fake_checkpoint(path: Path, model: dict) -> Path:
    torch.save({"cnnft": {"arch": {}, "config": {"model": model}}, "state_dict": {}}, path)
    return path


@pytest.mark.parametrize("case", ["unknown_model", "misfit_weights", "unknown_layer", "frozen_head",
                                  "other_model_checkpoint", "caffenet_from_other_model"])
def test_bad_training_input_is_refused_before_anything_is_written(case: str, tiny_cfg, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    misfit = tmp_path / "misfit.pth"
    torch.save(SmallNet(channels=4).state_dict(), misfit)
    caffenet = _fake_checkpoint(tmp_path / "c.ckpt", {"family": "caffenet"})
    over, error, message = {
        "unknown_model": (["model=torchvision", "model.name=resnet5"], ConfigError,
                          r"model.name='resnet5' is not a torchvision classification model"),
        "misfit_weights": ([*CUSTOM, f"model.weights={misfit}"], CheckpointError,
                           r"misfit.pth do not fit the model: missing keys \[\], unexpected keys \[\], shape "
                           r"mismatches \['block.0.bias: file \(4,\) vs model \(8,\)'"),
        "unknown_layer": ([*CUSTOM, "freeze.frozen=[conv1]"], ConfigError,
                          r"unknown layer\(s\) \['conv1'\] in scheme 'all'; valid layers: \['stem', 'block', "
                          r"'block.0', 'fc'\]"),
        "frozen_head": ([*CUSTOM, "freeze.upto=fc"], ConfigError, r"freezes the model's head 'fc'"),
        "other_model_checkpoint": ([*CUSTOM, "stage=finetune",
                                    f"pretrained={caffenet}"],
                                   CheckpointError, r"c.ckpt holds a caffenet network; this run's model is "
                                                    r"tests.test_models.SmallNet"),
        "caffenet_from_other_model": (["stage=finetune", "pretrained=" + str(_fake_checkpoint(
            tmp_path / "r.ckpt", {"family": "torchvision", "name": "resnet18"}))], CheckpointError,
            r"r.ckpt holds a resnet18 network; this run's model is caffenet"),
    }[case]
    if case != "caffenet_from_other_model":  # another model is checked before the data are touched
        import cnnft.train

        def too_late(_cfg: object) -> None:
            raise AssertionError("the data were prepared before the model was checked")

        monkeypatch.setattr(cnnft.train, "prepare_demo_data", too_late)
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(tiny_cfg(*over, *SHORT, output_dir=out))
    assert not out.exists()


def test_a_sweep_over_models_and_schemes_composes() -> None:
    """``cnnft-train -m model=alexnet,resnet50 freeze=all,fc``: every job's scheme fits its model."""
    expected = {("alexnet", "fc"): (["features"], ["classifier.1", "classifier.4"]),
                ("resnet50", "fc"): (["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"], []),
                ("alexnet", "all"): ([], []), ("resnet50", "all"): ([], [])}
    GlobalHydra.instance().clear()
    nets = {m: build_network({**RESNET, "name": m, "input_size": 64}) for m in ("alexnet", "resnet50")}
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for (model, scheme), (frozen, reinit) in expected.items():
            cfg = compose("train", overrides=[f"model={model}", f"freeze={scheme}", "stage=finetune"])
            freeze = FreezeScheme(**dict(cfg.freeze), valid=None)
            assert resolve(nets[model], freeze) == (frozen, reinit), (model, scheme)


def test_reproduce_runs_the_pipeline_on_another_model(data_dir: Path, tmp_path: Path) -> None:
    """cnnft-reproduce model=custom ...: the same stages on the user's network; the report names the
    model and says the paper's numbers are CaffeNet's."""
    from cnnft.reproduce import reproduce

    root = tmp_path / "root"
    model = [*CUSTOM]
    tiny = [*TINY_RUN, *SHORT, *model, f"paths.data_dir={data_dir}", "progress=false", "probe.c_grid=[1.0]",
            "probe.folds=2", "batch_size=16"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("reproduce", overrides=[
            f"root={root}", "logger=csv", *model, "stages=[pretrain,finetune_all,analyze,report]",
            "networks.pretrained.analyses=[probe_cls]", "networks.finetune_all.analyses=[probe_cls]",
            "networks.random.analyses=[probe_cls]", "~networks.finetune_fc", "~networks.fifty_fifty",
            "~networks.control"])
    status = reproduce(cfg, tiny)
    assert all(v["status"] == "done" for v in status.values()), status
    arch = read_checkpoint(root / "finetune_all" / "checkpoints" / "last.ckpt")["cnnft"]["arch"]
    assert arch["name"] == "tests.test_models.SmallNet" and arch["num_classes"] == 21
    rows = json.loads((root / "analyze" / "finetune_all" / "results" / "probe_cls.json").read_text())["rows"]
    assert {r["layer"] for r in rows if r["class"] == "mAP"} == {"block", "pool"}
    md = (root / "report" / "report.md").read_text()
    assert "| **model** | `tests.test_models.SmallNet` |" in md
    assert "> **Model: tests.test_models.SmallNet.** The paper used CaffeNet" in md
    assert "(CaffeNet's: the paper used CaffeNet)" in md and "paper's numbers (CaffeNet)" in md
    # its layers in the paper's rows: pool5 = the unit layer, relu7 = the last probe layer
    assert "pool-5 = `block`, relu-7 = `pool`" in md
    margins = json.loads((root / "report" / "tables" / "baseline_margins.json").read_text())["rows"]
    image = {r["layer"]: r for r in margins
             if r["task"] == "image classification" and r["baseline"] == "random init"}
    assert image["pool5"]["margin"] is not None and image["relu7"]["margin"] is not None, image


def test_a_state_dict_of_another_model_is_wrapped_for_analysis(tmp_path: Path, data_dir: Path) -> None:
    """cnnft-reproduce pretrained=<a state dict of the model>: wrapped into a cnnft checkpoint
    that cnnft-analyze rebuilds exactly (``cnnft.checkpoint.wrap_state_dict``)."""
    from cnnft.checkpoint import wrap_state_dict

    torch.manual_seed(4)
    source = SmallNet(num_classes=7).eval()
    weights = tmp_path / "small.pth"
    torch.save(source.state_dict(), weights)
    cfg = compose_cfg([*TINY_DATA, *CUSTOM, "checkpoint=random"], tmp_path / "an", data_dir, name="analyze")
    node = OmegaConf.to_container(cfg.model, resolve=True)  # as cnnft-reproduce passes it
    wrapped = wrap_state_dict(read_checkpoint(weights), weights, node)
    assert wrapped["cnnft"]["arch"] == {"family": "custom", "name": "tests.test_models.SmallNet",
                                        "input_size": 40, "num_classes": 7, "head": "fc"}
    path = tmp_path / "network.ckpt"
    torch.save(wrapped, path)
    net, _, _, _ = load_network(str(path), cfg)
    x = torch.randn(2, 3, 40, 40) * 50
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), source(x / net.input_std))
    torch.save({"fc.weight": torch.zeros(7, 32)}, weights)
    with pytest.raises(CheckpointError, match=r"do not fit the model: missing keys \['block.0.bias'"):
        wrap_state_dict(read_checkpoint(weights), weights, node)


def test_a_run_from_before_the_model_group_resumes() -> None:
    """Resuming compares the run's identity keys; keys introduced since (freeze.upto,
    model.conv_layers, ...) at their old value do not make an older run another one."""
    from cnnft.train import RUN_IDENTITY, _select, without_introduced

    saved = {"freeze": {"name": "fc", "frozen": ["conv1"], "reinit": ["fc6"]}, "model": {"width": 0.25}}
    now = {"freeze": {**saved["freeze"], "upto": None},
           "model": {"width": 0.25, "family": "caffenet", "fc_layers": ["fc6", "fc7"],
                     "conv_layers": ["conv1", "conv2", "conv3", "conv4", "conv5"]}}
    kept = without_introduced(now, saved)
    assert all(_select(kept, k) == _select(saved, k) for k in RUN_IDENTITY)
    assert now["freeze"]["upto"] is None  # the given config is not changed
    moved = without_introduced({**now, "freeze": {**saved["freeze"], "upto": "conv3"}}, saved)
    assert _select(moved, "freeze") != _select(saved, "freeze")  # a new value is a different run


def test_snapshot_probes_of_a_custom_network(tiny_cfg, tmp_path: Path, data_dir: Path) -> None:
    """snapshot_eval on a user's module: probes of its own layers at each pretraining snapshot,
    during training and from its snapshots directory afterwards, with the same numbers."""
    from cnnft.analyze import analyze

    out = tmp_path / "pretrain"
    probe = ["probe.c_grid=[1.0]", "probe.folds=2"]
    train(tiny_cfg(*CUSTOM, *probe, "recipe.pretrain.max_steps=2", "recipe.pretrain.snapshots=[1,2]",
                   "analyses=[snapshot_eval]", output_dir=out))
    during = {(r["layer"], r["iteration"]): r["map"]
              for r in json.loads((out / "results" / "snapshot_eval.json").read_text())["rows"]}
    assert sorted(during) == [("block", 1), ("block", 2), ("pool", 1), ("pool", 2)]
    assert all(0 <= v <= 1 for v in during.values())
    cfg = compose_cfg([*TINY_DATA, *CUSTOM, *probe, "data.num_workers=0", "logger=csv", "progress=false",
                       f"checkpoint={out / 'snapshots'}", "analyses=[snapshot_eval]"],
                      tmp_path / "an", data_dir, name="analyze")
    analyze(cfg)
    after = {(r["layer"], r["iteration"]): r["map"]
             for r in json.loads((tmp_path / "an" / "results" / "snapshot_eval.json").read_text())["rows"]}
    assert after == pytest.approx(during)


@pytest.mark.parametrize(("model", "layers"), [([], "[pool5,relu7]"),
                                               (["model=vgg16"], "[features.30,classifier.4]"),
                                               (["model=resnet50"], "[layer4,avgpool]"),
                                               (CUSTOM, "[block,pool]")])
def test_random_networks_detection_runs_at_the_models_roles(model: list[str], layers: str) -> None:
    """cnnft-reproduce detects with the random network at the layers in pool5's and relu7's roles
    (the report's margins), named as the model names them."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("reproduce", overrides=model)
    assert list(cfg.networks.random.overrides.detection) == [f"layers={layers}"]
