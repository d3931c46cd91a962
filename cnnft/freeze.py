"""Freezing schemes: which layers keep their weights and which are re-initialised.

A scheme is data (``conf/freeze/*.yaml``): ``frozen`` layers get no gradient, are left out of
the optimizer (Caffe's lr_mult 0) and stay in eval mode (a BatchNorm inside a frozen block keeps
its running statistics); ``reinit`` layers are re-initialised after the pretrained weights are
loaded (CaffeNet: Caffe's initialisation; any other network: each module's
``reset_parameters()``). Paper Sec. 3.3: ``all`` tunes everything, ``fc`` freezes conv1-5 and
re-initialises fc6/fc7 (for any model: ``model.conv_layers`` frozen, ``model.fc_layers``
re-initialised).

Layers are module names as the model prints them (``conv3``, ``layer1``, ``features.10``); a
name covers every module under it. ``upto`` freezes every parameterised module up to and
including that one, in definition order (``upto: layer3``: the stem, layer1, layer2, layer3).
Names are checked against the model (the error lists the valid ones); a scheme that freezes the
model's head (the new classifier of fine-tuning) is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from cnnft.errors import ConfigError
from cnnft.models.caffenet import PARAM_LAYERS, CaffeNet, caffe_init_


@dataclass(frozen=True)
class FreezeScheme:
    """``name`` for run names and tags; ``frozen``/``reinit``: layer names; ``upto``: freeze
    every parameterised layer up to and including this one."""

    name: str = "all"
    frozen: tuple[str, ...] = field(default_factory=tuple)
    reinit: tuple[str, ...] = field(default_factory=tuple)
    upto: str | None = None
    #: the layer names the scheme may use (CaffeNet's by default; None: checked against the
    #: model later, by ``resolve``)
    valid: tuple[str, ...] | None = field(default=PARAM_LAYERS, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, source in (("frozen", "model.conv_layers"), ("reinit", "model.fc_layers")):
            if getattr(self, key) is None:
                raise ConfigError(f"freeze.{key} is null in scheme {self.name!r} (scheme fc reads it from "
                                  f"{source}); set {source} (or freeze.{key}) to a list of the model's "
                                  "layer names")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "reinit", tuple(self.reinit))
        both = sorted(set(self.frozen) & set(self.reinit))
        if both:
            raise ConfigError(f"freeze scheme {self.name!r} both freezes and re-initialises "
                              f"{both}; a frozen random layer would never learn")
        if self.valid is not None:
            check_names(self, self.valid)


def check_names(scheme: FreezeScheme, valid: Sequence[str]) -> None:
    """Raise naming the scheme's layers that are not in ``valid``, and listing the valid ones."""
    for key, names in (("frozen", scheme.frozen), ("reinit", scheme.reinit),
                       ("upto", (scheme.upto,) if scheme.upto else ())):
        bad = [n for n in names if n not in valid]
        if bad:
            raise ConfigError(f"freeze.{key} names unknown layer(s) {bad} in scheme {scheme.name!r}; "
                              f"valid layers: {list(valid)}")


def inner(model: nn.Module) -> nn.Module:
    """The network whose module names a scheme uses (a ``TappedNet``'s wrapped module)."""
    from cnnft.models.tapped import TappedNet

    return model.module if isinstance(model, TappedNet) else model


def parameterised(model: nn.Module) -> list[str]:
    """Names of the modules with parameters of their own, in definition order."""
    return [n for n, m in inner(model).named_modules()
            if n and next(m.parameters(recurse=False), None) is not None]


def covers(prefix: str, name: str) -> bool:
    """``prefix`` names module ``name`` or a module above it (``layer1`` covers ``layer1.0.bn1``)."""
    return name == prefix or name.startswith(prefix + ".")


def freezable(model: nn.Module) -> list[str]:
    """The names a scheme may use on ``model``: CaffeNet's parameterised layers; for any other
    network every module with parameters (its own or below it), in definition order."""
    params = parameterised(model)
    if isinstance(model, CaffeNet):
        return params
    return [n for n, _ in inner(model).named_modules() if n and any(covers(n, p) for p in params)]


def head_of(model: nn.Module) -> str:
    """The model's classifier layer: CaffeNet's fc8, a ``TappedNet``'s head."""
    if isinstance(model, CaffeNet):
        return "fc8"
    from cnnft.models.build import head_name

    return head_name(model)  # type: ignore[arg-type]


def resolve(model: nn.Module, scheme: FreezeScheme) -> tuple[list[str], list[str]]:
    """The scheme's frozen and re-initialised layer names on ``model`` (``upto`` expanded into
    the parameterised layers it covers), after checking every name against the model."""
    params = parameterised(model)
    check_names(scheme, freezable(model))
    frozen = list(scheme.frozen)
    if scheme.upto:
        order = [n for n, _ in inner(model).named_modules()]
        start = order.index(scheme.upto)
        end = start + 1 + sum(1 for n in order[start + 1:] if covers(scheme.upto, n))
        frozen += [p for p in params if order.index(p) < end and not any(covers(f, p) for f in frozen)]
    clash = sorted({f for f in frozen for r in scheme.reinit if covers(f, r) or covers(r, f)})
    if clash:
        raise ConfigError(f"freeze scheme {scheme.name!r} both freezes and re-initialises {clash}; "
                          "a frozen random layer would never learn")
    head = head_of(model)
    if any(covers(f, head) or covers(head, f) for f in frozen):
        raise ConfigError(f"freeze scheme {scheme.name!r} freezes the model's head {head!r} (frozen: "
                          f"{frozen}); the new classifier must learn: freeze the layers below it")
    return frozen, list(scheme.reinit)


def reinitialise(model: nn.Module, names: Sequence[str]) -> None:
    """CaffeNet: Caffe's initialisation; any other network: ``reset_parameters()`` of every
    module under each name."""
    if isinstance(model, CaffeNet):
        caffe_init_(model, names)
        return
    for name in names:
        for module in inner(model).get_submodule(name).modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def apply_freeze(model: nn.Module, scheme: FreezeScheme) -> list[str]:
    """Re-initialise ``scheme.reinit`` and stop gradients of the frozen layers, in place; return
    the frozen layer names (``resolve``)."""
    frozen, reinit = resolve(model, scheme)
    reinitialise(model, reinit)
    for layer in frozen_modules(model, frozen):
        layer.requires_grad_(False)
        layer.eval()
    return frozen


def frozen_modules(model: nn.Module, frozen: Sequence[str]) -> list[nn.Module]:
    return [inner(model).get_submodule(name) for name in frozen]
