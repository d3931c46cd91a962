"""CaffeNet: exact size of Caffe's reference net, named taps, Caffe init, width multiplier, LRN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnft.errors import ConfigError
from cnnft.models.caffenet import (
    INPUT_STD,
    PARAM_LAYERS,
    PROBE_LAYERS,
    CaffeNet,
    CrossChannelLRN,
    pool5_size,
)

ORDER = [
    "conv1", "relu1", "pool1", "norm1",
    "conv2", "relu2", "pool2", "norm2",
    "conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "flatten",
    "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8",
]


@pytest.fixture(scope="module")
def full() -> CaffeNet:
    torch.manual_seed(0)
    return CaffeNet(1000).eval()


@pytest.fixture(scope="module")
def small() -> CaffeNet:
    torch.manual_seed(1)
    return CaffeNet(7, width=0.125, input_size=67).eval()


@pytest.fixture(scope="module")
def scrambled() -> CaffeNet:
    """A small net with zero-mean biases and He-scaled weights, so that every conv/fc output
    has negative values (Caffe's bias 1 would make most pre-activations positive)."""
    torch.manual_seed(6)
    model = CaffeNet(7, width=0.125, input_size=67).eval()
    with torch.no_grad():
        for name in PARAM_LAYERS:
            layer = getattr(model, name)
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            layer.bias.uniform_(-0.1, 0.1)
    return model


def _run_until(model: nn.Sequential, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Reference: run the Sequential's children up to and including ``layer`` on a copy."""
    x = x.clone()
    for name, module in model.named_children():
        x = module(x)
        if name == layer:
            return x
    raise AssertionError(layer)


def test_parameter_count_matches_bvlc_reference_caffenet(full: CaffeNet) -> None:
    assert sum(p.numel() for p in full.parameters()) == 60_965_224
    expected = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
                "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
                "fc7": (4096, 4096), "fc8": (1000, 4096)}
    for name, shape in expected.items():
        assert tuple(getattr(full, name).weight.shape) == shape


def test_pool5_is_256x6x6_for_227(full: CaffeNet) -> None:
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        taps = full.forward_taps(x, ["pool5"])
    assert tuple(taps["pool5"].shape) == (2, 256, 6, 6)


def test_layer_names_in_order_and_probe_layers_tappable(small: CaffeNet) -> None:
    assert small.layer_names == ORDER
    assert small.check_layers(PROBE_LAYERS) == list(PROBE_LAYERS)
    assert small.check_layers(iter(PARAM_LAYERS)) == list(PARAM_LAYERS)
    with torch.no_grad():
        taps = small.forward_taps(torch.randn(2, 3, 67, 67), PROBE_LAYERS)
    assert set(taps) == set(PROBE_LAYERS)
    assert all(t.shape[0] == 2 for t in taps.values())
    assert taps["relu6"].shape == taps["relu7"].shape == (2, 512)


@pytest.mark.parametrize("layers", [
    ["conv1"], ["conv3", "relu3"], ["conv1", "pool1", "norm1", "conv5", "pool5"],
    ["fc6", "relu6", "fc7"], list(PROBE_LAYERS), ORDER,
])
def test_forward_taps_equal_running_up_to_layer(scrambled: CaffeNet, layers: list[str]) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 3, 67, 67)
    x_before = x.clone()
    with torch.no_grad():
        taps = scrambled.forward_taps(x, layers)
        assert list(taps) == [n for n in ORDER if n in layers]
        for name in layers:
            ref = _run_until(scrambled, x_before, name)
            assert taps[name].shape == ref.shape
            torch.testing.assert_close(taps[name], ref, rtol=0, atol=0)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # input untouched


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"])
def test_tapped_conv_fc_output_is_pre_activation(scrambled: CaffeNet, layer: str) -> None:
    """A conv/fc followed by an in-place ReLU must be tapped before the ReLU."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 67, 67)
    with torch.no_grad():
        # tapping also later layers forces the forward pass to run through the in-place ReLU
        taps = scrambled.forward_taps(x, [layer, "fc8"])
        ref = _run_until(scrambled, x, layer)
    assert (taps[layer] < 0).any()
    torch.testing.assert_close(taps[layer], ref, rtol=0, atol=0)
    relu = ORDER[ORDER.index(layer) + 1]
    with torch.no_grad():
        post = scrambled.forward_taps(x, [layer, relu])
    assert (post[relu] >= 0).all()
    torch.testing.assert_close(post[relu], ref.clamp_min(0), rtol=0, atol=0)
    assert (post[layer] < 0).any()


def test_fc8_tap_equals_model_output_in_eval(full: CaffeNet) -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 3, 227, 227)
    with torch.no_grad():
        out = full(x.clone())
        tap = full.forward_taps(x, ["fc8"])["fc8"]
    assert out.shape == (1, 1000)
    torch.testing.assert_close(tap, out, rtol=0, atol=0)


def test_unknown_layer_raises_listing_valid_layers(small: CaffeNet) -> None:
    with pytest.raises(ConfigError, match="pool6") as info:
        small.check_layers(["pool5", "pool6"])
    msg = str(info.value)
    for name in ORDER:
        assert repr(name) in msg
    with pytest.raises(ConfigError, match="valid layers"):
        small.forward_taps(torch.randn(1, 3, 67, 67), ["fc9"])


def test_caffe_init_biases_and_weight_std(full: CaffeNet) -> None:
    bias = {"conv1": 0.0, "conv2": 1.0, "conv3": 0.0, "conv4": 1.0, "conv5": 1.0,
            "fc6": 1.0, "fc7": 1.0, "fc8": 0.0}
    std = {"conv1": 0.01, "conv2": 0.01, "conv3": 0.01, "conv4": 0.01, "conv5": 0.01,
           "fc6": 0.005, "fc7": 0.005, "fc8": 0.01}
    for name in PARAM_LAYERS:
        layer = getattr(full, name)
        assert torch.equal(layer.bias, torch.full_like(layer.bias, bias[name])), name
        w = layer.weight.detach().double()
        assert abs(w.std().item() / std[name] - 1) < 0.05, name
        assert abs(w.mean().item()) < 0.05 * std[name], name


def test_width_multiplier_and_small_input() -> None:
    model = CaffeNet(5, width=0.25, input_size=163).eval()
    channels = [getattr(model, f"conv{i}").out_channels for i in range(1, 6)]
    assert channels == [24, 64, 96, 96, 64]
    assert all(c % 2 == 0 for c in channels)  # grouped convs (g=2) stay divisible
    assert model.fc6.in_features == 64 * 4 * 4
    assert model.fc6.out_features == model.fc7.out_features == 1024
    with torch.no_grad():
        taps = model.forward_taps(torch.randn(2, 3, 163, 163), ["pool5", "fc8"])
    assert tuple(taps["pool5"].shape) == (2, 64, 4, 4)
    assert tuple(taps["fc8"].shape) == (2, 5)
    # an odd width still gives even (group-divisible) channel counts that run
    odd = CaffeNet(3, width=0.1, input_size=99).eval()
    assert all(getattr(odd, f"conv{i}").out_channels % 2 == 0 for i in range(1, 6))
    with torch.no_grad():
        assert tuple(odd(torch.randn(1, 3, 99, 99)).shape) == (1, 3)


@pytest.mark.parametrize(
    "size,side", [(227, 6), (163, 4), (67, 1), (83, 2), (99, 2), (195, 5), (128, 3), (39, 1)])
def test_pool5_size_matches_network(size: int, side: int) -> None:
    assert pool5_size(size) == side
    model = CaffeNet(2, width=0.0625, input_size=size).eval()
    with torch.no_grad():
        pool5 = model.forward_taps(torch.randn(1, 3, size, size), ["pool5"])["pool5"]
    assert tuple(pool5.shape[2:]) == (side, side)


def test_too_small_input_raises() -> None:
    with pytest.raises(ConfigError, match="input_size=30"):
        CaffeNet(2, width=0.0625, input_size=30)


def _caffe_lrn(a: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
               k: float = 1.0) -> torch.Tensor:
    """Caffe's ACROSS_CHANNELS LRN written out with loops."""
    n, c, h, w = a.shape
    out = torch.empty_like(a)
    half = size // 2
    for i in range(c):
        lo, hi = max(0, i - half), min(c, i + half + 1)
        sq = (a[:, lo:hi] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha / size * sq) ** beta
    return out


def test_lrn_matches_caffe_formula(small: CaffeNet) -> None:
    for name in ("norm1", "norm2"):
        lrn = getattr(small, name)
        assert isinstance(lrn, CrossChannelLRN)
        assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)
    torch.manual_seed(5)
    # large activations so that the normalisation actually changes the values
    a = torch.randn(2, 7, 3, 4, dtype=torch.float64) * 60
    got = small.norm1(a)
    ref = _caffe_lrn(a)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)(a))
    assert (got.abs() < a.abs() * 0.99).any()  # not the identity
    # one value checked by hand: a single channel of 100 at channel 0 of 3
    b = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    b[0, 0] = 100.0
    expected = 100.0 / (1 + 1e-4 / 5 * 100.0**2) ** 0.75
    assert small.norm1(b)[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(100 / 1.2**0.75)


def test_narrow_net_init_gain_keeps_full_width_scale() -> None:
    """Default init_gain = 1/sqrt(width): std 0.02 at width 1/4 above conv1, exact Caffe at 1."""
    torch.manual_seed(0)
    narrow = CaffeNet(10, width=0.25, input_size=163)
    assert narrow.init_gain == 2.0
    assert abs(narrow.conv1.weight.std().item() / 0.01 - 1) < 0.05
    assert abs(narrow.conv3.weight.std().item() / 0.02 - 1) < 0.05
    assert abs(narrow.fc6.weight.std().item() / 0.01 - 1) < 0.05
    assert CaffeNet(10, width=1.0, input_size=67).init_gain == 1.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_matches_torch_local_response_norm(channels_last: bool) -> None:
    """CrossChannelLRN (deterministic on CUDA) computes nn.LocalResponseNorm, gradients too."""
    x = torch.randn(4, 24, 9, 9, generator=torch.Generator().manual_seed(0)) * 30
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = CrossChannelLRN(5, 1e-4, 0.75, 1.0)(ours), nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)(ref)
    grad = torch.randn_like(a)
    a.backward(grad)
    b.backward(grad)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-6)
    assert float((a - x).abs().max()) > 1.0  # the normalisation does something at this scale


def test_kaiming_init_gives_unit_scale_signals_and_zero_biases() -> None:
    torch.manual_seed(0)
    net = CaffeNet(20, width=0.25, input_size=163, init="kaiming").eval()
    x = torch.randn(16, 3, 163, 163) * INPUT_STD  # mean-subtracted 0-255 pixels
    taps = net.forward_taps(x, ["conv1", "conv3", "conv5", "fc6", "fc7", "fc8"])
    stds = {name: float(t.std()) for name, t in taps.items()}
    # O(1) at every depth (max pooling raises it a little), not shrinking or blowing up
    assert all(0.5 < stds[n] < 8.0 for n in ("conv1", "conv3", "conv5", "fc6", "fc7")), stds
    assert stds["fc8"] < 0.2, stds  # logits ~0: the first loss is ~ln(classes)
    assert all(float(getattr(net, n).bias.abs().max()) == 0.0 for n in PARAM_LAYERS)
    caffe = CaffeNet(20, width=0.25, input_size=163)  # the default: Caffe's, biases 1 included
    assert float(caffe.conv2.bias[0]) == 1.0 and caffe.weight_lr_scale == {}
    assert net.weight_lr_scale == {"conv1": INPUT_STD**-2}


def test_unknown_init_raises() -> None:
    with pytest.raises(ConfigError, match=r"model.init='xavier'.*\('caffe', 'kaiming'\)"):
        CaffeNet(5, width=0.125, input_size=67, init="xavier")
