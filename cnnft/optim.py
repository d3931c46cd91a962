"""Caffe's solver as PyTorch objects: per-layer lr multipliers, bias without weight decay,
SGD with momentum and a step learning-rate policy counted in iterations."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cnnft.errors import ConfigError
from cnnft.freeze import covers, head_of, inner, parameterised

#: Normalisation layers: their parameters (scale and shift) get no weight decay.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def layer_multipliers(model: nn.Module, lr_mult: Mapping[str, float],
                      first_conv: str | None = None) -> dict[str, float]:
    """Each parameterised layer's lr multiplier: the value of the most specific key of
    ``lr_mult`` naming it or a module above it (1 without). The key ``head`` names the model's
    classifier; so does ``fc8`` (CaffeNet's head, the fine-tuning recipe's key) on a model
    without a layer of that name; ``first_conv`` names ``first_conv`` (the model config's
    ``first_conv``: conv1 in CaffeNet, the demo recipe's key). Unknown keys are an error listing
    the valid names."""
    layers = parameterised(model)
    names = [n for n, _ in inner(model).named_modules() if n]
    head = head_of(model)

    def target(key: str) -> str:
        if key == "first_conv":
            if not first_conv:
                raise ConfigError("module.optim.lr_mult names first_conv, but the model config sets "
                                  "no first_conv; expected model.first_conv=<its first convolution>")
            return first_conv
        return head if key == "head" or (key == "fc8" and "fc8" not in names) else key

    keys = {target(k): float(v) for k, v in lr_mult.items()}
    bad = [k for k in lr_mult if target(k) not in names]
    if bad:
        raise ConfigError(f"module.optim.lr_mult names unknown layer(s) {bad}; expected 'head' (the "
                          f"classifier, {head}) or layer names; valid layers: {names}")
    out = {}
    for layer in layers:
        matching = [k for k in keys if covers(k, layer)]
        out[layer] = keys[max(matching, key=len)] if matching else 1.0
    return out


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 lr_mult: Mapping[str, float] | None = None, first_conv: str | None = None) -> list[dict]:
    """One group per trainable weight and bias, layer by layer in definition order: weights
    ``lr*m``, biases ``2*lr*m`` and no decay, where ``m`` is the layer's multiplier
    (``layer_multipliers``: Caffe's lr_mult 1/2, decay_mult 1/0). Normalisation layers
    (BatchNorm, LayerNorm, GroupNorm) get no weight decay on either. Each group records its
    multiplier as ``lr_mult``, so the base rate is ``group["lr"] / group["lr_mult"]``.
    A model's ``weight_lr_scale`` (``CaffeNet.weight_lr_scale``: layer -> s) further multiplies
    that layer's weight rate by ``s`` and divides its weight decay by ``s``."""
    mults = layer_multipliers(model, dict(lr_mult or {}), first_conv)
    scale = dict(getattr(model, "weight_lr_scale", {}))
    groups = []
    for name, layer in inner(model).named_modules():
        if name not in mults:
            continue
        m, s = mults[name], scale.get(name, 1.0)
        decay = 0.0 if isinstance(layer, NORM_LAYERS) else weight_decay
        for pname, param in layer.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if pname == "bias":
                groups.append({"name": f"{name}.bias", "params": [param], "lr": 2 * lr * m,
                               "lr_mult": 2 * m, "weight_decay": 0.0})
            else:
                groups.append({"name": f"{name}.{pname}", "params": [param], "lr": lr * m * s,
                               "lr_mult": m * s, "weight_decay": decay / s})
    return groups


def caffe_sgd(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
              lr_step: int, gamma: float = 0.1, lr_mult: Mapping[str, float] | None = None,
              first_conv: str | None = None) -> dict:
    """Lightning's ``configure_optimizers`` dict: SGD + step lr every ``lr_step`` iterations."""
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, lr_mult=lr_mult, first_conv=first_conv)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=gamma)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
