"""Threshold kernels shared by the selectivity analyses (``filter_entropy``, ``unit_selectivity``).

A filter's (or unit's) responses ``[k, N]`` over ``N`` labelled samples are cut at ``T``
thresholds, ``j = 1..T``:

* ``"rank"``: threshold ``j`` keeps the top ``ceil(j*N/T)`` samples of the filter (ties in
  activation broken by sample order), so the last one keeps all ``N``. Samples are ordered by
  their float32 value (float64 inputs are rounded first).
* ``"value"``: threshold ``j`` keeps the samples with activation ``>= max - j*(max-min)/T``,
  equally spaced values from the filter's max to its min (the last keeps all); a constant
  filter keeps everything at every threshold.

:func:`threshold_counts` returns, per filter and threshold, the class counts of the samples that
*enter* at that threshold (a cumulative sum over thresholds gives the samples kept); one sort per
filter (rank mode) and one ``bincount`` of (threshold bin, class) codes, no loop over thresholds.
Rank mode sorts packed int64 keys on the CPU (order-preserving bits of the float32 activation,
then the sample index, then the label in the low bits): a plain value sort (numpy's SIMD sort),
ties fall to sample order, and the labels come out already in sorted order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cnnft.errors import ConfigError

__all__ = ["MODES", "check_threshold_mode", "rank_counts", "threshold_counts", "threshold_values",
           "value_counts"]

MODES = ("rank", "value")


def check_threshold_mode(mode: str, key: str = "threshold_mode") -> str:
    """``mode`` if it is one of :data:`MODES`, else a ConfigError (a ValueError) naming ``key``."""
    if mode not in MODES:
        raise ConfigError(f"{key}={mode!r}; expected one of {list(MODES)}")
    return mode


def _rank_counts_numpy(at: np.ndarray, labels: np.ndarray, t: int, width: int) -> np.ndarray:
    """CPU :func:`rank_counts`: ``at`` ``[k, N]`` float32 (overwritten), ``labels`` ``[N]`` int64.

    Each int64 key is written as two int32 words: the high word the order-reversed float bits
    (descending value), the low word ``sample << label_bits | label`` (ties by sample order; the
    label rides along, so no gather after sorting)."""
    k, n = at.shape
    label_bits = max(1, (width - 1).bit_length())
    if (n - 1).bit_length() + label_bits > 31:
        raise ValueError(f"{n} samples x {width} classes do not fit the 31-bit sort key payload")
    at += 0.0                                  # -0.0 -> +0.0: equal values must give equal keys
    bits = at.view(np.int32)
    flip = bits >> 31                          # -1 for negative floats
    flip &= 0x7FFFFFFF
    flip ^= -1                                 # ~b for b >= 0, b ^ 0x80000000 for b < 0: descending
    bits ^= flip
    keys = np.empty((k, n), np.int64)
    words = keys.view(np.int32).reshape(k, n, 2)  # little-endian: [..., 0] low, [..., 1] high
    words[..., 0] = (np.arange(n, dtype=np.int32) << label_bits) | labels.astype(np.int32)
    words[..., 1] = bits
    keys.sort(axis=1)                          # numpy's SIMD sort
    codes = words[..., 0] & ((1 << label_bits) - 1)
    codes += ((np.arange(n, dtype=np.int64) * t // n) * width).astype(np.int32)  # threshold bin
    codes += (np.arange(k, dtype=np.int32) * (t * width))[:, None]
    return np.bincount(codes.ravel(), minlength=k * t * width).reshape(k, t, width)


def rank_counts(at: Tensor, labels: Tensor, t: int, width: int) -> Tensor:
    """``[k, T, width]`` class counts of the samples entering at each rank threshold (not
    cumulated), for ``at`` ``[k, N]`` and ``labels`` ``[N]`` int64 in ``[0, width)``: sort each
    filter's responses (descending, ties by sample order) and bincount ``bin * width + label``
    over the fixed bin of each sorted position."""
    if at.device.type == "cpu":
        return torch.from_numpy(_rank_counts_numpy(at.float().numpy().copy(), labels.numpy(), t, width))
    k, n = at.shape
    order = torch.sort(at.float() + 0.0, dim=1, descending=True, stable=True).indices
    bins = torch.div(torch.arange(n, device=at.device) * t, n, rounding_mode="floor") * width
    codes = labels[order] + bins + (torch.arange(k, device=at.device) * (t * width))[:, None]
    return torch.bincount(codes.flatten(), minlength=k * t * width).view(k, t, width)


def value_counts(at: Tensor, labels: Tensor, t: int, width: int) -> Tensor:
    """``[k, T, width]`` class counts of the samples entering at each value threshold (not
    cumulated); arguments as :func:`rank_counts`."""
    k = at.shape[0]
    a = at.double()
    top, bottom = a.max(dim=1, keepdim=True).values, a.min(dim=1, keepdim=True).values
    span = (top - bottom).clamp_min(torch.finfo(torch.float64).tiny)
    j = torch.ceil((top - a) * t / span - 1e-9)  # smallest j with a >= top - j*span/T
    codes = (j.clamp(1, t).long() - 1) * width + labels
    codes += (torch.arange(k, device=at.device) * (t * width))[:, None]
    return torch.bincount(codes.flatten(), minlength=k * t * width).view(k, t, width)


def threshold_counts(mode: str) -> Callable[[Tensor, Tensor, int, int], Tensor]:
    """The counting kernel of a threshold mode: :func:`rank_counts` or :func:`value_counts`."""
    return rank_counts if check_threshold_mode(mode) == "rank" else value_counts


def threshold_values(at: Tensor, t: int, mode: str) -> Tensor:
    """``[k, T]`` the activation value of threshold ``j``: value mode ``max - j*(max-min)/T``;
    rank mode the value of the last sample kept (the ``ceil(j*N/T)``-th largest)."""
    a = at.double()
    top, bottom = a.max(dim=1, keepdim=True).values, a.min(dim=1, keepdim=True).values
    j = torch.arange(1, t + 1, dtype=torch.float64, device=at.device)
    if check_threshold_mode(mode) == "value":
        return top - j * (top - bottom) / t
    n = at.shape[1]
    kept = torch.ceil(j * n / t).long()
    ordered = torch.sort(a, dim=1, descending=True).values
    return ordered[:, kept - 1]
