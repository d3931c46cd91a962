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

Vectorised: one sort (rank mode) and one ``bincount`` of (threshold bin, class) codes followed by
a cumulative sum over thresholds; no Python loop over thresholds or filters (filters are processed
in chunks to bound memory).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("rank", "value")


def _bin_label_codes(activations: Tensor, labels: Tensor, num_thresholds: int, mode: str) -> Tensor:
    """``[k, N]`` code ``bin * C' + label`` per filter and sample, where ``bin`` (0-based) is the
    first threshold that keeps the sample and ``C'`` is ``labels.max() + 1``."""
    n, t = activations.shape[0], num_thresholds
    acts = activations.T.contiguous()                                            # [k, N]
    width = int(labels.max()) + 1
    if mode == "rank":
        order = torch.argsort(acts, dim=1, descending=True, stable=True)
        bins = torch.div(torch.arange(n, device=acts.device) * t, n, rounding_mode="floor")
        return bins * width + labels[order]                                      # by sorted position
    a = acts.double()
    top, bottom = a.max(dim=1, keepdim=True).values, a.min(dim=1, keepdim=True).values
    span = (top - bottom).clamp_min(torch.finfo(torch.float64).tiny)
    j = torch.ceil((top - a) * t / span - 1e-9)  # smallest j with a >= top - j*span/T
    return (j.clamp(1, t).long() - 1) * width + labels


def entropy_curves(activations: Tensor, labels: Tensor, num_classes: int, *, num_thresholds: int = 100,
                   threshold_mode: str = "rank", chunk: int = 64) -> Tensor:
    """``[F, T]`` class entropy (bits) of the samples kept at each threshold, per filter."""
    if threshold_mode not in MODES:
        raise ValueError(f"threshold_mode={threshold_mode!r}; expected one of {list(MODES)}")
    if activations.dim() != 2:
        raise ValueError(f"activations must be [num_samples, num_filters], got {tuple(activations.shape)}")
    labels = torch.as_tensor(labels, device=activations.device).long().flatten()
    n, f = activations.shape
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} samples")
    if n == 0 or num_thresholds < 1:
        raise ValueError(f"need samples and num_thresholds >= 1, got N={n}, T={num_thresholds}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    t, c = num_thresholds, int(labels.max()) + 1  # absent classes above the max add nothing
    curves = []
    for start in range(0, f, chunk):
        codes = _bin_label_codes(activations[:, start:start + chunk], labels, t, threshold_mode)
        k = codes.shape[0]
        codes += torch.arange(k, device=codes.device)[:, None] * (t * c)          # per-filter offset
        counts = torch.bincount(codes.flatten(), minlength=k * t * c).view(k, t, c)
        counts = counts.cumsum(1).double()                                       # kept per class
        p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        curves.append(-(p * torch.log2(p.clamp_min(1e-300))).sum(-1))            # [k, T]
    return torch.cat(curves).float()


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
