"""Map-style datasets indexed by ``(index, sample_seed)`` pairs from ``cnnft.data.sampling``.

A sample that fails to decode raises ``CorruptImageError`` naming the file, or, with
``skip_corrupt=True``, is logged and returned as ``None``; ``collate_skipping`` drops it and
counts it in the batch so that the module can log the total.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from cnnft.data.images import load_rgb
from cnnft.data.sampling import rng_for
from cnnft.data.transforms import Mean, as_mean, caffe_test_view, caffe_train_view, to_tensor, window_source
from cnnft.data.windows import warp_boxes
from cnnft.errors import CorruptImageError

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int]


class _SkippingDataset(Dataset):
    skip_corrupt: bool = False

    def _load(self, path: Path) -> np.ndarray | None:
        try:
            return load_rgb(path)
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise
            log.warning("skipping corrupt image (data.skip_corrupt=true): %s", e)
            return None


class ClassificationDataset(_SkippingDataset):
    """``(path, class)`` samples with Caffe augmentation (train) or centre crop (eval)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], *, resize: int, crop: int,
                 mean: Mean | Sequence[float], train: bool, mirror: bool = True,
                 skip_corrupt: bool = False) -> None:
        self.samples, self.resize, self.crop, self.mean = list(samples), resize, crop, as_mean(mean)
        self.train, self.mirror, self.skip_corrupt = train, mirror, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Item | None:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        image = self._load(path)
        if image is None:
            return None
        if self.train:
            x = caffe_train_view(image, rng_for(seed), resize=self.resize, crop=self.crop,
                                 mean=self.mean, mirror=self.mirror)
        else:
            x = caffe_test_view(image, resize=self.resize, crop=self.crop, mean=self.mean)
        return x, label


class WindowDataset(_SkippingDataset):
    """R-CNN windows: ``image_paths[i]``, ``boxes [N,4]``, ``image_index [N]``, ``labels [N]``.

    Each window is warped with ``pad`` px of context to ``crop x crop`` and mirrored with
    probability 0.5 when ``mirror``. Decoded images are kept in a per-worker LRU cache.
    """

    def __init__(self, image_paths: Sequence[Path], image_index: np.ndarray, boxes: np.ndarray,
                 labels: np.ndarray, *, crop: int, pad: int, mean: Mean | Sequence[float],
                 mirror: bool, cache_images: int = 256, skip_corrupt: bool = False) -> None:
        self.image_paths, self.image_index = list(image_paths), np.asarray(image_index)
        self.boxes, self.labels = np.asarray(boxes, np.float32), np.asarray(labels)
        self.crop, self.pad, self.mean, self.mirror = crop, pad, as_mean(mean), mirror
        self.skip_corrupt, self.cache_images = skip_corrupt, cache_images
        self._image = lru_cache(maxsize=cache_images)(self._decode)

    def _decode(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        image = self._load(self.image_paths[i])
        return None if image is None else window_source(to_tensor(image), self.mean, self.crop)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_image"]  # the cache is per process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._image = lru_cache(maxsize=self.cache_images)(self._decode)

    def __getitem__(self, key: int | tuple[int, int]) -> Item | None:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        source = self._image(int(self.image_index[index]))
        if source is None:
            return None
        image, mean_image = source
        box = torch.from_numpy(self.boxes[index:index + 1])
        mirror = self.mirror and rng_for(seed).random() < 0.5
        if mirror and mean_image is not None:
            mean_image = mean_image.flip(-1)  # WindowDataLayer: mirror, then subtract the mean
        x = warp_boxes(image, box, crop=self.crop, pad=self.pad, mean_image=mean_image)[0]
        return (x.flip(-1) if mirror else x), int(self.labels[index])


def collate_skipping(items: list[Item | None]) -> dict[str, torch.Tensor | int]:
    """Stack the samples that decoded; ``skipped`` (an int: it stays on the host when Lightning
    moves the batch to a GPU, so reading it never waits for the GPU) counts those that did not."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return {"images": torch.empty(0), "labels": torch.empty(0, dtype=torch.long),
                "skipped": skipped}
    images, labels = default_collate(kept)
    return {"images": images, "labels": labels, "skipped": skipped}


class WholeImageDataset(_SkippingDataset):
    """Whole images for image classification probes: warped to ``crop x crop`` (aspect ignored),
    or with ``resize`` given, warped to ``resize x resize`` and centre-cropped to ``crop``."""

    def __init__(self, paths: Sequence[Path], *, crop: int, mean: Mean | Sequence[float],
                 resize: int | None = None, skip_corrupt: bool = False) -> None:
        self.paths, self.crop, self.mean = list(paths), crop, as_mean(mean)
        self.resize, self.skip_corrupt = resize or crop, skip_corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item | None:
        image = self._load(self.paths[index])
        if image is None:
            return None
        return caffe_test_view(image, resize=self.resize, crop=self.crop, mean=self.mean), index
