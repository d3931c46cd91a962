"""R-CNN detector training: per-class linear SVMs with one pass of hard-negative mining.

Recipe (R-CNN ``rcnn_train.m``; DESIGN.md "Evaluation protocols"), all classes at once:

- positives of class k: every ground-truth box of class k, "difficult" ones included (R-CNN's
  ``roidb_from_voc.m`` keeps every object; evaluation still ignores them);
- candidate negatives of class k: windows whose IoU with every box of class k (difficult ones
  included, so that a window on a difficult object is never a negative) is below ``neg_iou``
  (0.3). Ground-truth boxes of other classes are windows like any other, as in R-CNN;
- one pass over the training images: until the first retraining every candidate negative is
  added (R-CNN's ``first_time``; at paper scale one image's ~2000 proposals already trigger it),
  afterwards only the hard ones, scoring > ``hard_threshold`` (-1.0001) under the current model;
- retrain as soon as some class has gained more than ``retrain_limit`` (2000) new negatives
  since the last training, then evict that class's cached negatives scoring < ``evict_threshold``
  (-1.2); retrain once more at the end. The retrainings during the pass only choose which
  negatives are hard: they solve to a looser tolerance (``pass_tol``, 1e-3, still far tighter
  than liblinear's default 0.1 that R-CNN used), the final one to ``tol``;
- hinge-loss linear SVMs (``cnnft.svm.train_svms`` with ``loss="hinge"``: liblinear ``-s 3``,
  R-CNN's ``liblinear_type = 3``; ``svm.loss=squared_hinge`` for ``-s 2``) with C = 1e-3,
  positive weight 2, bias feature 10, on features multiplied by one scale that makes their
  mean norm 20 (estimated on a sample of training windows; R-CNN's ``rcnn_feature_stats.m``
  samples 200 windows of 200 images). A solve that stops at ``max_iter`` is logged with the
  class and C and counted in ``MiningStats.unconverged``.

Storage and solves: every class keeps its own negative set, but the sets live in one shared row
buffer with a ``[rows, classes]`` membership mask, so negatives hard for several classes are
stored once; rows no class holds any more are dropped at eviction, and appends are amortised
(capacity doubling). Scoring a new image and evicting are one matmul for all classes. A
retraining solves each class on its own rows (its positives and its cached negatives),
starting from its previous detector (``warm_start``): on the demo data a cached row belongs to
about 2 of the 20 classes, so one batched problem over all rows with per-class weights did ~10x
the arithmetic. The pass is linear in the number of images while the cache stays bounded;
when eviction does not keep it bounded (weak early detectors: the demo's cache grows with the
images), each retraining costs more as the pass goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from cnnft.errors import ConfigError
from cnnft.svm import LinearScorer, SolveLabel, SVMConfig, resolved, train_svms

log = logging.getLogger(__name__)


#: R-CNN's detector SVMs (``conf/svm/rcnn.yaml``): hinge loss, C 1e-3, positive weight 2, bias
#: feature 10, features scaled to mean norm 20
RCNN_SVM = SVMConfig(c_grid=(1e-3,), folds=1, pos_weight=2.0, bias=10.0, normalize="mean_norm",
                     target_norm=20.0, loss="hinge")


@dataclass
class MiningConfig:
    """Detector training settings (``conf/analyses/detection.yaml``): the SVM (``svm``, one C,
    ``normalize="mean_norm"``: ``conf/svm/rcnn.yaml``) and mining's own knobs (``mining``)."""

    svm: SVMConfig = field(default_factory=lambda: replace(RCNN_SVM))
    neg_iou: float = 0.3
    hard_threshold: float = -1.0001
    evict_threshold: float = -1.2
    retrain_limit: int = 2000
    warm_start: bool = True  # each retraining starts from the previous detectors
    # solver tolerance of the retrainings during the pass, which only pick the hard negatives
    # (None: ``svm.tol``); the final retraining always solves to ``svm.tol``
    pass_tol: float | None = 1e-3

    def __post_init__(self) -> None:
        if len(self.svm.c_grid) != 1:
            raise ConfigError(f"detection svm.c_grid={list(self.svm.c_grid)}: the detectors train at one "
                              "C (no cross-validation in hard-negative mining)")
        if self.svm.normalize != "mean_norm":
            raise ConfigError(f"detection svm.normalize={self.svm.normalize!r}: detectors scale their "
                              "features to a mean norm (R-CNN); expected 'mean_norm'")
        if self.retrain_limit < 1:
            raise ConfigError(f"mining.retrain_limit={self.retrain_limit} must be >= 1")
        if not self.evict_threshold <= self.hard_threshold:
            raise ConfigError(f"mining.evict_threshold={self.evict_threshold} must be <= "
                              f"hard_threshold={self.hard_threshold} (else new hard negatives are "
                              "evicted at once)")

    @property
    def c(self) -> float:
        return self.svm.c_grid[0]

    def solve_cfg(self, final: bool = True) -> SVMConfig:
        """The SVM settings of a retraining: during the pass at ``pass_tol``, the final one at ``svm.tol``."""
        tol = self.svm.tol if final or self.pass_tol is None else max(self.svm.tol, self.pass_tol)
        return replace(self.svm, tol=tol)


@dataclass
class MiningStats:
    images: int = 0
    retrains: int = 0
    added: int = 0
    evicted: int = 0
    cache_rows: int = 0
    cache_per_class: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: SVM solves (one per class and retraining) that stopped at max_iter above their tolerance
    unconverged: int = 0
    #: the final cache: ``(ids [n, 2] of (image number in the stream, window row), mask [n, K])``
    cached: tuple[Tensor, Tensor] | None = None


class _Rows:
    """An append-only row buffer with amortised growth: features ``x`` [n, D], class membership
    ``mask`` [n, K] and ``ids`` [n, 2] (image number, window row)."""

    def __init__(self, dim: int, classes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.x = torch.empty(0, dim, device=device, dtype=dtype)
        self.mask = torch.empty(0, classes, device=device, dtype=torch.bool)
        self.ids = torch.empty(0, 2, device=device, dtype=torch.long)
        self.n = 0

    def append(self, x: Tensor, mask: Tensor, ids: Tensor) -> None:
        need = self.n + len(x)
        if need > len(self.x):
            cap = max(need, 2 * len(self.x), 256)
            old = (self.x, self.mask, self.ids)
            self.x, self.mask, self.ids = (t.new_zeros(cap, t.shape[1]) for t in old)
            for new, t in zip((self.x, self.mask, self.ids), old, strict=True):
                new[:self.n] = t[:self.n]
        self.x[self.n:need], self.mask[self.n:need], self.ids[self.n:need] = x, mask, ids
        self.n = need

    def keep(self, rows: Tensor) -> None:
        kept = int(rows.sum())
        for t in (self.x, self.mask, self.ids):
            t[:kept] = t[:self.n][rows]
        self.n = kept


@torch.no_grad()
def mine_detectors(positives: Tensor, positive_labels: Tensor, negatives: Iterable[tuple[Tensor, Tensor]],
                   *, scale: float, cfg: MiningConfig, device: str | torch.device = "cpu",
                   stats: MiningStats | None = None, where: str = "detection",
                   class_names: Sequence[str] | None = None) -> LinearScorer:
    """Train one detector per class by hard-negative mining (see the module doc).

    Args:
        positives: features [P, D] of the positive windows (unscaled).
        positive_labels: bool [P, K]: row p is a positive of class k.
        negatives: per training image, ``(features [n, D], candidate [n, K])``: the image's
            windows and which of them are candidate negatives of each class. Streamed once.
        scale: feature multiplier (``cnnft.svm.mean_norm_scale`` of sampled training windows).
        where, class_names: how non-convergence warnings name the run (e.g. the layer) and classes.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    final_svm, pass_svm = (resolved(s, positives) for s in (cfg.solve_cfg(), cfg.solve_cfg(final=False)))
    labels = positive_labels.to(device, torch.bool)
    classes = labels.shape[1]
    missing = torch.nonzero(~labels.any(0)).flatten().tolist()
    if missing:
        raise ValueError(f"no positive training window for class index(es) {missing}")
    dim, svm_bias = positives.shape[1], final_svm.bias

    def augment(x: Tensor) -> Tensor:  # scaled, with the SVM's bias feature as the last column
        return torch.cat([x.to(device, torch.float32) * scale,
                          torch.full((len(x), 1), svm_bias, device=device)], 1)

    # one buffer: the P positives first (never evicted), then the cached negatives; a class's
    # training rows are one masked gather (the bias column stays out: train_svms adds it)
    cache = _Rows(dim + 1, classes, device, torch.float32)
    P = len(positives)
    ids = torch.stack([torch.full((P,), -1), torch.arange(P)], 1)  # (no image, positive row)
    cache.append(augment(positives), labels, ids.to(device))
    per_class_pos = labels.sum(0).tolist()
    W = torch.zeros(classes, dim, device=device)
    b = torch.zeros(classes, device=device)
    added = torch.zeros(classes, dtype=torch.long, device=device)
    stats = stats if stats is not None else MiningStats()
    first_time = True

    def retrain(W: Tensor, b: Tensor, svm: SVMConfig) -> tuple[Tensor, Tensor]:
        W, b = W.clone(), b.clone()
        solves: dict = {}
        for k in range(classes):  # each class on its own rows: a cached row belongs to few classes
            x = cache.x[:cache.n, :dim][cache.mask[:cache.n, k]]  # its positives, then its negatives
            y = torch.arange(len(x), device=device) < per_class_pos[k]
            start = (W[k:k + 1], b[k:k + 1]) if cfg.warm_start else None
            label = SolveLabel(f"{where} retraining {stats.retrains + 1}",
                               classes=[class_names[k] if class_names is not None else f"#{k}"])
            Wk, bk = train_svms(x, y, cfg.c, cfg=svm, init=start, stats=solves, label=label)
            W[k], b[k] = Wk[0].float(), bk[0].float()
        # evict easy negatives, per class (rows after the positives)
        z = cache.x[P:cache.n] @ torch.cat([W, (b / svm_bias)[:, None]], 1).T
        easy = cache.mask[P:cache.n] & (z < cfg.evict_threshold)
        stats.evicted += int(easy.sum())
        cache.mask[P:cache.n] &= ~easy
        cache.keep(cache.mask[:cache.n].any(1))  # positives hold their class: always kept
        stats.retrains += 1
        stats.unconverged += solves.get("unconverged", 0)
        return W, b

    for image, (x, candidate) in enumerate(negatives):
        stats.images += 1
        x = augment(x)
        candidate = candidate.to(device, torch.bool)
        new = candidate if first_time else candidate & (x[:, :dim] @ W.T + b > cfg.hard_threshold)
        rows = new.any(1)
        if rows.any():
            index = torch.nonzero(rows).flatten()
            cache.append(x[rows], new[rows], torch.stack([torch.full_like(index, image), index], 1))
            added += new.sum(0)
            stats.added += int(new.sum())
        if bool((added > cfg.retrain_limit).any()):
            W, b = retrain(W, b, pass_svm)
            added.zero_()
            first_time = False
    if first_time or bool(added.any()) or pass_svm.tol != final_svm.tol:
        W, b = retrain(W, b, final_svm)
    stats.cache_rows = cache.n - P
    stats.cache_per_class = cache.mask[P:cache.n].sum(0).tolist()
    stats.cached = (cache.ids[P:cache.n].cpu(), cache.mask[P:cache.n].cpu())
    stats.seconds = time.perf_counter() - t0
    log.info("hard-negative mining: %d images, %d retrainings, %d negatives added, %d evicted, "
             "%d cached at the end, %.1f s (solver in %s, %s loss; %d solve(s) stopped at max_iter)",
             stats.images, stats.retrains, stats.added, stats.evicted, stats.cache_rows, stats.seconds,
             final_svm.dtype, final_svm.loss, stats.unconverged)
    return LinearScorer(W, b, normalize="mean_norm", scale=scale)
