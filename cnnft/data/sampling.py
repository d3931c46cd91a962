"""Batch samplers whose batches are pure functions of (seed, global step).

Each sampler yields, for training step ``s``, a list of ``(index, sample_seed)`` pairs; the
dataset draws that sample's augmentation from ``sample_seed``. Because nothing depends on the
order in which workers run or on how many steps came before, a run resumed from a checkpoint
at step ``s`` sees exactly the batches an uninterrupted run sees. Under DDP every rank computes
the same global batch and takes its own contiguous slice, so the global batch is the same for
any number of processes.

The sampler starts where the trainer is: ``position`` is a callable returning the current
global step (set by the DataModule), read each time iteration starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

Batch = list[tuple[int, int]]


def rng_for(*keys: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


class StepSampler(Sampler[Batch]):
    """Base: ``steps_per_epoch`` batches per epoch of ``batch_size`` per rank."""

    def __init__(self, batch_size: int, steps_per_epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.position: Callable[[], int] = lambda: 0

    def global_batch(self, step: int) -> np.ndarray:
        """Indices of the whole batch of ``step`` across all ranks (``batch_size*world_size``)."""
        raise NotImplementedError

    def batch(self, step: int) -> Batch:
        """This rank's ``(index, sample_seed)`` pairs for ``step``."""
        n = self.batch_size
        indices = self.global_batch(step)[self.rank * n:(self.rank + 1) * n]
        seeds = rng_for(self.seed, 1, step).integers(0, 2**31 - 1, size=n * self.world_size)
        seeds = seeds[self.rank * n:(self.rank + 1) * n]
        return [(int(i), int(s)) for i, s in zip(indices, seeds, strict=True)]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        start = self.position()
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(start, end):
            yield self.batch(step)


class EpochSampler(StepSampler):
    """Shuffled epochs without replacement (one permutation per epoch), last partial batch dropped."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(f"{num_samples} samples cannot fill one batch of "
                             f"{batch_size} x {world_size} processes")
        super().__init__(batch_size, num_samples // (batch_size * world_size), seed, rank,
                         world_size)
        self.num_samples = num_samples

    def global_batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = rng_for(self.seed, 0, epoch).permutation(self.num_samples)
        size = self.batch_size * self.world_size
        return perm[pos * size:(pos + 1) * size]


class ForegroundBackgroundSampler(StepSampler):
    """R-CNN batches: ``fg_per_batch`` foreground + the rest background, with replacement."""

    def __init__(self, fg_indices: np.ndarray, bg_indices: np.ndarray, batch_size: int,
                 fg_per_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if len(fg_indices) == 0 or len(bg_indices) == 0:
            raise ValueError(f"need foreground and background windows, got {len(fg_indices)} fg "
                             f"and {len(bg_indices)} bg")
        if not 0 <= fg_per_batch <= batch_size:
            raise ValueError(f"fg_per_batch={fg_per_batch} must be within [0, {batch_size}]")
        steps = -(-len(fg_indices) // (fg_per_batch * world_size or 1))
        super().__init__(batch_size, steps, seed, rank, world_size)
        self.fg, self.bg, self.fg_per_batch = np.asarray(fg_indices), np.asarray(bg_indices), fg_per_batch

    def global_batch(self, step: int) -> np.ndarray:
        rng = rng_for(self.seed, 2, step)
        w, nfg = self.world_size, self.fg_per_batch
        fg = rng.choice(self.fg, size=(w, nfg), replace=True)
        bg = rng.choice(self.bg, size=(w, self.batch_size - nfg), replace=True)
        return np.concatenate([fg, bg], axis=1).reshape(-1)
