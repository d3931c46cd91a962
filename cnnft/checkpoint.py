"""Reading cnnft checkpoints safely (``weights_only=True``) and checking they fit a model.

A cnnft checkpoint is a Lightning checkpoint with a ``"cnnft"`` entry: the package version, the
architecture (``width``, ``input_size``, ``num_classes``) and the resolved run config. A plain
state dict with CaffeNet's parameter names (``conv1.weight``, ..., e.g. a converted Caffe model)
is accepted as pretrained weights too.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnft.errors import CheckpointError

ARCH_KEYS = ("width", "input_size")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``; clear errors for missing/bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
        prefix = "net."
        return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
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
                    skip: tuple[str, ...] = ("fc8",)) -> list[str]:
    """Copy a checkpoint's weights into ``model`` except the layers in ``skip`` (the new head).

    Returns the loaded parameter names. Raises ``CheckpointError`` on a foreign file, another
    architecture, or a parameter whose name or shape does not fit.
    """
    ckpt = read_checkpoint(path)
    arch = {"width": getattr(model, "width", None), "input_size": getattr(model, "input_size", None)}
    check_architecture(ckpt, path, arch)
    state = model_state(ckpt, path)
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
