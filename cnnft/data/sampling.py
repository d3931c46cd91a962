"""Batch samplers whose batches are pure functions of (seed, global step).

Each sampler yields, for training step ``s``, a list of ``(index, sample_seed, position)``
keys: the dataset draws that sample's augmentation from ``sample_seed``, and ``position`` is its
place in the step's *global* batch (the module keys dropout by it). Because nothing depends on
the order in which workers run or on how many steps came before, a run resumed from a
checkpoint at step ``s`` sees exactly the batches an uninterrupted run sees.

Batch sizes are global, as in the paper: under DDP every rank computes the same global batch
of ``batch_size`` samples (with their seeds, both indexed by position) and takes its own
``batch_size / world_size`` of it, so step ``s`` trains on the same samples, augmented the
same way, whatever the number of processes. A size that does not divide among the processes
is a ``ConfigError``.

The sampler starts where the trainer is: ``position`` is a callable returning the current
global step (set by the DataModule), read each time iteration starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from cnnft.errors import ConfigError

Batch = list[tuple[int, int, int]]


def rng_for(*keys: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def rank_share(total: int, world_size: int, key: str) -> int:
    """``total / world_size``: one process's share of a global count, which must divide."""
    if total % world_size:
        raise ConfigError(f"{key}={total} counts samples of the global batch (split across "
                          f"processes, never multiplied by them) and does not divide among "
                          f"{world_size} processes (trainer.devices x trainer.num_nodes); use a "
                          f"multiple of {world_size} or another number of processes")
    return total // world_size


class StepSampler(Sampler[Batch]):
    """Base: ``steps_per_epoch`` global batches of ``batch_size`` per epoch, this rank's share
    (``positions``: contiguous, ``batch_size / world_size``) of each."""

    def __init__(self, batch_size: int, steps_per_epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.global_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batch_size = rank_share(batch_size, world_size, "datamodule.batch_size")
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.position: Callable[[], int] = lambda: 0

    def global_batch(self, step: int) -> np.ndarray:
        """Indices of the whole batch of ``step`` (``global_size`` of them, any world size)."""
        raise NotImplementedError

    def positions(self) -> np.ndarray:
        """This rank's positions in every global batch."""
        n = self.batch_size
        return np.arange(self.rank * n, (self.rank + 1) * n)

    def batch(self, step: int) -> Batch:
        """This rank's ``(index, sample_seed, position)`` keys for ``step``."""
        mine = self.positions()
        indices = self.global_batch(step)[mine]
        seeds = rng_for(self.seed, 1, step).integers(0, 2**31 - 1, size=self.global_size)[mine]
        return [(int(i), int(s), int(p)) for i, s, p in zip(indices, seeds, mine, strict=True)]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        start = self.position()
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(start, end):
            yield self.batch(step)


class EpochSampler(StepSampler):
    """Shuffled epochs without replacement (one permutation per epoch), last partial global
    batch dropped."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {batch_size}")
        super().__init__(batch_size, num_samples // batch_size, seed, rank, world_size)
        self.num_samples = num_samples

    def global_batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = rng_for(self.seed, 0, epoch).permutation(self.num_samples)
        return perm[pos * self.global_size:(pos + 1) * self.global_size]


class ForegroundBackgroundSampler(StepSampler):
    """R-CNN batches: ``fg_per_batch`` foreground + the rest background, with replacement.

    The global batch is all its foreground windows, then all its background windows; each rank
    takes an equal share of both (``fg_per_batch / world_size`` + the background's share), so
    every process trains on R-CNN's foreground fraction."""

    def __init__(self, fg_indices: np.ndarray, bg_indices: np.ndarray, batch_size: int,
                 fg_per_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if len(fg_indices) == 0 or len(bg_indices) == 0:
            raise ValueError(f"need foreground and background windows, got {len(fg_indices)} fg "
                             f"and {len(bg_indices)} bg")
        if not 0 <= fg_per_batch <= batch_size:
            raise ValueError(f"fg_per_batch={fg_per_batch} must be within [0, {batch_size}]")
        steps = -(-len(fg_indices) // (fg_per_batch or 1))
        super().__init__(batch_size, steps, seed, rank, world_size)
        self.fg, self.bg, self.fg_per_batch = np.asarray(fg_indices), np.asarray(bg_indices), fg_per_batch
        # the background count then divides too: it is batch_size - fg_per_batch
        self.fg_share = rank_share(fg_per_batch, world_size, "datamodule.fg_per_batch")
        self.bg_share = self.batch_size - self.fg_share

    def global_batch(self, step: int) -> np.ndarray:
        rng = rng_for(self.seed, 2, step)
        fg = rng.choice(self.fg, size=self.fg_per_batch, replace=True)
        bg = rng.choice(self.bg, size=self.global_size - self.fg_per_batch, replace=True)
        return np.concatenate([fg, bg])

    def positions(self) -> np.ndarray:
        f, b, r = self.fg_share, self.bg_share, self.rank
        return np.concatenate([np.arange(r * f, (r + 1) * f),
                               self.fg_per_batch + np.arange(r * b, (r + 1) * b)])
