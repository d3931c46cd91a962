"""Reading cnnft checkpoints safely (``weights_only=True``) and checking they fit a model.

A cnnft checkpoint is a Lightning checkpoint with a ``"cnnft"`` entry: the package version, the
architecture (``width``, ``input_size``, ``num_classes``) and the resolved run config. A plain
state dict with CaffeNet's parameter names (``conv1.weight``, ..., e.g. a converted Caffe model)
is accepted as pretrained weights too; so is one converted from Caffe's bvlc_reference_caffenet
(``pretrained_format="caffe"``, see ``caffe_state``); ``wrap_state_dict`` turns either into a
cnnft checkpoint.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnft.errors import CheckpointError, ConfigError
from cnnft.models.caffenet import PARAM_LAYERS

ARCH_KEYS = ("width", "input_size")
#: Where a cnnft checkpoint's ``state_dict`` keeps the CaffeNet (``CaffeNetModule.net``).
NET_PREFIX = "net."


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``; clear errors for missing/bad files.
    ``mmap=True`` maps the tensors instead of reading them (cheap when only the metadata is
    needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {unreadable_reason(path, e)}; expected "
                              "a file written by torch.save (a cnnft checkpoint or a CaffeNet "
                              "state dict)") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}; expected a dict")
    return ckpt


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words (torch's own text can be a
    bare ``101``: a ``KeyError`` on the first byte of a text file)."""
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        if isinstance(error, RuntimeError):
            return "a damaged PyTorch archive (truncated or partly copied?)"
        return ("it holds Python objects that weights_only=True refuses to load (a whole pickled "
                "model? save its state_dict)")
    try:  # an incremental decoder keeps back a character cut at byte 512
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = "\x00"
    if all(c.isprintable() or c.isspace() for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"not a PyTorch checkpoint: a text file (it starts {first!r})"
    if head[:1] == b"\x80":
        return "a Python pickle that is not a weights-only PyTorch checkpoint"
    return f"not a PyTorch checkpoint (unknown format; torch says {type(error).__name__})"


def model_state(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The CaffeNet state dict inside a cnnft checkpoint (or a bare CaffeNet state dict)."""
    if "cnnft" in ckpt:
        return {k[len(NET_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    if "state_dict" in ckpt and "pytorch-lightning_version" in ckpt:
        raise CheckpointError(f"{path} is a Lightning checkpoint but not a cnnft one "
                              "(no 'cnnft' entry); expected a checkpoint written by cnnft-train")
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()) and "conv1.weight" in ckpt:
        return ckpt
    raise CheckpointError(f"{path} is not a cnnft checkpoint: expected a 'cnnft' entry or a "
                          f"CaffeNet state dict with keys like 'conv1.weight'; found keys "
                          f"{sorted(ckpt)[:8]}")


def check_architecture(ckpt: dict[str, Any], path: str | os.PathLike[str],
                       arch: dict[str, Any]) -> None:
    """Raise if the checkpoint's recorded architecture differs from ``arch`` in ARCH_KEYS."""
    saved = ckpt.get("cnnft", {}).get("arch")
    if saved is None:
        return
    diff = {k: (saved.get(k), arch.get(k)) for k in ARCH_KEYS if saved.get(k) != arch.get(k)}
    if diff:
        text = ", ".join(f"{k}: checkpoint {a} vs this run {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} was trained with a different architecture "
                              f"({text}); set model.* to match it")


def load_pretrained(model: nn.Module, path: str | os.PathLike[str], *,
                    skip: tuple[str, ...] = ("fc8",), fmt: str = "cnnft") -> list[str]:
    """Copy a checkpoint's weights into ``model`` except the layers in ``skip`` (the new head).
    ``fmt``: the file's layout, ``"cnnft"`` or ``"caffe"`` (``pretrained_state``).

    Returns the loaded parameter names. Raises ``CheckpointError`` on a foreign file, another
    architecture, or a parameter whose name or shape does not fit.
    """
    ckpt = read_checkpoint(path)
    arch = {"width": getattr(model, "width", None), "input_size": getattr(model, "input_size", None)}
    check_architecture(ckpt, path, arch)
    state = pretrained_state(ckpt, path, fmt)
    own = model.state_dict()
    wanted = {k for k in own if k.split(".")[0] not in skip}
    missing = sorted(wanted - set(state))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in wanted & set(state) if state[k].shape != own[k].shape)
    if missing or shapes:
        raise CheckpointError(f"checkpoint {path} does not fit this CaffeNet: missing "
                              f"{missing}, shape mismatches {shapes}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return sorted(wanted)


# ---------------------------------------------------------------- pretrained weight layouts

#: ``pretrained_format`` values: cnnft's own layout, or a state dict converted from Caffe.
PRETRAINED_FORMATS = ("cnnft", "caffe")

#: Caffe's blob order within a layer: blobs[0] are the weights, blobs[1] the biases.
_CAFFE_BLOBS = {"0": "weight", "1": "bias"}


def check_pretrained_format(fmt: str) -> str:
    """``fmt`` if it is one of ``PRETRAINED_FORMATS``, else a ``ConfigError`` listing them."""
    if fmt not in PRETRAINED_FORMATS:
        raise ConfigError(f"pretrained_format={fmt!r}; expected one of {list(PRETRAINED_FORMATS)}")
    return fmt


def state_dict_keys() -> list[str]:
    """The parameter names of a CaffeNet state dict: ``conv1.weight``, ``conv1.bias``, ..."""
    return [f"{layer}.{kind}" for layer in PARAM_LAYERS for kind in ("weight", "bias")]


def check_layout(state: dict[str, Any], path: str | os.PathLike[str], fmt: str) -> None:
    """Raise naming the file and the missing/unexpected keys unless ``state`` holds exactly
    CaffeNet's parameters (``state_dict_keys``) as tensors."""
    expected = set(state_dict_keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    not_tensors = sorted(k for k in expected & set(state) if not isinstance(state[k], torch.Tensor))
    if missing or unexpected or not_tensors:
        raise CheckpointError(
            f"{path} is neither a cnnft checkpoint nor a CaffeNet state dict in the "
            f"pretrained_format={fmt} layout: missing keys {missing}, unexpected keys {unexpected}"
            + (f", not tensors {not_tensors}" if not_tensors else "")
            + f"; expected exactly {state_dict_keys()}")


def caffe_state(state: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict converted from Caffe's bvlc_reference_caffenet, in cnnft's layout.

    Keys are ``<layer>.weight``/``<layer>.bias`` or Caffe's blob indices ``<layer>.0``/``<layer>.1``
    (layer names as in Caffe's prototxt, which cnnft's are). Caffe's blob shapes are PyTorch's
    (conv ``[out, in, kh, kw]``, InnerProduct ``[out, in]``, fc6's input pool5 flattened in
    C, H, W order), its inputs are on the same 0-255 scale with the mean subtracted, but its
    images are BGR (OpenCV): conv1's input-channel axis is reversed so that the network takes
    cnnft's RGB images and computes what Caffe computed on the BGR ones.
    """
    renamed: dict[str, Any] = {}
    for key, value in state.items():
        layer, _, blob = str(key).rpartition(".")
        renamed[f"{layer}.{_CAFFE_BLOBS.get(blob, blob)}" if layer else str(key)] = value
    check_layout(renamed, path, "caffe")
    conv1 = renamed["conv1.weight"]
    if conv1.dim() != 4 or conv1.shape[1] != 3:
        raise CheckpointError(f"{path}: conv1.weight has shape {tuple(conv1.shape)}; expected "
                              "[out, 3 (B, G, R), kh, kw]")
    return {**renamed, "conv1.weight": conv1.flip(1).contiguous()}


def pretrained_state(ckpt: dict[str, Any], path: str | os.PathLike[str],
                     fmt: str = "cnnft") -> dict[str, torch.Tensor]:
    """The CaffeNet state dict (cnnft layout, RGB conv1) of a loaded ``pretrained=`` file.

    ``fmt="cnnft"``: a cnnft checkpoint or a bare state dict with exactly CaffeNet's keys;
    ``fmt="caffe"``: a state dict converted from Caffe (``caffe_state``). There is no reliable
    automatic choice: both layouts have the same names and shapes and differ only in conv1's
    channel order.
    """
    check_pretrained_format(fmt)
    if fmt == "caffe":
        if "cnnft" in ckpt or "state_dict" in ckpt:
            raise CheckpointError(f"{path} is a cnnft/Lightning checkpoint, not a state dict "
                                  "converted from Caffe; use pretrained_format=cnnft for it")
        return caffe_state(ckpt, path)
    if "cnnft" not in ckpt and "state_dict" not in ckpt:
        check_layout(ckpt, path, "cnnft")
    return model_state(ckpt, path)


# ---------------------------------------------------------------- wrapping a bare state dict


def wrap_state_dict(ckpt: dict[str, Any], path: str | os.PathLike[str], model: dict[str, Any],
                    fmt: str = "cnnft") -> dict[str, Any]:
    """A loaded ``pretrained=`` file as a cnnft checkpoint (what ``cnnft-analyze`` reads): its
    CaffeNet state dict in cnnft's layout (``pretrained_state``: ``fmt="caffe"`` flips conv1 from
    BGR), the architecture from ``model`` (the ``model`` config node: ``width``, ``input_size``)
    and the number of classes of its fc8, the model config, and the file it came from. Another
    model (``model.family``): ``cnnft.models.build.wrap_weights``."""
    from cnnft.models.build import family, wrap_weights

    if family(model) != "caffenet":
        return wrap_weights(path, model)
    state = pretrained_state(ckpt, path, fmt)
    arch = {"width": model["width"], "input_size": model["input_size"],
            "num_classes": int(state["fc8.weight"].shape[0])}
    return {"cnnft": {"arch": arch, "config": {"model": model}, "source": str(path)},
            "state_dict": {f"{NET_PREFIX}{k}": v for k, v in state.items()}, "global_step": None}
