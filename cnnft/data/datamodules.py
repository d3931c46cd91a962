"""Lightning DataModules: ImageNet-layout classification (pretraining) and VOC07 R-CNN windows
(fine-tuning). Both read the real layouts; the demo data is written in the same layouts.

Training loaders use the step-indexed samplers of ``cnnft.data.sampling`` (see there why), so
``use_distributed_sampler`` must be off in the Trainer (``conf/trainer`` sets it). ``batch_size``
(and ``fg_per_batch``) are global: under DDP each process loads its share of every step's
global batch, and each training batch carries its samples' ``positions`` in that global batch
and its ``global_size`` (the module keys dropout by them). Evaluation loaders are sharded under
DDP without padding (Lightning's ``UnrepeatedDistributedSampler``): every sample is evaluated
exactly once, so metrics reduced over ranks equal one process's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from cnnft.data.datasets import ClassificationDataset, WindowDataset, collate_skipping
from cnnft.data.imagenet import scan_imagenet
from cnnft.data.proposals import ProposalSource
from cnnft.data.sampling import EpochSampler, ForegroundBackgroundSampler, StepSampler, rank_share
from cnnft.data.transforms import resolve_mean
from cnnft.data.voc import VOC_CLASSES, VOCImage, load_voc
from cnnft.data.windows import label_windows


class StepDataLoader(DataLoader):
    """A DataLoader over a ``StepSampler``. Its position is derived from the trainer's global
    step (see ``cnnft.data.sampling``), so it is resumable with an empty state; the
    ``state_dict``/``load_state_dict`` pair tells Lightning so."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GlobalBatchItems(Dataset):
    """A training dataset read with the samplers' ``(index, sample_seed, position)`` keys:
    the wrapped dataset's item for ``(index, sample_seed)`` with ``position`` appended."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> tuple | None:
        index, seed, position = key
        item = self.dataset[(index, seed)]
        return None if item is None else (*item, position)


def collate_global(items: list[tuple | None], global_size: int) -> dict[str, torch.Tensor | int]:
    """``collate_skipping`` of ``GlobalBatchItems`` items, plus the kept samples' ``positions``
    in the global batch and ``global_size`` (a host int)."""
    batch = collate_skipping([None if item is None else item[:-1] for item in items])
    batch["positions"] = torch.tensor([item[-1] for item in items if item is not None],
                                      dtype=torch.long)
    batch["global_size"] = global_size
    return batch


class _StepDataModule(L.LightningDataModule):
    """Shared loader plumbing: rank-aware step samplers for training, sharded evaluation."""

    num_classes: int

    def __init__(self, *, batch_size: int, num_workers: int, seed: int,
                 eval_batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.eval_batch_size = eval_batch_size or batch_size

    @property
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ConfigError`` unless the global batch divides among ``world_size`` processes
        (called before training starts; the samplers check again)."""
        rank_share(self.batch_size, world_size, "datamodule.batch_size")

    def _train_loader(self, dataset: Dataset, sampler: StepSampler) -> DataLoader:
        if self.trainer is not None:
            sampler.position = lambda: self.trainer.global_step
        return StepDataLoader(GlobalBatchItems(dataset), batch_sampler=sampler,
                              num_workers=self.num_workers,
                              collate_fn=partial(collate_global, global_size=sampler.global_size),
                              persistent_workers=self.num_workers > 0)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        rank, world = self._rank_world
        sampler = (UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False)
                   if world > 1 else None)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_skipping,
                          persistent_workers=self.num_workers > 0)


class ImageNetDataModule(_StepDataModule):
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` with Caffe augmentation."""

    def __init__(self, root: str, *, resize: int = 256, crop: int = 227,
                 mean: Sequence[float] = (122.68, 116.67, 104.01), mirror: bool = True,
                 batch_size: int = 256, eval_batch_size: int | None = None, num_workers: int = 4,
                 seed: int = 0, skip_corrupt: bool = False, max_val_samples: int | None = None,
                 mean_image: str | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed,
                         eval_batch_size=eval_batch_size)
        self.root, self.resize, self.crop = Path(root), resize, crop
        self.mean = resolve_mean(mean, mean_image)  # model.mean_image: Caffe's mean image
        self.mirror, self.skip_corrupt, self.max_val_samples = mirror, skip_corrupt, max_val_samples
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.classes:
            return
        train, self.classes = scan_imagenet(self.root, "train")
        val, _ = scan_imagenet(self.root, "val", classes=self.classes)
        if self.max_val_samples:
            val = val[:: max(1, len(val) // self.max_val_samples)][: self.max_val_samples]
        common = dict(resize=self.resize, crop=self.crop, mean=self.mean,
                      skip_corrupt=self.skip_corrupt)
        self.train_set = ClassificationDataset(train, train=True, mirror=self.mirror, **common)
        self.val_set = ClassificationDataset(val, train=False, **common)

    @property
    def num_classes(self) -> int:
        if not self.classes:
            self.setup()
        return len(self.classes)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world
        sampler = EpochSampler(len(self.train_set), self.batch_size, self.seed, rank, world)
        return self._train_loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)


def build_windows(images: Sequence[VOCImage], proposals: dict[str, np.ndarray], *,
                  fg_threshold: float, use_difficult: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the labelled windows of all images: ``(image_index, boxes, labels)``."""
    index, boxes, labels = [], [], []
    for i, im in enumerate(images):
        ignore = np.zeros_like(im.difficult) if use_difficult else im.difficult
        w = label_windows(proposals[im.image_id], im.boxes, im.labels, ignore, fg_threshold)
        index.append(np.full(len(w.labels), i))
        boxes.append(w.boxes)
        labels.append(w.labels)
    return np.concatenate(index), np.concatenate(boxes), np.concatenate(labels)


class VOCWindowsDataModule(_StepDataModule):
    """R-CNN fine-tuning windows of a VOC07 devkit: ``fg_per_batch`` windows with IoU >=
    ``fg_threshold`` to a ground-truth box (labelled with its class, 1..20) and the rest
    background (label 0), sampled with replacement (both counts global: each DDP process
    takes its share of each); validation on a fixed sample of windows of ``val_split`` drawn
    the same way.

    "Difficult" objects: with ``use_difficult=True`` (default, as R-CNN's window file: its ground
    truth and overlaps include them) they are ground-truth windows and label the proposals they
    overlap like any object; with ``False`` they are not windows, and proposals whose best match
    is a difficult object (IoU >= fg_threshold) are dropped.

    Proposals: ``proposals`` is the ``conf/proposals`` mapping (``ProposalSource.from_config``;
    ``cache_dir`` and ``proposal_workers`` fill what it leaves out). A proposals file that does not
    cover both splits raises here, before anything is computed or written. With ``skip_corrupt``,
    images that cannot be decoded for selective search are left out of the windows, logged, and
    counted (``skipped_images``, logged as ``data/skipped_images``).
    """

    def __init__(self, root: str, *, cache_dir: str | None = None,
                 proposals: dict[str, Any] | None = None,
                 train_split: str = "trainval", val_split: str = "test", crop: int = 227,
                 context_pad: int = 16, mean: Sequence[float] = (122.68, 116.67, 104.01),
                 mirror: bool = True, batch_size: int = 128, fg_per_batch: int = 32,
                 fg_threshold: float = 0.5, use_difficult: bool = True, val_batches: int = 10,
                 eval_batch_size: int | None = None, num_workers: int = 4,
                 proposal_workers: int = 2, seed: int = 0, skip_corrupt: bool = False,
                 mean_image: str | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed,
                         eval_batch_size=eval_batch_size)
        self.root = Path(root)
        self.proposals = ProposalSource.from_config(proposals, workers=proposal_workers,
                                                    **({"cache_dir": cache_dir} if cache_dir else {}))
        self.train_split, self.val_split = train_split, val_split
        self.crop, self.context_pad, self.mirror = crop, context_pad, mirror
        self.mean = resolve_mean(mean, mean_image)  # model.mean_image: Caffe's mean image
        self.fg_per_batch, self.fg_threshold = fg_per_batch, fg_threshold
        self.use_difficult, self.val_batches = use_difficult, val_batches
        self.skip_corrupt = skip_corrupt
        self.classes = list(VOC_CLASSES)
        self._sets: dict[str, WindowDataset] = {}
        self.skipped_images: dict[str, list[str]] = {}
        if self.proposals.settings.source == "file":  # fail before training starts, not in setup
            for split in dict.fromkeys((train_split, val_split)):
                self.proposals.check(load_voc(self.root, split), split)

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1  # + background

    def check_world_size(self, world_size: int) -> None:
        super().check_world_size(world_size)
        rank_share(self.fg_per_batch, world_size, "datamodule.fg_per_batch")

    def _proposals(self, images: Sequence[VOCImage], split: str) -> dict[str, np.ndarray]:
        boxes, skipped = self.proposals.boxes(images, split, skip_corrupt=self.skip_corrupt)
        self.skipped_images[split] = skipped
        return boxes

    def prepare_data(self) -> None:
        for split in dict.fromkeys((self.train_split, self.val_split)):
            self._proposals(load_voc(self.root, split), split)

    def _windows(self, split: str, mirror: bool) -> WindowDataset:
        images = load_voc(self.root, split)
        proposals = self._proposals(images, split)
        images = [im for im in images if im.image_id in proposals]  # corrupt ones skipped
        index, boxes, labels = build_windows(images, proposals,
                                             fg_threshold=self.fg_threshold,
                                             use_difficult=self.use_difficult)
        return WindowDataset([im.path for im in images], index, boxes, labels, crop=self.crop,
                             pad=self.context_pad, mean=self.mean, mirror=mirror,
                             skip_corrupt=self.skip_corrupt)

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        self._sets["train"] = self._windows(self.train_split, self.mirror)
        val = self._windows(self.val_split, False)
        self._report_skipped()
        sampler = self._sampler(val, rank=0, world=1, seed=self.seed + 1)
        keep = np.concatenate([sampler.global_batch(s) for s in range(self.val_batches)])
        keep = np.unique(keep)  # a fixed sample; duplicates of with-replacement draws removed
        self._sets["val"] = WindowDataset(val.image_paths, val.image_index[keep], val.boxes[keep],
                                          val.labels[keep], crop=self.crop, pad=self.context_pad,
                                          mean=self.mean, mirror=False,
                                          skip_corrupt=self.skip_corrupt)

    def _report_skipped(self) -> None:
        """Warn about and log the images left out as corrupt (``data/skipped_images``)."""
        count = sum(len(v) for v in self.skipped_images.values())
        if not count:
            return
        names = {s: v[:5] for s, v in self.skipped_images.items() if v}
        rank_zero_warn(f"fine-tuning without {count} corrupt image(s) (data.skip_corrupt=true): {names}")
        for logger in (self.trainer.loggers if self.trainer is not None else []):
            logger.log_metrics({"data/skipped_images": float(count)}, step=0)

    def _sampler(self, windows: WindowDataset, *, rank: int, world: int,
                 seed: int) -> ForegroundBackgroundSampler:
        labels = windows.labels
        return ForegroundBackgroundSampler(np.flatnonzero(labels > 0), np.flatnonzero(labels == 0),
                                           self.batch_size, self.fg_per_batch, seed, rank, world)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world
        train = self._sets["train"]
        return self._train_loader(train, self._sampler(train, rank=rank, world=world, seed=self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._sets["val"])
