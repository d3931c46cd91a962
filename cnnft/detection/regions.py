"""Region features for detection: proposals per image, warped on the device, pool5 cached on disk.

Each image's windows are its ground-truth boxes (training splits; "difficult" ones left out)
followed by its proposals (``cnnft.data.proposals``: cached selective search, or R-CNN's boxes
from a file, ``proposals.source``; at most
``max_proposals``, clipped to the image: boxes reaching outside are clipped and counted, boxes
left empty are dropped and counted). All windows of an image are warped at once on the model's
device (``cnnft.data.windows.warp_boxes``: roi_align with the context padding) and pass through
the network up to pool5 in batches.

Only pool5 is stored: float16 memory-mapped shards of ``shard_images`` images each, one
``FeatureCache`` entry per shard keyed by a hash of model + data + transform + shard, written
while the windows stream through (no split ever needs to fit in memory) and verified when first read.
A run that stops part way keeps its finished shards. fc6/fc7 (any layer after pool5) and the
feature ablations are computed from cached pool5 on the fly (``layer_transform``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import clip_boxes_to_image

from cnnft.ablations import unroll
from cnnft.data.images import load_rgb
from cnnft.data.proposals import ProposalSettings, ProposalSource
from cnnft.data.transforms import Mean, to_tensor, window_source
from cnnft.data.voc import VOCImage
from cnnft.data.windows import warp_boxes
from cnnft.errors import ConfigError
from cnnft.features import FeatureCache
from cnnft.hashing import files_and_arrays_digest
from cnnft.models.tapped import TappedNet

log = logging.getLogger(__name__)

#: CaffeNet's layer whose output is cached; every detection layer is computed from it
CACHED_LAYER = "pool5"


def cached_layer(net: nn.Module, layer: str) -> str:
    """The layer whose region features are stored for detection with ``layer``: CaffeNet's pool5
    (fc6/fc7 follow from it), or ``layer`` itself in any other network (``TappedNet``: its
    layers need not follow one another)."""
    return layer if isinstance(net, TappedNet) else CACHED_LAYER


def clip_to_image(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Clip half-open boxes to ``[0, width] x [0, height]`` and drop those left without area.

    Returns ``(kept boxes, number clipped, number dropped)``."""
    t = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4))
    clipped = clip_boxes_to_image(t, (height, width))
    changed = int((clipped != t).any(1).sum())
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep].numpy(), changed, int((~keep).sum())


@dataclass
class Regions:
    """The windows of one split: per image ``boxes[i]`` [n_i, 4], the first ``num_gt[i]`` of which
    are its (non-difficult) ground-truth boxes."""

    split: str
    images: list[VOCImage]
    boxes: list[np.ndarray]
    num_gt: list[int]
    clipped: int = 0
    dropped: int = 0

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(b) for b in self.boxes])])


def make_regions(images: Sequence[VOCImage], proposals: dict[str, np.ndarray], *, split: str,
                 max_proposals: int, include_gt: bool) -> Regions:
    """Windows of each image (see the module doc); clipped/dropped proposals are counted and logged."""
    boxes, num_gt, clipped, dropped = [], [], 0, 0
    for im in images:
        props, c, d = clip_to_image(proposals[im.image_id][:max_proposals], im.width, im.height)
        clipped, dropped = clipped + c, dropped + d
        gt = im.boxes[~im.difficult] if include_gt else np.zeros((0, 4), np.float32)
        boxes.append(np.concatenate([gt, props]).astype(np.float32))
        num_gt.append(len(gt))
    total = sum(min(len(proposals[im.image_id]), max_proposals) for im in images)
    log.info("proposals of %s: %d boxes; %d reached outside the image and were clipped, %d left "
             "empty by clipping were dropped", split, total, clipped, dropped)
    return Regions(split, list(images), boxes, num_gt, clipped, dropped)


def split_regions(images: Sequence[VOCImage], split: str, *, cache_dir: str | Path,
                  settings: ProposalSettings, max_proposals: int, include_gt: bool,
                  compute_missing: bool = True, workers: int = 2, progress: bool = True) -> Regions:
    """``make_regions`` with the proposals of ``images``: cached selective search, or R-CNN's boxes
    read from ``settings.path`` (``settings.source``)."""
    source = ProposalSource(settings, Path(cache_dir), workers, compute_missing)
    props, _ = source.boxes(images, split, progress=progress)
    return make_regions(images, props, split=split, max_proposals=max_proposals, include_gt=include_gt)


def check_detection_layers(net: nn.Module, layers: Sequence[str]) -> list[str]:
    """CaffeNet: the layers at or after pool5 (detection caches pool5 only); earlier ones are
    skipped with a warning. Any other network: every layer. Unknown names raise ConfigError
    listing the valid ones."""
    names = net.check_layers(layers)
    if isinstance(net, TappedNet):
        return names
    order = net.layer_names
    first = order.index(CACHED_LAYER)
    keep = [n for n in names if order.index(n) >= first]
    if len(keep) < len(names):
        log.warning("detection: layers %s come before %s and are skipped (region features are "
                    "computed from cached %s)", [n for n in names if n not in keep], CACHED_LAYER,
                    CACHED_LAYER)
    if not keep:
        raise ConfigError(f"detection needs layers at or after {CACHED_LAYER}, got {names}; valid: "
                          f"{order[first:]} (fc6/fc7 features are relu6/relu7)")
    return keep


def layer_transform(net: nn.Module, layer: str,
                    ablation: Callable[[torch.Tensor], torch.Tensor] = unroll
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``cached [n, ...] -> features [n, D]`` of ``layer`` (CaffeNet: running the sub-layers after
    pool5, in eval mode; other networks cache ``layer`` itself) followed by ``ablation``."""
    if cached_layer(net, layer) == layer:
        return lambda x: ablation(x).flatten(1)
    order = net.layer_names
    # dropout is the identity in eval mode: skipped, so the model's own mode is never touched
    tail = [net._modules[n] for n in order[order.index(CACHED_LAYER) + 1: order.index(layer) + 1]
            if not isinstance(net._modules[n], nn.Dropout)]

    def features(pool5: torch.Tensor) -> torch.Tensor:
        x = pool5
        with torch.inference_mode():
            for module in tail:
                x = module(x)
        return ablation(x).flatten(1)

    return features


class RegionStore:
    """Cached pool5 features of every window of a ``Regions`` split, in shards of images.

    ``key_parts`` describe the model (digest), the data and the transform; the shard index is
    added. ``build`` computes missing shards; ``images()`` streams ``(image index, pool5 [n_i, C,
    H, W] float32)``."""

    def __init__(self, regions: Regions, cache: FeatureCache, key_parts: dict[str, Any], *,
                 shard_images: int = 64, layer: str = CACHED_LAYER) -> None:
        if shard_images < 1:
            raise ConfigError(f"detection shard_images={shard_images}; expected >= 1")
        self.regions, self.cache, self.shard_images, self.layer = regions, cache, shard_images, layer
        self.key_parts = {**key_parts, "layer": layer, "shard_images": shard_images,
                          "boxes": files_digest(regions)}
        self.shape: tuple[int, ...] | None = None
        self.offsets = regions.offsets
        self._verified: set[int] = set()  # shards whose checksum was checked by this store

    def _shards(self) -> range:
        return range(0, len(self.regions.images), self.shard_images)

    def _key(self, start: int) -> str:
        return FeatureCache.key(shard=int(start), **self.key_parts)

    def build(self, model: nn.Module, *, crop: int, pad: int, mean: Mean, batch_size: int,
              device: str | torch.device, progress: bool = True) -> RegionStore:
        """Compute and store every missing shard (progress bar over images)."""
        from tqdm import tqdm

        net = getattr(model, "net", model)
        was_training = net.training
        net.eval()
        with torch.inference_mode():
            probe = net.forward_taps(torch.zeros(1, 3, crop, crop, device=device), [self.layer])
        self.shape = tuple(probe[self.layer].shape[1:])
        dim = int(np.prod(self.shape))
        missing = [s for s in self._shards() if self.cache.open(self._key(s), verify=False) is None]
        todo = sum(min(self.shard_images, len(self.regions.images) - s) for s in missing)
        bar = tqdm(total=todo, desc=f"region features {self.regions.split}", unit="img",
                   disable=not progress or not todo, leave=False)
        try:
            for start in missing:
                stop = min(start + self.shard_images, len(self.regions.images))
                rows = int(self.offsets[stop] - self.offsets[start])
                with self.cache.writer(self._key(start), (rows, dim), pool5_shape=list(self.shape),
                                       images=[start, stop], **self.key_parts) as mm:
                    for i in range(start, stop):
                        lo = int(self.offsets[i] - self.offsets[start])
                        self._image_features(net, i, mm, lo, crop=crop, pad=pad, mean=mean,
                                             batch_size=batch_size, device=device)
                        bar.update()
        finally:
            bar.close()
            net.train(was_training)
        return self

    def _image_features(self, net: nn.Module, i: int, out: np.memmap, row: int, *, crop: int,
                        pad: int, mean: Mean, batch_size: int,
                        device: str | torch.device) -> None:
        boxes = torch.from_numpy(self.regions.boxes[i])
        if not len(boxes):
            return
        image, mean_image = window_source(to_tensor(load_rgb(self.regions.images[i].path)), mean, crop)
        image = image.to(device)
        with torch.inference_mode():
            for s in range(0, len(boxes), batch_size):
                windows = warp_boxes(image, boxes[s:s + batch_size].to(device), crop=crop, pad=pad,
                                     mean_image=mean_image)
                feats = net.forward_taps(windows, [self.layer])[self.layer]
                out[row + s: row + s + len(windows)] = feats.flatten(1).half().cpu().numpy()

    def images(self, indices: Sequence[int] | None = None, *, rows: str = "all"
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(image index, pool5 float32 [n, C, H, W])`` per image of ``indices`` (default all, in
        order). ``rows="gt"``: only the ground-truth windows (cheap: only their pages are read)."""
        if self.shape is None:
            raise RuntimeError("RegionStore.build() must run before reading features")
        wanted = range(len(self.regions.images)) if indices is None else indices
        open_shard, array = -1, None
        for i in map(int, wanted):
            start = (i // self.shard_images) * self.shard_images
            if start != open_shard:
                array = self.cache.open(self._key(start), verify=start not in self._verified)
                self._verified.add(start)
                if array is None:
                    raise RuntimeError(f"region feature shard {start} of {self.regions.split} is "
                                       f"missing or corrupt in {self.cache.root}; rerun to rebuild it")
                open_shard = start
            lo = int(self.offsets[i] - self.offsets[start])
            n = self.regions.num_gt[i] if rows == "gt" else len(self.regions.boxes[i])
            block = np.asarray(array[lo:lo + n], dtype=np.float32)
            yield i, torch.from_numpy(block).view(n, *self.shape)


def files_digest(regions: Regions) -> str:
    """Hash of the images' files and every window box (so other proposals select other shards)."""
    return files_and_arrays_digest([im.path for im in regions.images], regions.boxes)


def default_cache(output_dir: Path) -> FeatureCache:
    """The feature cache of runs configured without one: under the run's directory."""
    return FeatureCache(Path(output_dir) / "cache" / "features")
