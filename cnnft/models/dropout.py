"""Dropout keyed by the global batch, so that DDP with any number of processes draws the masks
one process would.

``GlobalBatchDropout`` is ``nn.Dropout`` until ``global_batch_rows`` is active: then each layer
draws the mask of the whole global batch (``global_size`` rows) from the step's generator and
keeps the rows of this process's samples (``positions``). Every process draws the same global
mask, so sample ``i`` of step ``s`` gets the same mask whatever the number of processes. On the
CPU with one process the draw is the one ``nn.Dropout`` makes from a global RNG seeded the same
way (same shape, same ``bernoulli_``), so single-process runs are unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class GlobalBatchDropout(nn.Dropout):
    """``nn.Dropout`` that, inside ``global_batch_rows``, keeps the global mask's rows."""

    rows: tuple[torch.Generator, torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rows is None or not 0 < self.p < 1:
            return super().forward(x)
        generator, positions, global_size = self.rows
        noise = x.new_empty((global_size, *x.shape[1:]))
        noise = noise.bernoulli_(1 - self.p, generator=generator)[positions]
        return x * noise.div_(1 - self.p)


def use_global_batch_dropout(net: nn.Module) -> None:
    """Replace every ``nn.Dropout`` of ``net`` by a ``GlobalBatchDropout`` of the same ``p``
    (no parameters: state dicts are unchanged)."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, GlobalBatchDropout(child.p, child.inplace))


@contextmanager
def global_batch_rows(net: nn.Module, seed: int, positions: torch.Tensor,
                      global_size: int) -> Iterator[None]:
    """Within the block, ``net``'s ``GlobalBatchDropout`` layers draw, in forward order, from
    one generator seeded with ``seed`` (on ``positions``' device) and keep rows ``positions``."""
    generator = torch.Generator(device=positions.device).manual_seed(seed)
    layers = [m for m in net.modules() if isinstance(m, GlobalBatchDropout)]
    for layer in layers:
        layer.rows = (generator, positions, global_size)
    try:
        yield
    finally:
        for layer in layers:
            layer.rows = None
