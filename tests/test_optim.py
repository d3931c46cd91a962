"""Caffe's solver settings (lr/decay multipliers, step policy) and freezing schemes."""

from __future__ import annotations

import pytest
import torch

from cnnft.errors import ConfigError
from cnnft.freeze import FreezeScheme, apply_freeze, frozen_modules
from cnnft.models.caffenet import INPUT_STD, PARAM_LAYERS, CaffeNet
from cnnft.optim import caffe_sgd, param_groups


def _model() -> CaffeNet:
    torch.manual_seed(0)
    return CaffeNet(6, width=0.125, input_size=67)


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_param_groups_lr_and_decay_multipliers() -> None:
    model = _model()
    groups = _by_name(param_groups(model, lr=0.01, weight_decay=5e-4, lr_mult={"fc8": 10}))
    assert list(groups) == [f"{n}.{k}" for n in PARAM_LAYERS for k in ("weight", "bias")]
    for name in PARAM_LAYERS:
        w, b = groups[f"{name}.weight"], groups[f"{name}.bias"]
        m = 10.0 if name == "fc8" else 1.0
        assert w["lr"] == pytest.approx(0.01 * m)
        assert b["lr"] == pytest.approx(0.02 * m)
        assert w["weight_decay"] == pytest.approx(5e-4)
        assert b["weight_decay"] == 0.0
        assert w["params"] == [getattr(model, name).weight]
        assert b["params"] == [getattr(model, name).bias]
    assert groups["fc8.weight"]["lr"] == pytest.approx(0.1)
    assert groups["fc8.bias"]["lr"] == pytest.approx(0.2)
    # every trainable parameter is in exactly one group
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_kaiming_conv1_weights_learn_as_on_unit_scale_inputs() -> None:
    torch.manual_seed(0)
    model = CaffeNet(6, width=0.125, input_size=67, init="kaiming")
    groups = _by_name(param_groups(model, lr=0.01, weight_decay=5e-4, lr_mult={"fc8": 10}))
    w = groups["conv1.weight"]
    assert w["lr"] == pytest.approx(0.01 / INPUT_STD**2) and w["lr_mult"] == pytest.approx(INPUT_STD**-2)
    assert w["weight_decay"] == pytest.approx(5e-4 * INPUT_STD**2)  # per-step decay lr * wd, as others
    assert groups["conv1.bias"]["lr"] == pytest.approx(0.02)  # the bias is not in pixel units
    assert groups["conv2.weight"]["lr"] == pytest.approx(0.01)
    assert groups["fc8.weight"]["lr"] == pytest.approx(0.1)


def test_first_conv_key_names_the_models_first_convolution() -> None:
    """The demo recipe's lr_mult {first_conv: 10} is conv1 x10 in CaffeNet; a model config
    without first_conv is told what to set."""
    model = _model()
    alias = param_groups(model, lr=0.01, weight_decay=5e-4, lr_mult={"first_conv": 10}, first_conv="conv1")
    named = param_groups(model, lr=0.01, weight_decay=5e-4, lr_mult={"conv1": 10})
    assert [(g["name"], g["lr"]) for g in alias] == [(g["name"], g["lr"]) for g in named]
    assert _by_name(alias)["conv1.weight"]["lr"] == pytest.approx(0.1)
    assert _by_name(alias)["conv2.weight"]["lr"] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match=r"lr_mult names first_conv, but the model config sets no "
                                          r"first_conv; expected model.first_conv="):
        param_groups(model, lr=0.01, weight_decay=5e-4, lr_mult={"first_conv": 10})


def test_frozen_layers_leave_the_optimizer() -> None:
    model = _model().train()
    frozen = ("conv1", "conv2", "conv3")
    apply_freeze(model, FreezeScheme("convs", frozen=frozen))
    groups = _by_name(param_groups(model, lr=0.01, weight_decay=5e-4))
    assert {g.split(".")[0] for g in groups} == set(PARAM_LAYERS) - set(frozen)
    assert len(groups) == 2 * (len(PARAM_LAYERS) - len(frozen))
    for name in PARAM_LAYERS:
        layer = getattr(model, name)
        is_frozen = name in frozen
        assert all(p.requires_grad is not is_frozen for p in layer.parameters()), name
        assert layer.training is not is_frozen, name
    assert frozen_modules(model, frozen) == [model.conv1, model.conv2, model.conv3]
    # the optimizer built from the groups never touches the frozen layers
    before = {n: getattr(model, n).weight.detach().clone() for n in ("conv1", "conv5")}
    opt = caffe_sgd(model, lr=0.01, momentum=0.9, weight_decay=5e-4, lr_step=10)["optimizer"]
    model(torch.randn(2, 3, 67, 67)).square().sum().backward()
    opt.step()
    assert model.conv1.weight.grad is None
    assert torch.equal(model.conv1.weight, before["conv1"])
    assert not torch.equal(model.conv5.weight, before["conv5"])


def test_reinit_layers_change_and_follow_caffe_init() -> None:
    # fc6: 2304 -> 1024, enough for statistics; init_gain=1 gives Caffe's own std at any width
    model = CaffeNet(6, width=0.25, input_size=227, init_gain=1.0)
    with torch.no_grad():  # pretend these were loaded from a pretrained net
        for name in PARAM_LAYERS:
            getattr(model, name).weight.fill_(0.3)
            getattr(model, name).bias.fill_(-2.0)
    torch.manual_seed(1)
    apply_freeze(model, FreezeScheme("fc", frozen=("conv1", "conv2", "conv3", "conv4", "conv5"),
                                     reinit=("fc6", "fc7")))
    for name, std in (("fc6", 0.005), ("fc7", 0.005)):
        layer = getattr(model, name)
        w = layer.weight.detach().double()
        assert (w != 0.3).all()
        assert abs(w.std().item() / std - 1) < 0.05
        assert abs(w.mean().item()) < 0.05 * std
        assert torch.equal(layer.bias, torch.ones_like(layer.bias))
        assert all(p.requires_grad for p in layer.parameters())
    for name in ("conv1", "conv5", "fc8"):  # not re-initialised
        assert (getattr(model, name).weight == 0.3).all()
        assert (getattr(model, name).bias == -2.0).all()


def test_reinit_conv_and_fc8_biases_zero() -> None:
    model = _model()
    with torch.no_grad():
        model.conv3.bias.fill_(5.0)
        model.fc8.bias.fill_(5.0)
        model.conv4.bias.fill_(5.0)
    apply_freeze(model, FreezeScheme("r", reinit=("conv3", "conv4", "fc8")))
    assert (model.conv3.bias == 0).all() and (model.fc8.bias == 0).all()
    assert (model.conv4.bias == 1).all()


def test_unknown_layer_in_scheme_raises() -> None:
    with pytest.raises(ConfigError, match="conv6") as info:
        FreezeScheme("bad", frozen=("conv1", "conv6"))
    for name in PARAM_LAYERS:
        assert repr(name) in str(info.value)
    with pytest.raises(ConfigError, match="relu6"):
        FreezeScheme("bad", reinit=["relu6"])


def test_frozen_and_reinit_overlap_raises() -> None:
    with pytest.raises(ConfigError, match="fc6"):
        FreezeScheme("both", frozen=("conv1", "fc6"), reinit=("fc6", "fc7"))
    scheme = FreezeScheme("ok", frozen=["conv1"], reinit=["fc6"])  # lists become tuples
    assert scheme.frozen == ("conv1",) and scheme.reinit == ("fc6",)


def test_caffe_sgd_step_policy() -> None:
    model = _model()
    conf = caffe_sgd(model, lr=0.01, momentum=0.9, weight_decay=5e-4, lr_step=4,
                     lr_mult={"fc8": 10})
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    names = [g["name"] for g in opt.param_groups]
    seen = []
    for _ in range(9):
        lrs = dict(zip(names, (g["lr"] for g in opt.param_groups)))
        seen.append((lrs["conv1.weight"], lrs["conv1.bias"], lrs["fc8.weight"]))
        opt.step()  # no grads: a no-op, but keeps the scheduler's order check quiet
        sched.step()
    expected = [(0.01, 0.02, 0.1)] * 4 + [(0.001, 0.002, 0.01)] * 4 + [(1e-4, 2e-4, 1e-3)]
    assert seen == [pytest.approx(e) for e in expected]
