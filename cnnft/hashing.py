"""Content hashes that key caches and done markers.

Their values are part of the on-disk format (feature and proposal caches, demo manifests,
``cnnft-reproduce`` markers): changing how one is computed invalidates what was stored under it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnft.models.tapped import TappedNet


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short hex SHA-256 of a JSON-serialisable object (key order does not matter; other
    objects are written as ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_fingerprint(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Hash of the paths, sizes and modification times of files: changes when any is rewritten."""
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((str(p), st.st_size, st.st_mtime_ns))
    return stable_hash(stats)


def files_and_arrays_digest(paths: Iterable[str | os.PathLike[str]], arrays: Iterable[np.ndarray],
                            length: int = 24) -> str:
    """Hash of files (:func:`files_fingerprint`) and of arrays' values as float32."""
    h = hashlib.sha256(files_fingerprint(paths).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()[:length]


def _update(h: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Feed ``h`` each tensor's name and bytes, in sorted name order (the tensor's own buffer: no
    copy of VGG16's 392 MiB fc6 weight)."""
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().reshape(-1))


def layer_digests(model: nn.Module) -> dict[str, str]:
    """For each sub-layer of a sequential net, a SHA-256 of that layer and every layer before it
    (their definitions, parameters and buffers). A layer's features (in eval mode) depend on
    these alone, so networks that share their first layers, e.g. fine-tuned with conv1-5 frozen,
    share the cached features of those layers. Any other network (``cnnft.models.TappedNet``):
    every layer gets the digest of the whole network."""
    net = getattr(model, "net", model)
    if isinstance(net, TappedNet):  # any layer may read any parameter: the whole net keys each
        h = hashlib.sha256(repr(net).encode())
        _update(h, net.state_dict())
        return dict.fromkeys(net.layer_names, h.hexdigest())
    h = hashlib.sha256()
    out = {}
    for name, module in net.named_children():
        h.update(f"{name}={module!r}".encode())
        _update(h, module.state_dict())
        out[name] = h.hexdigest()  # of everything so far; h goes on
    return out


def model_digest(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's parameters and buffers, or of a state dict (e.g. a checkpoint's
    :func:`cnnft.checkpoint.model_state`: the same digest as the network loaded from it)."""
    state = model if isinstance(model, Mapping) else getattr(model, "net", model).state_dict()
    h = hashlib.sha256()
    _update(h, state)
    return h.hexdigest()
