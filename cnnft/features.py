"""Feature extraction: one forward pass per batch for every requested layer, optionally cached.

``extract`` runs the model in eval mode under ``torch.inference_mode`` and restores its mode.
Under DDP with a ``DistributedSampler`` every rank extracts its shard and the shards are
gathered by sample index, so the sampler's padding duplicates are dropped and every sample is
checked to be filled exactly once (``merge_shards``).

``FeatureCache`` keeps each (checkpoint, data split, transform, layer) as a float16 memory-
mapped array with a JSON manifest holding its shape and SHA-256; files are written to a
temporary folder and renamed, and a cache whose checksum does not match is recomputed.
``extract_cached`` streams each batch's features into the cache as it is extracted, so besides
the float32 features it returns it holds one batch, not a second copy of every layer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cnnft.hashing import file_digest, layer_digests, stable_hash

log = logging.getLogger(__name__)


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch["images"]
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


def _taps(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    net = getattr(model, "net", model)  # a CaffeNetModule or a bare CaffeNet
    if getattr(model, "channels_last", False):
        images = images.contiguous(memory_format=torch.channels_last)
    return net.forward_taps(images, layers)


def _each_batch(model: nn.Module, loader: Iterable, layers: Sequence[str],
                consume: Callable[[dict[str, torch.Tensor]], None], *,
                device: torch.device | str | None, progress: bool, desc: str) -> None:
    """Call ``consume`` with ``{layer: output}`` of every non-empty batch of ``loader`` (one
    forward pass each), the model in eval mode under ``torch.inference_mode``; mode restored."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        from tqdm import tqdm

        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
                images = _images(batch)
                if images.numel() == 0:
                    continue
                consume(_taps(model, images.to(device), layers))
    finally:
        model.train(was_training)


def extract(model: nn.Module, loader: Iterable, layers: Sequence[str], *,
            device: torch.device | str | None = None, progress: bool = False,
            desc: str = "features") -> dict[str, torch.Tensor]:
    """Features of every sample of ``loader`` at each of ``layers`` (one forward pass per batch).

    Returns ``{layer: float32 tensor [num_samples, ...]}`` on the CPU, in loader order (under
    DDP with a DistributedSampler: in dataset order, gathered from all ranks).
    """
    layers = list(dict.fromkeys(layers))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keep(taps: dict[str, torch.Tensor]) -> None:
        for name, value in taps.items():
            parts[name].append(value.float().cpu().contiguous())

    _each_batch(model, loader, layers, keep, device=device, progress=progress, desc=desc)
    out = {name: torch.cat(chunks) if chunks else torch.empty(0) for name, chunks in parts.items()}
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and dist.is_available() and dist.is_initialized():
        out = _gather(out, list(sampler), len(sampler.dataset))
    return out


def merge_shards(shards: Sequence[tuple[Sequence[int], torch.Tensor]], total: int) -> torch.Tensor:
    """Place each rank's ``(indices, features)`` at its indices; padding duplicates of the same
    index are dropped. Raises if any of the ``total`` samples is missing."""
    first = shards[0][1]
    out = first.new_empty((total, *first.shape[1:]))
    filled = torch.zeros(total, dtype=torch.bool)
    for indices, feats in shards:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out[idx] = feats
        filled[idx] = True
    if not bool(filled.all()):
        missing = torch.nonzero(~filled).flatten()[:10].tolist()
        raise RuntimeError(f"feature gathering left {int((~filled).sum())} of {total} samples "
                           f"unfilled (first: {missing})")
    return out


def _gather(out: dict[str, torch.Tensor], indices: list[int], total: int) -> dict[str, torch.Tensor]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (indices, out))
    return {name: merge_shards([(ind, feats[name]) for ind, feats in gathered], total)
            for name in out}


# --------------------------------------------------------------------------- cache


class FeatureCache:
    """Float16 memory-mapped feature arrays under ``root/<key>/``, keyed by what made them.

    ``key(model=..., data=..., transform=..., layer=...)``: any JSON-able description; callers pass
    the checkpoint digest, the data split and root, the transform settings and the layer.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @staticmethod
    def key(**parts: Any) -> str:
        return stable_hash(parts, length=24)

    def _dir(self, key: str) -> Path:
        return self.root / key

    def open(self, key: str, *, verify: bool = True) -> np.memmap | None:
        """The cached float16 array, memory-mapped read-only (not loaded), or None if absent,
        stale or corrupt (logged and removed). ``verify``: check the SHA-256 first."""
        folder = self._dir(key)
        meta_path, data_path = folder / "meta.json", folder / "features.f16"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if verify and file_digest(data_path) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            return np.memmap(data_path, dtype=np.float16, mode="r", shape=tuple(meta["shape"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("feature cache %s is corrupt or stale (%s); recomputing", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def load(self, key: str) -> torch.Tensor | None:
        """The cached array as a float32 tensor, or None if absent, stale or corrupt (logged)."""
        array = self.open(key)
        return None if array is None else torch.from_numpy(np.asarray(array, dtype=np.float32))

    @contextmanager
    def _staging(self, key: str) -> Iterator[Path]:
        """A temporary folder under ``root`` that the caller fills; on success it is renamed to
        ``key``'s folder atomically, on error removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            yield tmp
            target = self._dir(key)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _manifest(folder: Path, shape: Sequence[int], info: Mapping[str, Any]) -> None:
        meta = {"shape": list(shape), "dtype": "float16",
                "sha256": file_digest(folder / "features.f16"), **info}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))

    @contextmanager
    def writer(self, key: str, shape: Sequence[int], **info: Any) -> Iterator[np.memmap]:
        """Yield a writable float16 memmap of ``shape`` to fill in place (streamed: the array
        never needs to be in memory); on success its manifest is written and the folder renamed
        into place atomically. On error nothing is left behind."""
        with self._staging(key) as tmp:
            mm = np.memmap(tmp / "features.f16", dtype=np.float16, mode="w+", shape=tuple(shape))
            yield mm
            mm.flush()
            del mm
            self._manifest(tmp, shape, info)

    @contextmanager
    def appender(self, key: str, **info: Any) -> Iterator[Callable[[np.ndarray], None]]:
        """Yield ``append(rows)``: each call adds ``rows`` (``[n, ...]``, stored as float16) to the
        end of ``key``'s array, handed to the OS at once, so only one batch is ever in memory and
        the number of rows need not be known in advance. On success the manifest is written and
        the folder renamed into place atomically; on error nothing is left behind."""
        with self._staging(key) as tmp:
            shape: list[int] = []
            with open(tmp / "features.f16", "wb") as f:
                def append(rows: np.ndarray) -> None:
                    rows = np.ascontiguousarray(rows, dtype=np.float16)
                    if not shape:
                        shape[:] = [0, *rows.shape[1:]]
                    elif list(rows.shape[1:]) != shape[1:]:
                        raise ValueError(f"feature cache {key}: rows of shape {list(rows.shape[1:])} "
                                         f"appended to an array of rows {shape[1:]}")
                    f.write(rows.tobytes())
                    f.flush()
                    shape[0] += len(rows)

                yield append
            self._manifest(tmp, shape or [0], info)

    def save(self, key: str, features: torch.Tensor, **info: Any) -> None:
        """Write ``features`` as float16 with its manifest, atomically (temp folder + rename)."""
        data = features.detach().cpu().to(torch.float16).numpy()
        with self.writer(key, data.shape, **info) as mm:
            mm[...] = data


def extract_cached(model: nn.Module, loader: DataLoader, layers: Sequence[str], *,
                   cache: FeatureCache | None, key_parts: Mapping[str, Any],
                   progress: bool = False, desc: str = "features") -> dict[str, torch.Tensor]:
    """``extract`` with a cache: layers found in ``cache`` are loaded, the rest are computed in
    one pass and stored. ``key_parts`` describes data and transform; each layer's key adds the
    digest of the weights up to that layer (``layer_digests``) as its ``model`` part."""
    found: dict[str, torch.Tensor] = {}
    digests = layer_digests(model)
    keys = {name: FeatureCache.key(layer=name, **{**key_parts, "model": digests[name]}) for name in layers}
    if cache is not None:
        for name in layers:
            if (cached := cache.load(keys[name])) is not None:
                found[name] = cached
    missing = [name for name in layers if name not in found]
    if missing and cache is not None and not (dist.is_available() and dist.is_initialized()):
        found.update(_extract_to_cache(model, loader, missing, cache, keys, key_parts, digests,
                                       progress=progress, desc=desc))
    elif missing:
        fresh = extract(model, loader, missing, progress=progress, desc=desc)
        if cache is not None:
            # the values a later run will load: results do not depend on whether it was cached
            fresh = {name: value.half().float() for name, value in fresh.items()}
            if dist.get_rank() == 0:
                for name in missing:
                    cache.save(keys[name], fresh[name], layer=name, **{**key_parts, "model": digests[name]})
        found.update(fresh)
    return {name: found[name] for name in layers}


def _extract_to_cache(model: nn.Module, loader: Iterable, layers: Sequence[str], cache: FeatureCache,
                      keys: Mapping[str, str], key_parts: Mapping[str, Any], digests: Mapping[str, str],
                      *, progress: bool, desc: str) -> dict[str, torch.Tensor]:
    """Extract ``layers`` straight into ``cache``, one batch at a time (memory: one batch, not every
    layer's whole float32 array), then load them: the float16 values a later run loads."""
    layers = list(dict.fromkeys(layers))
    with ExitStack() as stack:
        sinks = {name: stack.enter_context(
            cache.appender(keys[name], layer=name, **{**key_parts, "model": digests[name]}))
            for name in layers}

        def write(taps: dict[str, torch.Tensor]) -> None:
            for name, value in taps.items():
                sinks[name](value.detach().to(torch.float16).cpu().numpy())

        _each_batch(model, loader, layers, write, device=None, progress=progress, desc=desc)
    out: dict[str, torch.Tensor] = {}
    for name in layers:
        loaded = cache.load(keys[name])
        if loaded is None:
            raise RuntimeError(f"feature cache {cache.root / keys[name]} vanished right after writing "
                               f"layer {name}")
        out[name] = loaded
    return out
