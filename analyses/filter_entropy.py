"""``filter_entropy``: class entropy of each filter's strongest responses (paper Sec. 3.2, Fig. 1).

For a filter, sort its responses over all samples (ground-truth boxes; for conv layers every
spatial position is a sample) from strongest to weakest; at each of ``T`` thresholds take the
samples above it and compute the entropy (log2) of their class distribution. A filter tuned to
one class has low entropy until the threshold admits other classes; the area under the entropy
curve (AuE, the mean of the ``T`` entropies) summarises how class-selective it is.

Thresholds (``j = 1..T``):

* ``"rank"``: threshold ``j`` keeps the top ``ceil(j*N/T)`` samples of the filter (ties in
  activation broken by sample order), so the last one keeps all ``N``.
* ``"value"``: threshold ``j`` keeps the samples with activation ``>= max - j*(max-min)/T``,
  equally spaced values from the filter's max to its min (the last keeps all); a constant
  filter keeps everything at every threshold.

Vectorised: one sort per filter (rank mode) and one ``bincount`` of (threshold bin, class) codes
followed by a cumulative sum over thresholds; no Python loop over thresholds. Rank mode sorts
packed int64 keys (order-preserving bits of the float32 activation, then the sample index, then
the label in the low bits), so the sort is a plain value sort (numpy's SIMD sort on the CPU), ties
fall to sample order, and the labels come out already in sorted order. Filters are processed in
chunks (bounded memory), in parallel threads on the CPU.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

MODES = ("rank", "value")


def _check_inputs(n: int, labels: Tensor, num_classes: int, num_thresholds: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"threshold_mode={mode!r}; expected one of {list(MODES)}")
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} samples")
    if n == 0 or num_thresholds < 1:
        raise ValueError(f"need samples and num_thresholds >= 1, got N={n}, T={num_thresholds}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")


def _rank_counts_numpy(at: np.ndarray, labels: np.ndarray, t: int, width: int) -> np.ndarray:
    """CPU ``_rank_counts``: ``at`` ``[k, N]`` float32 (overwritten), ``labels`` ``[N]`` int64.

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


def _rank_counts(at: Tensor, labels: Tensor, t: int, width: int) -> Tensor:
    """``[k, T, C']`` class counts of the samples entering at each rank threshold (not cumulated),
    for ``at`` ``[k, N]``: sort each filter's responses (descending, ties by sample order) and
    bincount ``bin * C' + label`` over the fixed bin of each sorted position."""
    if at.device.type == "cpu":
        return torch.from_numpy(_rank_counts_numpy(at.float().numpy().copy(), labels.numpy(), t, width))
    k, n = at.shape
    order = torch.sort(at.float() + 0.0, dim=1, descending=True, stable=True).indices
    bins = torch.div(torch.arange(n, device=at.device) * t, n, rounding_mode="floor") * width
    codes = labels[order] + bins + (torch.arange(k, device=at.device) * (t * width))[:, None]
    return torch.bincount(codes.flatten(), minlength=k * t * width).view(k, t, width)


def _value_counts(at: Tensor, labels: Tensor, t: int, width: int) -> Tensor:
    """``[k, T, C']`` class counts of the samples entering at each value threshold (not cumulated)."""
    k = at.shape[0]
    a = at.double()
    top, bottom = a.max(dim=1, keepdim=True).values, a.min(dim=1, keepdim=True).values
    span = (top - bottom).clamp_min(torch.finfo(torch.float64).tiny)
    j = torch.ceil((top - a) * t / span - 1e-9)  # smallest j with a >= top - j*span/T
    codes = (j.clamp(1, t).long() - 1) * width + labels
    codes += (torch.arange(k, device=at.device) * (t * width))[:, None]
    return torch.bincount(codes.flatten(), minlength=k * t * width).view(k, t, width)


def _entropies(counts: Tensor) -> Tensor:
    """``[k, T]`` entropies (bits) from per-bin class counts ``[k, T, C']``."""
    kept = counts.cumsum(1).double()
    p = kept / kept.sum(-1, keepdim=True).clamp_min(1)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(-1)


def filter_major_curves(rows: Callable[[int, int], Tensor], num_filters: int, labels: Tensor,
                        num_classes: int, *, num_thresholds: int = 100, threshold_mode: str = "rank",
                        chunk: int = 16) -> Tensor:
    """``[F, T]`` entropy curves where ``rows(start, stop)`` returns filters ``start:stop`` as a
    ``[stop - start, N]`` tensor (filter-major: callers with ``[N, C, H, W]`` maps avoid a full
    transposed copy). Chunks of ``chunk`` filters run in ``torch.get_num_threads()`` threads on the
    CPU; each holds about ``32 * N * chunk`` bytes."""
    labels = labels.long().flatten()
    if labels.numel() == 0:
        raise ValueError("need samples, got N=0")
    _check_inputs(labels.numel(), labels, num_classes, num_thresholds, threshold_mode)
    t, width = num_thresholds, int(labels.max()) + 1  # absent classes above the max add nothing
    counts_of = _rank_counts if threshold_mode == "rank" else _value_counts

    def one(start: int) -> Tensor:
        at = rows(start, min(start + chunk, num_filters))
        if at.dim() != 2 or at.shape[1] != labels.numel():
            raise ValueError(f"filter rows must be [k, {labels.numel()}], got {tuple(at.shape)}")
        if at.is_floating_point() and bool(torch.isnan(at).any()):
            raise ValueError("activations contain NaN; cannot rank them")
        return _entropies(counts_of(at, labels.to(at.device), t, width))

    starts = range(0, num_filters, chunk)
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1 or labels.device.type != "cpu":
        curves = [one(s) for s in starts]
    else:
        with ThreadPoolExecutor(workers) as pool:
            curves = list(pool.map(one, starts))
    return torch.cat(curves).float() if curves else torch.zeros(0, t)


def entropy_curves(activations: Tensor, labels: Tensor, num_classes: int, *, num_thresholds: int = 100,
                   threshold_mode: str = "rank", chunk: int = 16) -> Tensor:
    """``[F, T]`` class entropy (bits) of the samples kept at each threshold, per filter
    (``activations`` ``[num_samples, num_filters]``)."""
    if threshold_mode not in MODES:
        raise ValueError(f"threshold_mode={threshold_mode!r}; expected one of {list(MODES)}")
    if activations.dim() != 2:
        raise ValueError(f"activations must be [num_samples, num_filters], got {tuple(activations.shape)}")
    labels = torch.as_tensor(labels, device=activations.device).long().flatten()
    n, f = activations.shape
    _check_inputs(n, labels, num_classes, num_thresholds, threshold_mode)
    block = chunk * max(1, torch.get_num_threads())
    cache: dict[int, Tensor] = {}
    lock = threading.Lock()

    def rows(start: int, stop: int) -> Tensor:
        # transpose a block of filters at once (torch's blocked copy is far faster than per chunk)
        b = start // block * block
        with lock:
            if b not in cache:
                cache.clear()
                cache[b] = activations[:, b:b + block].T.contiguous()
            part = cache[b]
        return part[start - b:stop - b]

    return filter_major_curves(rows, f, labels, num_classes, num_thresholds=num_thresholds,
                               threshold_mode=threshold_mode, chunk=chunk)


def area_under_entropy(activations: Tensor, labels: Tensor, num_classes: int, *, num_thresholds: int = 100,
                       threshold_mode: str = "rank") -> Tensor:
    """One AuE per filter: the mean of its ``num_thresholds`` entropies (see module doc).

    Args:
        activations: ``[num_samples, num_filters]``.
        labels: ``[num_samples]`` class indices in ``[0, num_classes)``.
    Returns:
        float32 ``[num_filters]``, between 0 and ``log2(num_classes)``.
    """
    return entropy_curves(activations, labels, num_classes, num_thresholds=num_thresholds,
                          threshold_mode=threshold_mode).mean(dim=1)


def max_entropy(num_classes: int) -> float:
    return math.log2(num_classes)
