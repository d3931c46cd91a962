"""Feature ablations of paper Sec. 4 (Tables 4 and 5): what a linear probe loses when the location
or the magnitude of filter activations is destroyed.

Each function maps a batch of feature maps ``[N, C, H, W]`` to one feature vector per image,
batch-independently except for :func:`spatial_shuffle`'s seed. Configs pick one by
``_target_`` (``conf/ablations/*.yaml``, ``_partial_: true``; ``ablations=[unroll,shuffle]``).
Each declares whether it is *spatial* (``fn.spatial``: needs ``[N, C, H, W]`` maps, raises
ValueError on ``[N, D]`` fc features): :func:`unroll` and :func:`binarize` also take fc features,
the others are spatial. :func:`is_spatial` reads the declaration (also through the
``functools.partial`` a config builds); an ablation of another module declares it with
:func:`declare`, and one that does not is taken as spatial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["binarize", "binarize_loc", "declare", "is_spatial", "spatial_max", "spatial_max_binarize",
           "spatial_shuffle", "unroll"]

F = TypeVar("F", bound=Callable[..., Tensor])


def declare(*, spatial: bool) -> Callable[[F], F]:
    """Decorator: set ``fn.spatial`` (whether the ablation needs ``[N, C, H, W]`` maps)."""
    def mark(fn: F) -> F:
        fn.spatial = spatial  # type: ignore[attr-defined]
        return fn
    return mark


def is_spatial(ablation: Callable[..., Tensor]) -> bool:
    """Whether ``ablation`` (a function or a ``functools.partial`` of one) needs ``[N, C, H, W]``
    maps; undeclared ablations are spatial."""
    return bool(getattr(getattr(ablation, "func", ablation), "spatial", True))


def _check_spatial(x: Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} needs [N, C, H, W] feature maps, got shape {tuple(x.shape)}; "
                         "fc features [N, D] have no spatial positions")


def _binary(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean mask as 0/1 in ``like``'s floating dtype (float32 for integer input)."""
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


@declare(spatial=False)
def unroll(x: Tensor) -> Tensor:
    """``[N, C*H*W]`` plain feature vector (channel-major, like Caffe's blob order); keeps everything.

    ``[N, D]`` input is returned unchanged."""
    if x.ndim == 2:
        return x
    _check_spatial(x, "unroll")
    return x.flatten(1)


@declare(spatial=True)
def spatial_shuffle(x: Tensor, *, seed: int = 0) -> Tensor:
    """``[N, C*H*W]`` after an independent random permutation of the H*W positions for every image
    and every filter (paper Fig. 2). Keeps each filter's multiset of values per image (so its
    magnitude statistics); destroys where it fired and the spatial co-occurrence across filters.

    Deterministic for a given seed, input shape and device (keys are drawn on ``x.device``).
    Image ``i`` of a batch gets the same permutations in every call with the same seed: vary
    the seed per batch when a data set is shuffled in batches."""
    _check_spatial(x, "spatial_shuffle")
    n, c, h, w = x.shape
    gen = torch.Generator(device=x.device).manual_seed(seed)
    keys = torch.rand(n, c, h * w, generator=gen, device=x.device)
    perm = torch.argsort(keys, dim=-1, stable=True)
    return x.flatten(2).gather(-1, perm).flatten(1)


@declare(spatial=True)
def spatial_max(x: Tensor) -> Tensor:
    """``[N, C]`` per-filter max over positions. Keeps each filter's peak magnitude; destroys its
    location and every other value of the map."""
    _check_spatial(x, "spatial_max")
    return x.amax(dim=(2, 3))


@declare(spatial=False)
def binarize(x: Tensor, *, threshold: float = 0.0) -> Tensor:
    """``[N, C*H*W]`` (or, for fc features ``[N, D]``, ``[N, D]``) 0/1 of ``x > threshold``. Keeps
    which units fire (and where); destroys how strongly (paper Sec. 4.2, pool5 and fc6/fc7)."""
    if x.dim() != 2:
        _check_spatial(x, "binarize")
    return _binary(x > threshold, x).flatten(1)


@declare(spatial=True)
def spatial_max_binarize(x: Tensor, *, threshold: float = 0.0) -> Tensor:
    """``[N, C]`` 0/1 of ``spatial_max(x) > threshold``: whether each filter fires anywhere.
    Destroys location and magnitude."""
    _check_spatial(x, "spatial_max_binarize")
    return _binary(x.amax(dim=(2, 3)) > threshold, x)


@declare(spatial=True)
def binarize_loc(x: Tensor, *, threshold: float = 0.0) -> Tensor:
    """``[N, C*H*W]`` binary map per filter with a single 1 at its max position (first position on
    ties, row-major), paper Table 5 "sm-bn-lc". Keeps where each filter fires most; destroys
    magnitudes and all other positions.

    A filter whose max is ``<= threshold`` (e.g. silent after ReLU) gets an all-zero map: the max
    is binarized like in :func:`spatial_max_binarize`, so a silent filter does not claim the
    first position."""
    _check_spatial(x, "binarize_loc")
    flat = x.flatten(2)
    best = flat.argmax(dim=-1, keepdim=True)
    fired = flat.gather(-1, best) > threshold
    out = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, best, fired)
    return _binary(out, x).flatten(1)
