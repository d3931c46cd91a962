"""One linear scorer for every SVM of the project: probes, units per class and R-CNN's detectors.

``LinearScorer`` holds the weights ``W`` [n, D], the bias ``b`` [n] and the feature
normalisation the weights were trained on (``normalize`` and, for ``"mean_norm"``, the ``scale``
learned on the training features); ``scores(x) = normalized(x) @ W.T + b``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnnft.errors import ConfigError
from cnnft.svm.config import NORMALIZE_MODES


def mean_norm_scale(samples: Tensor | Iterable[Tensor], target_norm: float) -> float:
    """The scale that makes the mean row norm of the sampled features ``target_norm`` (R-CNN's
    ``rcnn_feature_stats.m``): ``samples`` one ``[N, D]`` matrix or an iterable of them (e.g. one
    per sampled image), norms summed in float64."""
    total, count = 0.0, 0
    for x in [samples] if isinstance(samples, Tensor) else samples:
        total += float(x.double().norm(dim=1).sum())
        count += len(x)
    if count == 0 or not total > 0:
        raise ValueError(f"mean_norm: cannot scale features to mean norm {target_norm}: the {count} "
                         "sampled rows are all zero")
    return target_norm * count / total


def normalize_features(x: Tensor, mode: str, target_norm: float = 20.0, *,
                       reference: Tensor | None = None) -> Tensor:
    """``"l2"``: each row to unit norm (zero rows stay zero); ``"mean_norm"``: all rows times one
    scalar so that the mean row norm of ``reference`` (default ``x``; the training set when
    normalising test features) is ``target_norm``; ``"none"``: ``x`` unchanged."""
    if mode == "l2":
        return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    if mode == "mean_norm":
        return x * mean_norm_scale(x if reference is None else reference, target_norm)
    if mode == "none":
        return x
    raise ConfigError(f"normalize mode {mode!r}; expected one of {list(NORMALIZE_MODES)}")


@dataclass
class LinearScorer:
    """``scores(x) = normalized(x) @ W.T + b`` for features ``x`` [N, D]: ``W`` [n, D], ``b`` [n];
    ``normalize`` ``"l2"`` (unit rows), ``"mean_norm"`` (times ``scale``) or ``"none"``."""

    W: Tensor
    b: Tensor
    normalize: str = "none"
    scale: float = 1.0

    def normalized(self, x: Tensor) -> Tensor:
        """``x`` normalised as the training features were, in ``W``'s dtype and device."""
        x = torch.as_tensor(x).to(self.W.device, self.W.dtype)
        if self.normalize == "l2":
            return normalize_features(x, "l2")
        return x * self.scale if self.normalize == "mean_norm" else x

    @torch.no_grad()
    def scores(self, x: Tensor) -> Tensor:
        """Scores [N, n] of features ``x`` [N, D]."""
        return self.normalized(x) @ self.W.T + self.b

    def decision_function(self, x: Tensor) -> Tensor:
        """``scores`` under scikit-learn's name."""
        return self.scores(x)
