"""Build the network a ``model`` config node describes (``conf/model/*.yaml``).

Families:

- ``caffenet``: cnnft's CaffeNet (``width``, ``input_size``, ``init``).
- ``torchvision``: ``torchvision.models.get_model(model.name, weights=None, **model.kwargs)``;
  ``alexnet``, ``vgg16`` and ``resnet50`` have their own configs, any other classification model
  is ``model=torchvision model.name=<name>``.
- ``custom``: a user's ``nn.Module``, ``model._target_=my.module.Net`` built with
  ``model.kwargs``.

Non-CaffeNet networks are wrapped in ``TappedNet`` (taps by module name). Weights come from a
local file (``model.weights``: a state dict, e.g. a torchvision weights file the user already
has); nothing is downloaded. ``num_classes`` replaces the classifier (``model.head``, default: the
last ``nn.Linear``) with a new layer of that width, initialised as R-CNN's new fc8 (Gaussian std
0.01, bias 0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cnnft.errors import CheckpointError, ConfigError
from cnnft.models.caffenet import CaffeNet
from cnnft.models.tapped import TappedNet

#: ``model.family`` values.
FAMILIES = ("caffenet", "torchvision", "custom")


def family(model: Mapping[str, Any]) -> str:
    """The node's ``family`` (checkpoints from before the model group: ``caffenet``)."""
    fam = model.get("family") or "caffenet"
    if fam not in FAMILIES:
        raise ConfigError(f"model.family={fam!r}; expected one of {list(FAMILIES)}")
    return str(fam)


def model_label(model: Mapping[str, Any]) -> str:
    """How reports and messages name the model: ``caffenet``, ``resnet50``, ``my.module.Net``."""
    fam = family(model)
    if fam == "custom":
        return str(model.get("_target_") or "custom")
    return str(model.get("name") or fam)


def torchvision_builder(name: str) -> Any:
    """torchvision's builder of classification model ``name``, or a ConfigError listing them."""
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        raise ConfigError(f"model.name={name!r} is not a torchvision classification model; "
                          f"expected one of {known}")
    return tvm.get_model_builder(name)


def custom_factory(model: Mapping[str, Any]) -> Any:
    """The class (or factory) ``model._target_`` names, or a ConfigError."""
    from hydra.utils import get_object

    target = model.get("_target_")
    if not target or target == "???":
        raise ConfigError("model=custom needs model._target_=<module.Class> of your nn.Module")
    try:
        return get_object(str(target))
    except Exception as e:  # Hydra raises ImportError or its own error types
        raise ConfigError(f"model._target_={target!r} cannot be imported: {e}") from e


def _custom(model: Mapping[str, Any]) -> nn.Module:
    target = model.get("_target_")
    factory = custom_factory(model)
    module = factory(**dict(model.get("kwargs") or {}))
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model._target_={target!r} built a {type(module).__name__}; expected an nn.Module")
    return module


def build_network(model: Mapping[str, Any], num_classes: int | None = None, *,
                  load_weights: bool = True) -> nn.Module:
    """The network of ``model`` (a resolved ``model`` node), with ``model.weights`` loaded when
    ``load_weights`` and a head of ``num_classes`` (None: as built / as in the weights).

    CaffeNet is built directly with ``num_classes`` (default 1000); its ``model.weights`` load
    through ``cnnft.checkpoint.load_pretrained`` (cnnft or Caffe layout: ``pretrained_format``).
    """
    fam = family(model)
    size = int(model["input_size"])
    weights = model.get("weights") if load_weights else None
    if fam == "caffenet":
        net = CaffeNet(num_classes or 1000, width=float(model.get("width", 1.0)), input_size=size,
                       init=str(model.get("init") or "caffe"))
        if weights:
            from cnnft.checkpoint import load_pretrained

            load_pretrained(net, weights, skip=("fc8",) if num_classes else (),
                            fmt=str(model.get("pretrained_format") or "cnnft"))
        return net
    if fam == "torchvision":
        module = torchvision_builder(str(model.get("name")))(weights=None, **dict(model.get("kwargs") or {}))
    else:
        module = _custom(model)
    net = TappedNet(module, input_size=size, input_std=model.get("input_std"), family=fam,
                    name=model_label(model), head=model.get("head"))
    if weights:
        skip = () if num_classes is None else (head_name(net),)  # the head is replaced below
        load_state(net.module, read_weights(weights), str(weights), skip=skip)
    if num_classes is not None:
        replace_head(net, num_classes)
    return net


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a local file (``weights_only=True``); a clear error otherwise."""
    from cnnft.checkpoint import read_checkpoint

    state = read_checkpoint(path)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        raise CheckpointError(f"model.weights={path} is a training checkpoint; expected a plain "
                              "state dict (torch.save(model.state_dict(), path)); cnnft checkpoints "
                              "go to checkpoint=")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"model.weights={path} is not a state dict: entries {bad[:8]} are not tensors")
    return state


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: str,
               skip: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` exactly (but parameters under ``skip``); the error names the
    file, the missing and unexpected keys and the shape mismatches."""
    def skipped(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in skip)

    own = {k: v for k, v in module.state_dict().items() if not skipped(k)}
    given = {k: v for k, v in state.items() if not skipped(k)}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = sorted(f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(given) if given[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"weights {path} do not fit the model: missing keys {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                              f"{' ...' if len(unexpected) > 10 else ''}, shape mismatches {shapes[:10]}")
    module.load_state_dict(given, strict=False)


def head_name(net: TappedNet) -> str:
    """``model.head``, or the last ``nn.Linear`` of the network."""
    if net.head:
        if net.head not in dict(net.module.named_modules()):
            raise ConfigError(f"model.head={net.head!r} is not a layer of {net.model_name}; valid "
                              f"layers: {net.layer_names}")
        return net.head
    linear = [n for n, m in net.module.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(f"model {net.model_name} has no nn.Linear classifier; set model.head "
                          "to the layer to replace")
    return linear[-1]


def replace_head(net: TappedNet, num_classes: int, *, fresh: bool = False) -> str:
    """Give ``net`` a new classifier of ``num_classes`` outputs (kept if it has that width already,
    unless ``fresh``: fine-tuning's new head)."""
    name = head_name(net)
    old = net.module.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"model.head={name!r} is a {type(old).__name__}; expected an nn.Linear")
    if old.out_features == num_classes and not fresh:
        return name
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.01)
        if new.bias is not None:
            new.bias.zero_()
    parent, _, child = name.rpartition(".")
    setattr(net.module.get_submodule(parent) if parent else net.module, child, new)
    net._calls = None
    return name


def validate_model(model: Mapping[str, Any]) -> None:
    """Check the ``model`` node names a model that exists (family, torchvision name, importable
    ``_target_``) without building it: a clear error before a run writes anything."""
    fam = family(model)
    if fam == "torchvision":
        torchvision_builder(str(model.get("name")))
    elif fam == "custom":
        custom_factory(model)


def check_same_model(ckpt: Mapping[str, Any], path: str | os.PathLike[str], model: Mapping[str, Any]) -> None:
    """Raise unless the cnnft checkpoint ``ckpt`` holds a network of ``model`` (family and name;
    checkpoints from before the model group hold CaffeNet)."""
    info = ckpt.get("cnnft")
    if not isinstance(info, Mapping):
        return
    saved = (info.get("config") or {}).get("model") or {}
    if (family(saved), model_label(saved)) != (family(model), model_label(model)):
        raise CheckpointError(f"checkpoint {path} holds a {model_label(saved)} network; this run's "
                              f"model is {model_label(model)}: expected a checkpoint of the same model "
                              "(or set model= to match it)")


def starting_weights(path: str | os.PathLike[str], model: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict (module names of the wrapped network) a training stage starts from:
    a cnnft checkpoint of the same model (``pretrained=``) or a plain state dict file
    (``model.weights``, or ``pretrained=`` naming one)."""
    from cnnft.checkpoint import model_state, read_checkpoint

    ckpt = read_checkpoint(path)
    if "cnnft" not in ckpt:
        return read_weights(path)
    check_same_model(ckpt, path, model)
    prefix = "module."
    return {k[len(prefix):]: v for k, v in model_state(ckpt, path).items() if k.startswith(prefix)}


def training_network(model: Mapping[str, Any], num_classes: int,
                     pretrained: str | os.PathLike[str] | None = None) -> TappedNet:
    """The (non-CaffeNet) network a training stage starts from. Without weights (pretraining):
    the model as built, its head ``num_classes`` wide. With ``pretrained`` (else ``model.weights``):
    those weights in every layer but the head, then a new ``num_classes``-way head initialised as
    R-CNN's fc8 (fine-tuning)."""
    net = build_network(model, load_weights=False)
    source = pretrained or model.get("weights")
    if not source:
        replace_head(net, num_classes)
        return net
    load_state(net.module, starting_weights(source, model), str(source), skip=(head_name(net),))
    replace_head(net, num_classes, fresh=True)
    return net


def wrap_weights(path: str | os.PathLike[str], model: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict file of ``model`` (or a cnnft checkpoint of it) as a cnnft checkpoint that
    ``cnnft-analyze`` reads: the network's weights under ``net.module.``, the architecture (head
    width from the file), the model config and the source file. Checked against the model."""
    state = starting_weights(path, model)
    net = build_network(model, load_weights=False)
    head = head_name(net)
    if f"{head}.weight" not in state:
        raise CheckpointError(f"weights {path} have no {head}.weight (the head of {model_label(model)}); "
                              "expected a state dict of the whole network")
    replace_head(net, int(state[f"{head}.weight"].shape[0]))
    load_state(net.module, state, str(path))
    arch = {"family": family(model), "name": model_label(model), "input_size": net.input_size,
            "num_classes": int(state[f"{head}.weight"].shape[0]), "head": head}
    return {"cnnft": {"arch": arch, "config": {"model": dict(model)}, "source": str(path)},
            "state_dict": {f"net.module.{k}": v for k, v in net.module.state_dict().items()},
            "global_step": None}


__all__ = ["FAMILIES", "build_network", "check_same_model", "family", "head_name", "load_state",
           "model_label", "read_weights", "replace_head", "starting_weights", "torchvision_builder",
           "training_network", "validate_model", "wrap_weights"]
