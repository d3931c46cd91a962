"""``filter_entropy``: class entropy of each filter's strongest responses (paper Sec. 3.2, Fig. 1).

For a filter, sort its responses over all samples (ground-truth boxes; for conv layers every
spatial position is a sample) from strongest to weakest; at each of ``T`` thresholds take the
samples above it and compute the entropy (log2) of their class distribution. A filter tuned to
one class has low entropy until the threshold admits other classes; the area under the entropy
curve (AuE, the mean of the ``T`` entropies) summarises how class-selective it is.

Thresholds (``threshold_mode``: ``"rank"``, the top ``ceil(j*N/T)`` samples; ``"value"``,
activation ``>= max - j*(max-min)/T``) and their vectorised counting kernels are
:mod:`cnnft.thresholds`. Here the counts become entropies with a cumulative sum over thresholds,
no Python loop over thresholds; filters are processed in chunks (bounded memory), in parallel
threads on the CPU.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cnnft.analysis import Analysis, AnalysisContext, save_figure, write_table
from cnnft.data.voc import VOC_CLASSES
from cnnft.errors import ConfigError, DataError
from cnnft.plotting import pyplot
from cnnft.thresholds import check_threshold_mode, threshold_counts


def _check_inputs(n: int, labels: Tensor, num_classes: int, num_thresholds: int, mode: str) -> None:
    check_threshold_mode(mode)
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} samples")
    if n == 0 or num_thresholds < 1:
        raise ValueError(f"need samples and num_thresholds >= 1, got N={n}, T={num_thresholds}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")


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
    counts_of = threshold_counts(threshold_mode)

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


# ---------------------------------------------------------------------- layers, tables, figures


def layer_aue(features: Tensor, labels: Tensor, num_classes: int, *, spatial_max: bool = False,
              num_thresholds: int = 100, threshold_mode: str = "rank") -> Tensor:
    """AuE of every filter of a layer: ``features`` ``[N, C, H, W]`` (every position of every box
    a sample, box-major; ``spatial_max``: one sample per box, its max over positions) or
    ``[N, D]`` (fc: one sample per box); ``labels`` ``[N]`` box classes."""
    labels = torch.as_tensor(labels).long().flatten()
    if features.dim() == 4 and spatial_max:
        features = features.amax(dim=(2, 3))
    if features.dim() == 2:
        return area_under_entropy(features, labels, num_classes, num_thresholds=num_thresholds,
                                  threshold_mode=threshold_mode)
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W] or [N, D], got {tuple(features.shape)}")
    n, c, h, w = features.shape

    def rows(start: int, stop: int) -> Tensor:
        return features[:, start:stop].transpose(0, 1).reshape(stop - start, n * h * w)

    return filter_major_curves(rows, c, labels.repeat_interleave(h * w), num_classes,
                               num_thresholds=num_thresholds, threshold_mode=threshold_mode).mean(1)


def topk_points(num_filters: int, points: int = 30) -> list[int]:
    """``points`` equally spaced k from 1 to ``num_filters`` (rounded, distinct)."""
    return sorted({round(1 + i * (num_filters - 1) / max(points - 1, 1)) for i in range(points)})


def topk_curve(aue: Tensor, points: int = 30) -> list[tuple[int, float]]:
    """``(k, mean AuE of the k most selective, i.e. lowest-AuE, filters)`` at ``topk_points``."""
    ranked = torch.sort(aue.double()).values.cumsum(0)
    return [(k, float(ranked[k - 1] / k)) for k in topk_points(aue.numel(), points)]


def _rows_of(results: Any) -> list[dict[str, Any]]:
    """Rows of a ``results/filter_entropy.json`` payload (dict with ``rows``) or a list of rows."""
    rows = results.get("rows") if isinstance(results, dict) else results
    if not isinstance(rows, list) or any(not {"layer", "aue"} <= set(r) for r in rows):
        raise DataError("expected a filter_entropy results payload or its rows: a list of "
                        "{'layer', 'filter', 'aue'} rows")
    return rows


def aue_by_layer(results: Any) -> dict[str, np.ndarray]:
    """``{layer: per-filter AuE}`` of a payload or its rows, in filter order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in _rows_of(results):
        out.setdefault(r["layer"], []).append((int(r.get("filter", len(out.get(r["layer"], [])))),
                                               float(r["aue"])))
    return {layer: np.array([a for _, a in sorted(v)]) for layer, v in out.items()}


def compare_aue(results_a: Any, results_b: Any) -> list[dict[str, Any]]:
    """Per-layer change of AuE from network ``a`` (e.g. pretrained) to ``b`` (e.g. fine-tuned):
    rows ``{layer, mean_aue_a, mean_aue_b, change, relative_change, topk_change}`` for the layers
    in both (``change = b - a`` of the mean AuE; ``topk_change``: the mean over the top-k points
    of the change of the top-k curve, the gap between the curves of Fig. 1)."""
    a, b = aue_by_layer(results_a), aue_by_layer(results_b)
    rows = []
    for layer in [layer for layer in a if layer in b]:
        if a[layer].size != b[layer].size:
            raise DataError(f"layer {layer!r} has {a[layer].size} filters in one network and "
                            f"{b[layer].size} in the other")
        ca = topk_curve(torch.from_numpy(a[layer]))
        cb = topk_curve(torch.from_numpy(b[layer]))
        ma, mb = float(a[layer].mean()), float(b[layer].mean())
        rows.append({"layer": layer, "mean_aue_a": ma, "mean_aue_b": mb, "change": mb - ma,
                     "relative_change": (mb - ma) / ma if ma else float("nan"),
                     "topk_change": float(np.mean([y - x for (_, x), (_, y) in zip(ca, cb, strict=True)]))})
    return rows


def _curve_axes(ax: Any, aue: dict[str, np.ndarray], style: str, label: str, points: int) -> None:
    for i, (layer, values) in enumerate(aue.items()):
        curve = topk_curve(torch.from_numpy(values), points)
        xs = [100 * k / values.size for k, _ in curve]
        ax.plot(xs, [m for _, m in curve], style, color=f"C{i}", label=f"{layer} {label}".strip())
    ax.set_xlabel("top k filters (% of the layer, lowest AuE first)")
    ax.set_ylabel("mean AuE (bits)")


def plot_topk_curves(aue: dict[str, np.ndarray], points: int = 30) -> Any:
    """Fig. 1 (right): mean AuE of the k most selective filters of each layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _curve_axes(ax, aue, "-", "", points)
    ax.set_title("Filter entropy: mean AuE of the top-k filters")
    ax.legend(fontsize=8)
    return fig


def plot_histograms(aue: dict[str, np.ndarray], *, reference: dict[str, np.ndarray] | None = None,
                    bins: int = 20, names: tuple[str, str] = ("this network", "reference")) -> Any:
    """Fig. 1 (left): the AuE histogram of each layer (with ``reference`` overlaid)."""
    plt = pyplot()
    layers = list(aue)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    top = max(float(v.max()) for v in [*aue.values(), *(reference or {}).values()])
    edges = np.linspace(0, max(top, 1e-6), bins + 1)
    for ax, layer in zip(axes.flat, layers, strict=False):
        ax.hist(aue[layer], bins=edges, alpha=0.6, label=names[0])
        if reference is not None and layer in reference:
            ax.hist(reference[layer], bins=edges, alpha=0.6, label=names[1])
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("AuE (bits)", fontsize=8)
        ax.set_ylabel("filters", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if reference is not None:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_compare(results_a: Any, results_b: Any, names: tuple[str, str] = ("reference", "this network"),
                 points: int = 30) -> Any:
    """Fig. 1 side by side: top-k curves of both networks (dash-dot ``a``, solid ``b``) and the
    per-layer change of the mean AuE."""
    plt = pyplot()
    a, b = aue_by_layer(results_a), aue_by_layer(results_b)
    change = compare_aue(results_a, results_b)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _curve_axes(left, {k: a[k] for k in b if k in a}, "-.", names[0], points)
    _curve_axes(left, {k: b[k] for k in a if k in b}, "-", names[1], points)
    left.set_title(f"mean AuE of the top-k filters ({names[0]} dash-dot, {names[1]} solid)", fontsize=9)
    left.legend(fontsize=6, ncol=2)
    right.bar([r["layer"] for r in change], [r["change"] for r in change])
    right.axhline(0, color="k", lw=0.5)
    right.set_ylabel(f"mean AuE change ({names[1]} - {names[0]}, bits)")
    right.set_title("per-layer change", fontsize=9)
    fig.tight_layout()
    return fig


class FilterEntropy(Analysis):
    """Per-filter AuE of each layer on the ground-truth boxes of a VOC07 split (paper Sec. 3.2).

    Difficult boxes are left out. Conv layers: every position of a box's map is a sample
    (``spatial_max: true``: one sample per box, the max). ``reference``: the
    ``results/filter_entropy.json`` of another network (e.g. the pretrained one) to compare with.

    Logged keys: ``filter_entropy/<layer>/mean_aue`` (and, with a reference,
    ``filter_entropy/<layer>/mean_aue_change``). Files: ``results/filter_entropy.json|csv`` (rows
    ``layer, filter, aue``), ``results/filter_entropy_topk.json|csv`` (``layer, k, mean_aue``),
    ``figures/filter_entropy.png`` (top-k curves), ``figures/filter_entropy_hist.png``; with a
    reference also ``results/filter_entropy_change.json|csv`` (``compare_aue`` rows) and
    ``figures/filter_entropy_compare.png``.
    """

    name: ClassVar[str] = "filter_entropy"

    def __init__(self, *, layers: Sequence[str] = ("pool5",), split: str = "test", spatial_max: bool = False,
                 num_thresholds: int = 100, threshold_mode: str = "rank", topk_points: int = 30,
                 bins: int = 20, reference: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_threshold_mode(threshold_mode, f"{self.name} threshold_mode")
        self.layers, self.split, self.spatial_max = list(layers), split, spatial_max
        self.num_thresholds, self.threshold_mode = num_thresholds, threshold_mode
        self.topk_points, self.bins = topk_points, bins
        self.reference = Path(reference) if reference else None

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        from cnnft.probing import gtbox_split, layer_features

        reference = self._load_reference()
        net = getattr(model, "net", model)
        layers = net.check_layers(self.layers)
        split = gtbox_split(ctx, self.split)
        keep = torch.from_numpy(~split.ignore[:, 0])
        labels = torch.from_numpy(split.labels.argmax(1))[keep]
        if not keep.any():
            raise DataError(f"{ctx.voc_root}: split {self.split!r} has no non-difficult ground-truth box")
        features = layer_features(model, split, layers, ctx)
        aue: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for layer in layers:
                aue[layer] = layer_aue(features.pop(layer)[keep], labels, len(VOC_CLASSES),
                                       spatial_max=self.spatial_max, num_thresholds=self.num_thresholds,
                                       threshold_mode=self.threshold_mode).double().numpy()
        rows = [{"layer": layer, "filter": i, "aue": float(a)} for layer, v in aue.items()
                for i, a in enumerate(v)]
        metrics = {f"{self.name}/{layer}/mean_aue": float(v.mean()) for layer, v in aue.items()}
        write_table(ctx, self.name, rows, summary=metrics)
        topk = [{"layer": layer, "k": k, "mean_aue": m} for layer, v in aue.items()
                for k, m in topk_curve(torch.from_numpy(v), self.topk_points)]
        write_table(ctx, f"{self.name}_topk", topk)
        save_figure(ctx, plot_topk_curves(aue, self.topk_points), self.name)
        ref_aue = aue_by_layer(reference) if reference is not None else None
        save_figure(ctx, plot_histograms(aue, reference=ref_aue, bins=self.bins), f"{self.name}_hist")
        if reference is not None:
            change = compare_aue(reference, rows)
            extra = {f"{self.name}/{r['layer']}/mean_aue_change": r["change"] for r in change}
            write_table(ctx, f"{self.name}_change", change, summary=extra)
            save_figure(ctx, plot_compare(reference, rows, points=self.topk_points), f"{self.name}_compare")
            metrics.update(extra)
        return metrics

    def _load_reference(self) -> dict[str, Any] | None:
        if self.reference is None:
            return None
        if not self.reference.is_file():
            raise ConfigError(f"filter_entropy reference={self.reference}: no such file; expected the "
                              "results/filter_entropy.json of another network")
        try:
            payload = json.loads(self.reference.read_text())
            _rows_of(payload)
        except (json.JSONDecodeError, DataError) as e:
            raise DataError(f"filter_entropy reference {self.reference}: {e}") from e
        return payload
