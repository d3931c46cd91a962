"""Any ``nn.Module`` with CaffeNet's tap interface: ``layer_names``, ``check_layers``,
``forward_taps``.

``TappedNet`` wraps a network (a torchvision model, a user's own module) and taps any of its
modules by its dotted name (``layer3``, ``features.12``, ``layer4.2.conv3``) with forward hooks:
one forward pass serves every tap, and the pass stops as soon as the last tapped module has run.
Hooks rather than ``torchvision.models.feature_extraction``: they work on any module, including
ones with data-dependent control flow that FX cannot trace, and their names are the module
names a user sees in ``print(model)``. A module that runs more than once per forward pass (a
ReLU shared within a torchvision ResNet block) has no single output: tapping it is an error that
names its parent instead. Tapped outputs are cloned, so a later in-place op (``ReLU(inplace=True)``
after a tapped conv) cannot change them.

Inputs arrive as cnnft makes them: 0-255 pixels minus ``model.mean``. ``input_std`` (per channel,
on the 0-255 scale) divides them first, so a torchvision model sees the inputs its weights were
trained on (``(x/255 - mean)/std``); CaffeNet and Caffe-style models use none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from cnnft.errors import ConfigError


class _Stop(Exception):
    """Raised by a hook once every tap is filled: the rest of the forward pass is skipped."""


class TappedNet(nn.Module):
    """``module`` with taps by module name.

    Args:
        module: the network (its ``forward`` takes a ``[N, 3, S, S]`` batch).
        input_size: side of the square input the network is run on.
        input_std: per-channel divisor of the mean-subtracted 0-255 inputs, or None.
        family: the model family (``torchvision``, ``custom``) for messages and reports.
        name: the model's name (``resnet50``, ``my.module.Net``).
        head: name of the classifier layer (replaced when fine-tuning), or None.
    """

    def __init__(self, module: nn.Module, *, input_size: int, input_std: Sequence[float] | None = None,
                 family: str = "custom", name: str = "", head: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.input_size, self.family, self.model_name, self.head = int(input_size), family, name, head
        std = torch.tensor([1.0, 1.0, 1.0] if input_std is None else list(input_std), dtype=torch.float32,
                           device="cpu")  # checked on the host even when built on the meta device
        if std.shape != (3,) or not bool((std > 0).all()):
            raise ConfigError(f"model.input_std={input_std}; expected three positive floats (0-255 scale)")
        self.register_buffer("input_std", std.view(1, 3, 1, 1), persistent=False)
        self._calls: dict[str, int] | None = None

    def extra_repr(self) -> str:  # part of the feature caches' key (cnnft.hashing.layer_digests)
        return (f"family={self.family}, name={self.model_name}, input_size={self.input_size}, "
                f"input_std={self.input_std.flatten().tolist()}")

    # -------------------------------------------------------------- names

    @property
    def layer_names(self) -> list[str]:
        """Every tappable module name (dotted), in definition order."""
        return [name for name, _ in self.module.named_modules() if name]

    def check_layers(self, names: Iterable[str]) -> list[str]:
        """Return ``names`` as a list, or raise listing the valid layer names."""
        names = list(names)
        modules = dict(self.module.named_modules())
        unknown = [n for n in names if not n or n not in modules]
        if unknown:
            raise ConfigError(f"unknown layer(s) {unknown} for model {self.model_name or self.family}; "
                              f"valid layers: {self.layer_names}")
        calls = self.call_counts()
        shared = {n: calls.get(n, 0) for n in names if calls.get(n, 0) != 1}
        if shared:
            text = ", ".join(f"{n} runs {c} times" for n, c in shared.items())
            raise ConfigError(f"layer(s) of model {self.model_name or self.family} without one output "
                              f"per forward pass ({text}); tap a module that runs once, such as "
                              f"{sorted({n.rpartition('.')[0] or n for n in shared})}")
        return names

    def call_counts(self) -> dict[str, int]:
        """How many times each module runs in one forward pass (from one pass on a zero image)."""
        if self._calls is None:
            self._calls = {name: 0 for name in self.layer_names}
            for name, _ in self.trace():
                self._calls[name] += 1
        return self._calls

    def trace(self) -> list[tuple[str, tuple[int, ...] | None]]:
        """``(module name, output shape without the batch axis)`` for every module call of one
        forward pass on a zero image, in execution order (shape None: not a tensor)."""
        seen: list[tuple[str, tuple[int, ...] | None]] = []

        def hook(name: str):
            def record(_module: nn.Module, _inputs: object, output: object) -> None:
                shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
                seen.append((name, shape))
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.module.named_modules() if n]
        was_training = self.training
        try:
            self.eval()
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            with torch.inference_mode():
                self.module(self._normalize(torch.zeros(1, 3, self.input_size, self.input_size,
                                                        device=device)))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        return seen

    # -------------------------------------------------------------- forward

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.input_std if bool((self.input_std != 1).any()) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self._normalize(x))

    def forward_taps(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """One forward pass returning each named module's output (stops after the last)."""
        wanted = self.check_layers(layers)
        out: dict[str, torch.Tensor] = {}
        modules = dict(self.module.named_modules())

        def hook(name: str):
            def keep(_module: nn.Module, _inputs: object, output: object) -> None:
                if not isinstance(output, torch.Tensor):
                    raise ConfigError(f"layer {name} of model {self.model_name or self.family} "
                                      f"returns a {type(output).__name__}, not a tensor; tap "
                                      "another layer")
                out[name] = output.clone()
                if len(out) == len(set(wanted)):
                    raise _Stop
            return keep

        handles = [modules[n].register_forward_hook(hook(n)) for n in dict.fromkeys(wanted)]
        try:
            self.module(self._normalize(x))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {n: out[n] for n in wanted}


def submodule(net: nn.Module, name: str) -> nn.Module | None:
    """The module named ``name`` in ``net`` (a ``TappedNet`` or ``CaffeNet``), or None."""
    inner = net.module if isinstance(net, TappedNet) else net
    try:
        return inner.get_submodule(name)
    except AttributeError:
        return None


def layer_table(net: nn.Module) -> list[dict[str, object]]:
    """One row per tappable layer of ``net`` (a ``TappedNet`` or ``CaffeNet``), in execution
    order: ``name``, ``type``, ``shape`` (output without the batch axis), ``calls`` per pass."""
    inner = getattr(net, "module", net)
    types = {n: type(m).__name__ for n, m in inner.named_modules() if n}
    if isinstance(net, TappedNet):
        rows: dict[str, dict[str, object]] = {}
        for name, shape in net.trace():
            row = rows.setdefault(name, {"name": name, "type": types[name], "shape": shape, "calls": 0})
            row["calls"] = int(row["calls"]) + 1  # type: ignore[call-overload]
        return list(rows.values())
    size = int(net.input_size)  # CaffeNet: a Sequential of named sub-layers
    with torch.inference_mode():
        was_training = net.training
        net.eval()
        try:
            taps = net.forward_taps(torch.zeros(1, 3, size, size), net.layer_names)
        finally:
            net.train(was_training)
    return [{"name": n, "type": types[n], "shape": tuple(t.shape[1:]), "calls": 1} for n, t in taps.items()]
