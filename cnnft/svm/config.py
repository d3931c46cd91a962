"""One SVM configuration (``SVMConfig``: ``conf/svm/``) and the choice of the solver's precision.

Probes (``conf/svm/probe.yaml`` at ``probe``), units per class and R-CNN's detectors
(``conf/svm/rcnn.yaml`` at ``analyses.detection.svm``) all read their settings from this one
dataclass; hard-negative mining adds only its own knobs (``cnnft.detection.mining.MiningConfig``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from cnnft.errors import ConfigError

NORMALIZE_MODES = ("l2", "mean_norm", "none")
LOSSES = ("squared_hinge", "hinge")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``dtype="auto"`` solves in float64 when the features' spread about their mean is below this
#: fraction of their size (``relative_spread``), else in float32
AUTO_FLOAT64_SPREAD = 0.1


@dataclass
class SVMConfig:
    """SVM settings (``conf/svm/probe.yaml``, ``conf/svm/rcnn.yaml``).

    ``c_grid``: C values tried by cross-validation (one value: no choice to make, e.g. R-CNN's
    detectors); ``folds``: k of k-fold CV; ``pos_weight``: loss weight of positives; ``bias``:
    value B of the constant feature (liblinear's ``intercept_scaling``); ``normalize``: ``"l2"``
    (unit rows), ``"mean_norm"`` (R-CNN: one scale so that the mean training row norm is
    ``target_norm``) or ``"none"``; ``tol``: relative gradient-norm tolerance; ``max_iter``:
    Newton iterations; ``seed``: fold assignment; ``warm_start``: solve the C grid from small to
    large C, each from the previous C's solution; ``max_problems``: problems per batch (bounds
    the ``[N, K]`` buffers).
    ``dtype``: ``"float32"``, ``"float64"`` or ``"auto"``: float64 for nearly constant features
    (``relative_spread`` below ``AUTO_FLOAT64_SPREAD``: fc layers of untrained networks and early
    snapshots, whose rows differ by < 1% of their norm), where float32 cannot rank the samples
    (scores off by up to half their spread at spread 0.0035), float32 otherwise.
    ``loss``: ``"squared_hinge"`` (liblinear ``-s 2``/``-s 1``, the probes' protocol) or
    ``"hinge"`` (L1 loss, liblinear ``-s 3``: R-CNN's detectors). The hinge is not twice
    differentiable; the Newton solver minimises it smoothed quadratically over
    ``|1 - margin| <= h`` (Chapelle 2007's Huber hinge, within ``h / 4`` of the hinge at every
    row), ``h = hinge_smoothing``. At 0.01 held-out decision values differ from liblinear's exact
    optimum by ~2% of their spread at most, less than liblinear's own stopping rule at R-CNN's
    setting (default ``eps`` 0.1: ~3%); smaller values are closer and slower."""

    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1, 10)
    folds: int = 3
    pos_weight: float = 2.0
    bias: float = 1.0
    normalize: str = "l2"  # "l2" | "mean_norm" | "none"
    target_norm: float = 20.0
    tol: float = 1e-4
    max_iter: int = 100
    seed: int = 0
    dtype: str = "auto"  # "float32" | "float64" | "auto"
    warm_start: bool = True
    max_problems: int = 512
    loss: str = "squared_hinge"  # or "hinge"
    hinge_smoothing: float = 0.01

    def __post_init__(self) -> None:
        self.c_grid = tuple(float(c) for c in self.c_grid)
        if not self.c_grid or min(self.c_grid) <= 0 or len(set(self.c_grid)) != len(self.c_grid):
            raise ConfigError(f"probe c_grid must be distinct positive values, got {list(self.c_grid)}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"probe normalize={self.normalize!r}; expected one of {list(NORMALIZE_MODES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"svm loss={self.loss!r}; expected one of {list(LOSSES)}")
        if self.dtype not in (*DTYPES, "auto"):
            raise ConfigError(f"probe dtype={self.dtype!r}; expected one of {[*DTYPES, 'auto']}")
        if self.folds < 2 and len(self.c_grid) > 1:
            raise ConfigError(f"probe folds={self.folds}: choosing among {len(self.c_grid)} C values "
                              "needs at least 2 folds")
        for key in ("pos_weight", "bias", "target_norm", "tol", "hinge_smoothing"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"probe {key} must be > 0, got {getattr(self, key)}")
        if self.max_iter < 1 or self.max_problems < 1:
            raise ConfigError("probe max_iter and max_problems must be >= 1")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None, where: str = "svm",
                     base: SVMConfig | None = None) -> SVMConfig:
        """From a config node (``conf/svm/*.yaml``; lists become tuples), keys it leaves out taken
        from ``base`` (default: the dataclass defaults). Unknown keys are a ConfigError naming
        ``where`` and the keys."""
        settings = dict(settings or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            hint = (" (solver=sklearn is gone: the scikit-learn reference is tests/svm_reference.py)"
                    if "solver" in unknown else "")
            raise ConfigError(f"{where}: unknown SVM setting(s) {unknown}{hint}; expected some of "
                              f"{sorted(known)} (conf/svm/)")
        given = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in settings.items()}
        return cls(**given) if base is None else replace(base, **given)


def relative_spread(x: Tensor, max_rows: int = 4096) -> float:
    """RMS distance of the rows of ``x`` [N, D] from their mean over their RMS norm (0: all rows
    equal, 1: mean zero), estimated on at most ``max_rows`` evenly strided rows."""
    x = x[:: -(-len(x) // max_rows)] if len(x) > max_rows else x
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    squares = float(x.pow(2).sum(dtype=torch.float64))
    if not squares > 0:
        return 0.0
    mean_sq = float(x.sum(0, dtype=torch.float64).pow(2).sum()) / len(x) ** 2
    return math.sqrt(max(squares / len(x) - mean_sq, 0.0) / (squares / len(x)))


def solver_dtype(x: Tensor, cfg: SVMConfig) -> torch.dtype:
    """The dtype ``cfg.dtype`` asks for; for ``"auto"`` decided by ``relative_spread`` of ``x``."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    return torch.float64 if relative_spread(x) < AUTO_FLOAT64_SPREAD else torch.float32


def resolved(cfg: SVMConfig, x: Tensor) -> SVMConfig:
    """``cfg`` with ``dtype="auto"`` decided on the features ``x``: for a sequence of solves on
    related rows (hard-negative mining) that decides once instead of at every solve."""
    dtype = solver_dtype(x, cfg)
    return replace(cfg, dtype=next(k for k, v in DTYPES.items() if v == dtype))
