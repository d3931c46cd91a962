"""CaffeNet (Caffe's bvlc_reference_caffenet) with every sub-layer named as in the paper.

Topology: conv1(96,11,s4)-relu1-pool1(3,s2)-norm1, conv2(256,5,p2,g2)-relu2-pool2-norm2,
conv3(384,3,p1)-relu3, conv4(384,3,p1,g2)-relu4, conv5(256,3,p1,g2)-relu5-pool5,
fc6(4096)-relu6-drop6, fc7(4096)-relu7-drop7, fc8(num_classes). A width multiplier scales every
channel count and the fc widths; the input size may shrink too (the demo net), which shrinks
pool5 from 6x6 to whatever the topology gives. torchvision's AlexNet is a different network.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cnnft.errors import ConfigError

#: The layers the paper probes (conv-3/conv-4 are relu3/relu4, fc6/fc7 are relu6/relu7).
PROBE_LAYERS = ("pool1", "pool2", "relu3", "relu4", "pool5", "relu6", "relu7")

#: Layers with parameters, in order.
PARAM_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")

#: Caffe's initial bias per layer (Gaussian weights, std 0.01; fc6/fc7 std 0.005).
_BIAS_INIT = {"conv1": 0.0, "conv2": 1.0, "conv3": 0.0, "conv4": 1.0, "conv5": 1.0,
              "fc6": 1.0, "fc7": 1.0, "fc8": 0.0}
_WEIGHT_STD = {"fc6": 0.005, "fc7": 0.005}
#: Weight initialisations ``CaffeNet(init=...)`` knows.
INITS = ("caffe", "kaiming")
#: Std of a mean-subtracted input pixel in Caffe's 0-255 units (ImageNet's channels: ~58-64; the
#: demo images' about the same): ``init="kaiming"`` divides conv1's std by it.
INPUT_STD = 60.0
#: ``init="kaiming"``: fc8's std, so that the initial logits are ~0 and the loss ln(classes).
_KAIMING_FC8_STD = 0.001


def _conv_out(size: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _pool_out(size: int) -> int:
    # Caffe pools with ceil mode; for the sizes of this topology it equals floor(+1).
    return math.ceil((size - 3) / 2) + 1


def pool5_size(input_size: int) -> int:
    """Spatial side of pool5 for a square input (6 for 227)."""
    s = _pool_out(_conv_out(input_size, 11, 4))  # conv1, pool1
    s = _pool_out(s)  # conv2 keeps the size, pool2
    return _pool_out(s)  # conv3-5 keep it, pool5


class CrossChannelLRN(nn.Module):
    """Caffe's across-channel LRN: ``x / (k + alpha/size * sum of x^2 over size channels)^beta``.

    The same function as ``nn.LocalResponseNorm`` (window placement and padding included), with
    the channel-window sum written as ``size`` shifted adds instead of ``avg_pool3d``, whose CUDA
    backward has no deterministic implementation (so ``trainer.deterministic=true`` works on a
    GPU). It has no parameters: checkpoints are unchanged.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        sq = F.pad(x.square(), (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2))
        window = sq[:, 0:channels]
        for i in range(1, self.size):
            window = window + sq[:, i:i + channels]
        return x / (window * (self.alpha / self.size) + self.k).pow(self.beta)


class CaffeNet(nn.Sequential):
    """CaffeNet as an ``nn.Sequential`` of named sub-layers; ``model.conv1``, ``model.pool5``...

    Args:
        num_classes: width of fc8.
        width: multiplier on all channel counts and fc widths (1.0 = the paper's network).
        input_size: side of the square input crop (227 for the paper).
        dropout: dropout probability of drop6/drop7.
        init_gain: factor on Caffe's initial weight std for every layer whose fan-in scales with
            the width (all but conv1). ``None``: ``1/sqrt(width)``, which keeps the activation
            scale of the full network in a narrow one (exactly Caffe's init at width 1); without
            it a 1/4-width net starts with 2x smaller signals per layer and stalls.
        init: ``"caffe"`` (the paper's: Gaussian std 0.01, fc6/fc7 0.005, times ``init_gain``;
            Caffe's biases) or ``"kaiming"`` (unit-scale signals at every layer, zero biases; the
            demo scale's choice, see ``caffe_init_``).
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, input_size: int = 227,
                 dropout: float = 0.5, init_gain: float | None = None, init: str = "caffe") -> None:
        if init not in INITS:
            raise ConfigError(f"model.init={init!r} is not an initialisation; expected one of {INITS}")
        c = [max(2, int(round(n * width / 2)) * 2) for n in (96, 256, 384, 384, 256)]
        fc = max(1, int(round(4096 * width)))
        side = pool5_size(input_size)
        if side < 1:
            raise ConfigError(f"model.input_size={input_size} is too small for CaffeNet; "
                              "expected at least 39")
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(3, c[0], 11, stride=4), relu1=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(3, 2, ceil_mode=True), norm1=CrossChannelLRN(5, 1e-4, 0.75, 1.0),
            conv2=nn.Conv2d(c[0], c[1], 5, padding=2, groups=2), relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(3, 2, ceil_mode=True), norm2=CrossChannelLRN(5, 1e-4, 0.75, 1.0),
            conv3=nn.Conv2d(c[1], c[2], 3, padding=1), relu3=nn.ReLU(inplace=True),
            conv4=nn.Conv2d(c[2], c[3], 3, padding=1, groups=2), relu4=nn.ReLU(inplace=True),
            conv5=nn.Conv2d(c[3], c[4], 3, padding=1, groups=2), relu5=nn.ReLU(inplace=True),
            pool5=nn.MaxPool2d(3, 2, ceil_mode=True), flatten=nn.Flatten(1),
            fc6=nn.Linear(c[4] * side * side, fc), relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(dropout),
            fc7=nn.Linear(fc, fc), relu7=nn.ReLU(inplace=True), drop7=nn.Dropout(dropout),
            fc8=nn.Linear(fc, num_classes),
        )
        super().__init__(layers)
        self.num_classes, self.width, self.input_size = num_classes, width, input_size
        self.init_gain = width**-0.5 if init_gain is None else init_gain
        self.init = init
        caffe_init_(self, PARAM_LAYERS)

    @property
    def weight_lr_scale(self) -> dict[str, float]:
        """Factor on a layer's weight learning rate (divisor of its weight decay) that the
        initialisation asks for: ``init="kaiming"`` gives conv1 ``1/INPUT_STD**2``. Its weights are
        ``INPUT_STD`` times smaller than those of a net on unit-variance inputs and get gradients
        ``INPUT_STD`` times larger; so scaled, SGD on conv1 is exactly SGD on inputs divided by
        ``INPUT_STD`` (without it, conv1's update is ~1000x its weights at lr 0.01 and the
        loss diverges). ``init="caffe"``: none (Caffe's solver)."""
        return {"conv1": INPUT_STD**-2} if self.init == "kaiming" else {}

    @property
    def layer_names(self) -> list[str]:
        """Every tappable sub-layer name, in forward order."""
        return [name for name, _ in self.named_children()]

    def check_layers(self, names: Iterable[str]) -> list[str]:
        """Return ``names`` as a list, or raise listing the valid layer names."""
        names = list(names)
        unknown = [n for n in names if n not in self._modules]
        if unknown:
            raise ConfigError(f"unknown layer(s) {unknown}; valid layers: {self.layer_names}")
        return names

    def forward_taps(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """One forward pass returning the output of each named layer (stops after the last).

        In-place ReLUs would overwrite a tapped conv/fc output, so tapped tensors are cloned
        when a later in-place layer could modify them.
        """
        wanted = set(self.check_layers(layers))
        out: dict[str, torch.Tensor] = {}
        for name, module in self.named_children():
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
                if name.startswith(("conv", "fc")):
                    x = x.clone()  # keep the tapped pre-activation intact
        return out


def _kaiming_std(name: str, module: nn.Module) -> float:
    """He et al. (2015) std ``sqrt(2 / fan_in)``, over ``INPUT_STD`` for conv1 (its inputs are
    0-255 pixels, not unit-variance), Caffe's small std for fc8."""
    if name == "fc8":
        return _KAIMING_FC8_STD
    std = math.sqrt(2.0 / module.weight[0].numel())  # fan-in of one output (groups included)
    return std / INPUT_STD if name == "conv1" else std


def caffe_init_(model: nn.Module, layers: Iterable[str]) -> None:
    """Re-initialise ``layers`` of ``model`` in place as Caffe's CaffeNet prototxt does
    (weight std times ``model.init_gain`` for layers above conv1, see ``CaffeNet``; Caffe's
    biases), or, with ``model.init == "kaiming"``, so that every layer's output starts with unit
    scale: std ``sqrt(2 / fan_in)`` for conv2-fc7, the same divided by ``INPUT_STD`` for conv1,
    0.001 for fc8 (initial loss ln(classes)), all biases 0 (Caffe's bias 1 would dominate unit-scale
    pre-activations). See ``_kaiming_std``."""
    gain = getattr(model, "init_gain", 1.0)
    kaiming = getattr(model, "init", "caffe") == "kaiming"
    for name in layers:
        module = getattr(model, name)
        with torch.no_grad():
            if kaiming:
                std, bias = _kaiming_std(name, module), 0.0
            else:
                std = _WEIGHT_STD.get(name, 0.01) * (1.0 if name == "conv1" else gain)
                bias = _BIAS_INIT[name]
            module.weight.normal_(0.0, std)
            module.bias.fill_(bias)
