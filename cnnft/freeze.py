"""Freezing schemes: which layers keep their weights and which are re-initialised.

A scheme is data (``conf/freeze/*.yaml``): ``frozen`` layers get no gradient, are left out of
the optimizer (Caffe's lr_mult 0) and stay in eval mode; ``reinit`` layers are re-initialised
with Caffe's initialisation after the pretrained weights are loaded. Paper Sec. 3.3:
``all`` tunes everything, ``fc`` freezes conv1-5 and re-initialises fc6/fc7.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from cnnft.errors import ConfigError
from cnnft.models.caffenet import PARAM_LAYERS, caffe_init_


@dataclass(frozen=True)
class FreezeScheme:
    """``name`` for run names and tags; ``frozen``/``reinit``: parameterised layer names."""

    name: str = "all"
    frozen: tuple[str, ...] = field(default_factory=tuple)
    reinit: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "reinit", tuple(self.reinit))
        for key in ("frozen", "reinit"):
            bad = [n for n in getattr(self, key) if n not in PARAM_LAYERS]
            if bad:
                raise ConfigError(f"freeze.{key} names unknown layer(s) {bad} in scheme "
                                  f"{self.name!r}; valid layers: {list(PARAM_LAYERS)}")
        both = sorted(set(self.frozen) & set(self.reinit))
        if both:
            raise ConfigError(f"freeze scheme {self.name!r} both freezes and re-initialises "
                              f"{both}; a frozen random layer would never learn")


def apply_freeze(model: nn.Module, scheme: FreezeScheme) -> None:
    """Re-initialise ``scheme.reinit`` and stop gradients of ``scheme.frozen``, in place."""
    caffe_init_(model, scheme.reinit)
    for name in scheme.frozen:
        layer = getattr(model, name)
        layer.requires_grad_(False)
        layer.eval()


def frozen_modules(model: nn.Module, frozen: Sequence[str]) -> list[nn.Module]:
    return [getattr(model, name) for name in frozen]
