"""Caffe's solver as PyTorch objects: per-layer lr multipliers, bias without weight decay,
SGD with momentum and a step learning-rate policy counted in iterations."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cnnft.models.caffenet import PARAM_LAYERS


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 lr_mult: Mapping[str, float] | None = None) -> list[dict]:
    """One group per trainable weight and bias: weights ``lr*m``, biases ``2*lr*m`` and no decay,
    where ``m = lr_mult.get(layer, 1)`` (Caffe's lr_mult 1/2, decay_mult 1/0). Each group
    records its multiplier as ``lr_mult``, so the base rate is ``group["lr"] / group["lr_mult"]``.
    A model's ``weight_lr_scale`` (``CaffeNet.weight_lr_scale``: layer -> s) further multiplies
    that layer's weight rate by ``s`` and divides its weight decay by ``s``."""
    lr_mult = dict(lr_mult or {})
    scale = dict(getattr(model, "weight_lr_scale", {}))
    groups = []
    for name in PARAM_LAYERS:
        layer, m, s = getattr(model, name), lr_mult.get(name, 1.0), scale.get(name, 1.0)
        if layer.weight.requires_grad:
            groups.append({"name": f"{name}.weight", "params": [layer.weight], "lr": lr * m * s,
                           "lr_mult": m * s, "weight_decay": weight_decay / s})
        if layer.bias.requires_grad:
            groups.append({"name": f"{name}.bias", "params": [layer.bias], "lr": 2 * lr * m,
                           "lr_mult": 2 * m, "weight_decay": 0.0})
    return groups


def caffe_sgd(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
              lr_step: int, gamma: float = 0.1, lr_mult: Mapping[str, float] | None = None
              ) -> dict:
    """Lightning's ``configure_optimizers`` dict: SGD + step lr every ``lr_step`` iterations."""
    opt = torch.optim.SGD(param_groups(model, lr=lr, weight_decay=weight_decay, lr_mult=lr_mult),
                          lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=gamma)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
