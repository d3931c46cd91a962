"""Linear SVM probes: one-vs-rest (squared-)hinge SVMs for many classes, C values and folds at once.

Each problem k minimises liblinear's L2-regularised L2-loss objective (scikit-learn's
``LinearSVC(loss="squared_hinge", penalty="l2", class_weight={1: pos_weight, 0: 1},
intercept_scaling=bias)``)::

    0.5 * ||w||^2 + C_k * sum_i c_ik * max(0, 1 - y_ik * (w . [x_i, B]))^2,   y in {-1, +1}

where the bias is an extra constant feature of value ``B = cfg.bias`` whose weight is regularised
like the others (the decision is ``x . w[:D] + b`` with ``b = B * w[D]``), and ``c_ik`` is
``pos_weight`` for positives, 1 for negatives and 0 for rows the problem must not see (held-out
fold, ignored "difficult" image). ``loss="hinge"`` (``cfg.loss``) replaces the squared hinge by
the hinge ``max(0, 1 - y w.x)`` (liblinear ``-s 3``, ``LinearSVC(loss="hinge")``; R-CNN's
detectors), minimised smoothed (``SVMConfig.hinge_smoothing``). Every solve that stops at
``max_iter`` above its tolerance is logged as a warning naming where, the class and C, and
counted in ``stats["unconverged"]``. All problems share the feature matrix, so one batched solver
handles ``K = classes x C values x (folds + 1)`` of them: weights ``[N, K]``, solutions ``[K, D+1]``.

Solver (``solver="torch"``): primal truncated Newton, as liblinear's ``-s 2`` but batched. The
objective is piecewise quadratic and once differentiable; per Newton iteration the gradient is
``w + 2 X^T (C c a (Xw - y))`` over the active set ``a = [y Xw < 1]`` and the Newton direction
comes from batched conjugate gradient on ``H v = v + 2 X^T (C c a (X v))`` (two
``[N, D] x [D, K]`` matmuls per step for all K problems, converged problems dropped from the
matmuls). The step length is the exact minimiser of the piecewise-quadratic ``f(w + t d)``, found
with a safeguarded 1-D Newton search that reuses ``X d`` (no extra matmul). Iterations stop when
``||grad f(w)|| <= tol * ||grad f(0)||`` for every problem, or after ``max_iter`` Newton steps.

The C grid is solved from small to large C, each problem warm-started from its solution at
the previous C (``warm_start``; the classes and folds of one C form one batch); this halves the
Newton iterations of the large C values. CG is not preconditioned: the Hessian is the identity
plus a low-rank term whose few large eigenvalues (ReLU features share one dominant mean
direction) CG absorbs in about one step each. Preconditioners that rescale those directions
(liblinear's Hessian diagonal, or the exact diagonal in the top principal directions) broke that
clustering: 2-4x more CG steps on l2-normalised pool5-like features, up to 50x on mean-norm ones.

``solver="sklearn"`` is the reference: ``LinearSVC`` fitted one class, one C and one fold at a
time (as VISSL's VOC07 SVMs), through the same API.

C selection: rows are assigned to ``folds`` folds by a seeded random permutation (a stratified
split is not defined for multi-label data); for each class and C the held-out scores of each fold
give a VOC07 11-point AP ("ignore" rows left out), averaged over the folds in which the class has
a held-out positive. The best C per class wins, ties going to the smaller C. ``fit_probe`` then
uses the solution trained on all rows with that C.

``train_svms`` and ``select_c`` take the features as they are; ``fit_probe`` normalises them
(``cfg.normalize``) and its ``Probe.decision_function`` applies the same normalisation to test
features (for ``"mean_norm"`` the scale learned on the training set).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from cnnft.errors import ConfigError
from cnnft.metrics import average_precision

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("l2", "mean_norm", "none")
SOLVERS = ("torch", "sklearn")
LOSSES = ("squared_hinge", "hinge")
#: from a cold start, ``loss="hinge"`` is first solved at ``h`` this many times ``hinge_smoothing``
#: (a continuation stage that warm-starts the final one)
HINGE_CONTINUATION = 10.0
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``dtype="auto"`` solves in float64 when the features' spread about their mean is below this
#: fraction of their size (``relative_spread``), else in float32
AUTO_FLOAT64_SPREAD = 0.1
#: CG stops at ``||residual|| <= CG_RTOL * ||gradient||`` (TRON's 0.1) or after CG_MAX_ITER steps
CG_RTOL = 0.1
CG_MAX_ITER = 200
#: feature matrices with fewer elements are solved on one CPU thread (see ``_threads_for``)
SMALL_PROBLEM = 1 << 21


@dataclass
class SVMConfig:
    """Probe settings (``conf/probe/default.yaml``).

    ``c_grid``: C values tried by cross-validation; ``folds``: k of k-fold CV; ``pos_weight``:
    loss weight of positives; ``bias``: value B of the constant feature (liblinear's
    ``intercept_scaling``); ``normalize``: ``"l2"`` (unit rows), ``"mean_norm"`` (R-CNN: one scale
    so that the mean training row norm is ``target_norm``) or ``"none"``; ``tol``: relative
    gradient-norm tolerance (for ``"sklearn"``: LinearSVC's ``tol``); ``max_iter``: Newton
    iterations; ``solver``: ``"torch"`` or ``"sklearn"``; ``seed``: fold assignment. Torch solver
    only: ``dtype``, ``warm_start``, ``max_problems`` (problems per batch, bounds the ``[N, K]``
    buffers).
    ``dtype``: ``"float32"``, ``"float64"`` or ``"auto"``: float64 for nearly constant features
    (``relative_spread`` below ``AUTO_FLOAT64_SPREAD``: fc layers of untrained networks and early
    snapshots, whose rows differ by < 1% of their norm), where float32 cannot rank the samples
    (scores off by up to half their spread at spread 0.0035), float32 otherwise.
    ``sklearn_max_iter``: LinearSVC's ``max_iter``.
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
    solver: str = "torch"  # or "sklearn"
    seed: int = 0
    dtype: str = "auto"  # "float32" | "float64" | "auto"
    warm_start: bool = True
    max_problems: int = 512
    sklearn_max_iter: int = 2000
    loss: str = "squared_hinge"  # or "hinge"
    hinge_smoothing: float = 0.01

    def __post_init__(self) -> None:
        self.c_grid = tuple(float(c) for c in self.c_grid)
        if not self.c_grid or min(self.c_grid) <= 0 or len(set(self.c_grid)) != len(self.c_grid):
            raise ConfigError(f"probe c_grid must be distinct positive values, got {list(self.c_grid)}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"probe normalize={self.normalize!r}; expected one of {list(NORMALIZE_MODES)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"probe solver={self.solver!r}; expected one of {list(SOLVERS)}")
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


# --------------------------------------------------------------------------- normalisation


def _mean_norm_scale(reference: Tensor, target_norm: float) -> float:
    mean = reference.to(torch.float64).norm(dim=1).mean().item()
    if not mean > 0:
        raise ValueError("mean_norm: the reference features are all zero; no scale makes their mean "
                         f"norm {target_norm}")
    return target_norm / mean


def normalize_features(x: Tensor, mode: str, target_norm: float = 20.0, *,
                       reference: Tensor | None = None) -> Tensor:
    """``"l2"``: each row to unit norm (zero rows stay zero); ``"mean_norm"``: all rows times one
    scalar so that the mean row norm of ``reference`` (default ``x``; the training set when
    normalising test features) is ``target_norm``; ``"none"``: ``x`` unchanged."""
    if mode == "l2":
        return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    if mode == "mean_norm":
        return x * _mean_norm_scale(x if reference is None else reference, target_norm)
    if mode == "none":
        return x
    raise ConfigError(f"normalize mode {mode!r}; expected one of {list(NORMALIZE_MODES)}")


# --------------------------------------------------------------------------- batched solver


def _terms(Z: Tensor, T: Tensor, S: Tensor, h: float | None) -> tuple[Tensor, Tensor]:
    """Per row and problem, the loss's first and second derivatives in the margin ``z = (F w)``:
    ``(r, D)`` with ``grad f = w + F^T r`` and ``Hessian f = I + F^T diag(D) F``. ``h=None``:
    squared hinge ``S max(0, 1 - T z)^2``; else the hinge smoothed over ``|1 - T z| <= h``
    (``SVMConfig.hinge_smoothing``)."""
    m = T * Z
    if h is None:
        act = S * (m < 1).to(Z.dtype)
        return 2 * act * (Z - T), 2 * act
    band = ((m >= 1 - h) & (m <= 1 + h)).to(Z.dtype)
    r = -S * T * torch.where(m < 1 - h, torch.ones_like(m), band * (1 + h - m) / (2 * h))
    return r, S * band / (2 * h)


def _cg(F: Tensor, D: Tensor, b: Tensor, M: Tensor | None = None) -> tuple[Tensor, int]:
    """Solve ``(I + F^T diag(D[:, k]) F) x_k = b_k`` for each row k of ``b`` by conjugate gradient,
    dropping each problem from the matmuls once it has converged. Returns the solutions and the
    number of steps of the slowest problem. ``M`` [K, P] (0/1): solve within the coordinates
    each problem may use (``b`` must be zero outside them; Hessian products are masked)."""
    rows = torch.nonzero(D.any(1)).squeeze(1)  # rows without curvature drop out of the products
    if len(rows) < len(F):
        F, D = F[rows], D[rows]
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    stop = CG_RTOL * b.norm(dim=1)
    live = torch.nonzero(rr.sqrt() > stop).squeeze(1)
    steps = 0
    while live.numel() and steps < CG_MAX_ITER:
        steps += 1
        pl = p[live]
        hp = pl + (D[:, live] * (F @ pl.T)).T @ F
        if M is not None:
            hp = hp * M[live]
        alpha = rr[live] / (pl * hp).sum(1)
        x[live] += alpha[:, None] * pl
        rl = r[live] - alpha[:, None] * hp
        r[live] = rl
        rr_new = (rl * rl).sum(1)
        going = rr_new.sqrt() > stop[live]
        live, rl, pl, rr_new = live[going], rl[going], pl[going], rr_new[going]
        if live.numel():
            p[live] = rl + (rr_new / rr[live])[:, None] * pl
            rr[live] = rr_new
    return x, steps


def _line_search(wd: Tensor, dd: Tensor, Z: Tensor, Zd: Tensor, T: Tensor, S: Tensor,
                 h: float | None = None, iters: int = 30) -> Tensor:
    """Per problem, the step t minimising ``f(w + t d)`` (piecewise quadratic in t), from
    ``w.d``, ``d.d``, margins ``Z = F w`` and ``Zd = F d``: safeguarded Newton on ``f'(t) = 0``
    (``f'`` is increasing) starting at t = 1 inside a shrinking bracket."""
    t = torch.ones_like(wd)
    lo = torch.zeros_like(t)
    hi = torch.full_like(t, math.inf)
    tiny = torch.finfo(t.dtype).tiny
    for _ in range(iters):
        r, D = _terms(Z + t * Zd, T, S, h)
        g = wd + t * dd + (r * Zd).sum(0)
        curv = (dd + (D * Zd * Zd).sum(0)).clamp_min(tiny)
        lo = torch.where(g < 0, t, lo)
        hi = torch.where(g >= 0, t, hi)
        t_new = t - g / curv
        outside = (t_new <= lo) | (t_new >= hi)
        t_new = torch.where(outside, torch.where(torch.isinf(hi), 2 * t, (lo + hi) / 2), t_new)
        done = bool(((t_new - t).abs() <= 1e-6 * t).all())
        t = t_new
        if done:
            break
    return t


def _newton(F: Tensor, T: Tensor, S: Tensor, *, tol: float, max_iter: int, W0: Tensor | None = None,
            stats: dict | None = None, M: Tensor | None = None, loss: str = "squared_hinge",
            smoothing: float = 0.01) -> tuple[Tensor, Tensor]:
    """Solve K problems ``min 0.5 ||w_k||^2 + sum_i S[i,k] loss(T[i,k] (F w_k)_i)``.

    ``F`` [N, P] features (bias column included), ``T`` [N, K] targets in {-1, +1}, ``S`` [N, K]
    per-row weights (C times class weight, 0 for rows the problem must not see), ``W0`` [K, P] a
    starting point, ``M`` [K, P] 0/1 masks of the features each problem may use (the others keep
    weight 0: the problem restricted to those columns). ``loss``: ``"squared_hinge"``, or
    ``"hinge"``, minimised as the hinge smoothed at ``h = smoothing`` (``_terms``; without ``W0``
    first at ``HINGE_CONTINUATION * h``, which warm-starts the final stage).
    Returns W [K, P] and a bool [K]: the problems stopped at ``max_iter`` Newton steps (of the
    last stage) above ``tol``. ``stats`` (if given) receives Newton iterations and CG steps."""
    N, P = F.shape
    K = T.shape[1]
    W = torch.zeros(K, P, dtype=F.dtype, device=F.device) if W0 is None else W0.clone()
    if M is not None:
        W *= M
    stages: list[float | None] = [None]
    if loss == "hinge":
        stages = ([HINGE_CONTINUATION * smoothing] if W0 is None else []) + [smoothing]
    Z = F @ W.T
    newton = cg = 0
    for h in stages:
        g0 = -(_terms(torch.zeros_like(T[:1]), T, S, h)[0].T @ F)  # -grad f(0)
        g0 = (g0 if M is None else g0 * M).norm(dim=1)  # the reference of the stopping test
        idx = torch.arange(K, device=F.device)
        steps = 0
        while True:
            Zi, Ti, Si = Z[:, idx], T[:, idx], S[:, idx]
            r, D = _terms(Zi, Ti, Si, h)
            G = W[idx] + r.T @ F
            if M is not None:
                G = G * M[idx]
            going = G.norm(dim=1) > tol * g0[idx]
            idx, G, D = idx[going], G[going], D[:, going]
            Zi, Ti, Si = Zi[:, going], Ti[:, going], Si[:, going]
            if not idx.numel() or steps == max_iter:
                break
            steps += 1
            d, k = _cg(F, D, -G, None if M is None else M[idx])
            cg += k
            Zd = F @ d.T
            t = _line_search((W[idx] * d).sum(1), (d * d).sum(1), Zi, Zd, Ti, Si, h)
            W[idx] += t[:, None] * d
            Z[:, idx] = Zi + t * Zd
        newton += steps
    unconverged = torch.zeros(K, dtype=torch.bool, device=F.device)
    unconverged[idx] = True
    if stats is not None:
        stats["newton"] = stats.get("newton", 0) + newton
        stats["cg"] = stats.get("cg", 0) + cg
    return W, unconverged


@contextmanager
def _threads_for(F: Tensor) -> Iterator[None]:
    """One intra-op thread for small CPU problems. Their many small ops gain little from threads,
    and on a busy machine each parallel region waits for a descheduled worker: a 900 x 600 CV grid
    took 36 s of CPU on 2 threads against 0.5 s on 1 while other jobs shared the 2 cores."""
    old = torch.get_num_threads()
    if F.device.type != "cpu" or F.numel() >= SMALL_PROBLEM or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _augment(x: Tensor, bias: float) -> Tensor:
    return torch.cat([x, torch.full((x.shape[0], 1), bias, dtype=x.dtype, device=x.device)], 1)


@dataclass(frozen=True)
class SolveLabel:
    """How the non-convergence warning names a batch of solves: ``where`` (the caller: analysis,
    layer, ablation), ``classes`` (the name of each label column), ``masks`` (of each row mask:
    CV folds, all rows)."""

    where: str = "SVM"
    classes: Sequence[str] | None = None
    masks: Sequence[str] | None = None

    def problem(self, cls: int, c: float, j: int) -> str:
        name = self.classes[cls] if self.classes is not None else f"#{cls}"
        mask = f" ({self.masks[j]})" if self.masks is not None else ""
        return f"class {name} C={c:g}{mask}"


def _report(failed: Sequence[tuple[int, float, int]], cfg: SVMConfig, label: SolveLabel | None,
            stats: dict | None, limit: int = 20) -> None:
    """Log one warning naming every ``(class, C, mask)`` problem that stopped at ``max_iter`` above
    its tolerance, and add their count to ``stats["unconverged"]``."""
    if stats is not None:
        stats["unconverged"] = stats.get("unconverged", 0) + len(failed)
    if not failed:
        return
    label = label or SolveLabel()
    names = [label.problem(*f) for f in failed[:limit]]
    more = f" and {len(failed) - limit} more" if len(failed) > limit else ""
    limit_name = (f"LinearSVC max_iter={cfg.sklearn_max_iter}" if cfg.solver == "sklearn"
                  else f"max_iter={cfg.max_iter} Newton iterations")
    log.warning("%s: %d SVM solve(s) stopped at %s above tol=%g (%s loss): %s%s", label.where,
                len(failed), limit_name, cfg.tol, cfg.loss, ", ".join(names), more)


def _solve_grid(F: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float],
                cfg: SVMConfig, stats: dict | None = None, columns: Tensor | None = None,
                init: Tensor | None = None, label: SolveLabel | None = None) -> Tensor:
    """All problems (C, class, row mask): ``y`` [N, n] bool, ``weight`` [N, n] class weights (0 =
    ignored), ``masks`` [N, m] rows seen by each mask, ``columns`` [n, P] (optional) the feature
    columns each class may use, ``init`` [n, P] (optional) each class's starting point.
    Returns W [len(c_values), n, m, P]; problems that stop at ``max_iter`` are reported
    (``_report``)."""
    N, P = F.shape
    n, m = y.shape[1], masks.shape[1]
    pairs = [(cls, j) for cls in range(n) for j in range(m)]
    order = sorted(range(len(c_values)), key=lambda i: c_values[i])
    # warm start: one C at a time, small to large; otherwise every C in the same batch
    stages = [[i] for i in order] if cfg.warm_start else [order]
    out = torch.zeros(len(c_values), n, m, P, dtype=F.dtype, device=F.device)
    ypm = y.to(F.dtype) * 2 - 1
    per_chunk = max(1, cfg.max_problems // len(stages[0]))
    failed: list[tuple[int, float, int]] = []
    for start in range(0, len(pairs), per_chunk):
        chunk = pairs[start:start + per_chunk]
        cls = torch.tensor([p[0] for p in chunk], device=F.device)
        msk = torch.tensor([p[1] for p in chunk], device=F.device)
        prev = None if init is None else init[cls].to(F.dtype).repeat(len(stages[0]), 1)
        for stage in stages:
            c = torch.tensor([c_values[i] for i in stage], dtype=F.dtype, device=F.device)
            T = ypm[:, cls].repeat(1, len(stage))
            S = (weight[:, cls] * masks[:, msk]).repeat(1, len(stage)) * c.repeat_interleave(len(chunk))
            M = None if columns is None else columns[cls].to(F.dtype).repeat(len(stage), 1)
            W, stopped = _newton(F, T, S, tol=cfg.tol, max_iter=cfg.max_iter, W0=prev, M=M, loss=cfg.loss,
                                 smoothing=cfg.hinge_smoothing, stats=stats)
            W = W.view(len(stage), len(chunk), P)
            for i, ci in enumerate(stage):
                out[ci, cls, msk] = W[i]
            failed += [(chunk[q][0], c_values[stage[a]], chunk[q][1])
                       for a, q in torch.nonzero(stopped.view(len(stage), len(chunk))).tolist()]
            prev = W[-1]
    _report(failed, cfg, label, stats)
    return out


# --------------------------------------------------------------------------- inputs, folds, CV


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


def solver_dtype(x: Tensor, cfg: SVMConfig, *, augmented: bool = False) -> torch.dtype:
    """The dtype ``cfg.dtype`` asks for; for ``"auto"`` decided by ``relative_spread`` of ``x``
    (without its bias column when ``augmented``)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    spread = relative_spread(x[:, :-1] if augmented else x)
    return torch.float64 if spread < AUTO_FLOAT64_SPREAD else torch.float32


def resolved(cfg: SVMConfig, x: Tensor) -> SVMConfig:
    """``cfg`` with ``dtype="auto"`` decided on the features ``x``: for a sequence of solves on
    related rows (hard-negative mining) that decides once instead of at every solve."""
    dtype = solver_dtype(x, cfg)
    return replace(cfg, dtype=next(k for k, v in DTYPES.items() if v == dtype))


def _matrix(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    return x


def _inputs(x: Tensor, y: Tensor, ignore: Tensor | None, cfg: SVMConfig, *, augmented: bool = False
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Features in the solver's dtype, labels as bool [N, n], class weights [N, n] (0 = ignored)."""
    x = _matrix(x)
    x = x.to(solver_dtype(x, cfg, augmented=augmented))
    y = torch.as_tensor(y, device=x.device)
    y = y[:, None] if y.dim() == 1 else y
    if y.shape[0] != x.shape[0] or y.dim() != 2:
        raise ValueError(f"labels must be [N, num_classes] with N={x.shape[0]}, got {tuple(y.shape)}")
    if y.dtype != torch.bool:
        if ((y != 0) & (y != 1)).any():
            raise ValueError("labels must be boolean or 0/1")
        y = y != 0
    weight = torch.where(y, cfg.pos_weight, 1.0).to(x.dtype)
    if ignore is not None:
        ignore = torch.as_tensor(ignore, device=x.device)
        ignore = ignore[:, None] if ignore.dim() == 1 else ignore
        if ignore.shape != y.shape:
            raise ValueError(f"ignore mask has shape {tuple(ignore.shape)}, expected {tuple(y.shape)}")
        weight = weight * (ignore == 0)
    return x, y, weight


def fold_ids(n: int, folds: int, seed: int) -> Tensor:
    """Seeded random assignment of ``n`` rows to ``folds`` folds of (almost) equal size."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ids = torch.empty(n, dtype=torch.long)
    ids[perm] = torch.arange(n) % folds
    return ids


def _cv_table(scores: np.ndarray, y: np.ndarray, keep: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Mean held-out AP over folds: ``scores`` [nC, n, folds, N] (full rows), ``y``/``keep`` [N, n]."""
    n_c, n, folds, _ = scores.shape
    table = np.full((n, n_c), np.nan)
    for cls in range(n):
        valid = [f for f in range(folds) if (y[:, cls] & keep[:, cls] & (fold == f)).any()]
        for ci in range(n_c):
            aps = []
            for f in valid:
                rows = keep[:, cls] & (fold == f)
                aps.append(average_precision(scores[ci, cls, f, rows], y[rows, cls]))
            if aps:
                table[cls, ci] = float(np.mean(aps))
    return table


def _best_c(table: np.ndarray, c_grid: Sequence[float]) -> Tensor:
    """Per class, the C of the highest CV AP (ties and all-NaN rows: the smallest such C)."""
    order = np.argsort(c_grid, kind="stable")
    best = []
    for row in table:
        r = np.nan_to_num(row[order], nan=-np.inf)
        best.append(c_grid[order[int(np.argmax(r >= r.max()))]])
    return torch.tensor(best, dtype=torch.float64)


def _fold_masks(n: int, cfg: SVMConfig, device: torch.device, full: bool) -> tuple[Tensor, Tensor]:
    fold = fold_ids(n, cfg.folds, cfg.seed) if cfg.folds >= 2 else torch.zeros(n, dtype=torch.long)
    cols = [fold != f for f in range(cfg.folds)] if cfg.folds >= 2 else []
    if full:
        cols.append(torch.ones(n, dtype=torch.bool))
    return fold, torch.stack(cols, 1).to(device)


# --------------------------------------------------------------------------- scikit-learn reference


def _sk_fit(x64: np.ndarray, y: np.ndarray, rows: np.ndarray, c: float, cfg: SVMConfig
            ) -> tuple[np.ndarray, bool]:
    """LinearSVC on ``rows``: ``[D+1]`` weights with the bias weight last (``b = B * w[D]``) and
    whether it stopped at ``sklearn_max_iter`` (ConvergenceWarning). A single-class training
    set (LinearSVC refuses it) falls back to the torch solver."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    ys = y[rows]
    if ys.all() or not ys.any():
        F = _augment(torch.from_numpy(x64[rows]), cfg.bias)
        t = torch.from_numpy(np.where(ys, 1.0, -1.0))[:, None]
        s = torch.from_numpy(c * np.where(ys, cfg.pos_weight, 1.0))[:, None]
        W, stopped = _newton(F, t, s, tol=cfg.tol, max_iter=cfg.max_iter, loss=cfg.loss,
                             smoothing=cfg.hinge_smoothing)
        return W[0].numpy(), bool(stopped[0])
    svc = LinearSVC(C=c, loss=cfg.loss, penalty="l2", dual=True if cfg.loss == "hinge" else "auto",
                    tol=cfg.tol, max_iter=cfg.sklearn_max_iter, class_weight={1: cfg.pos_weight, 0: 1.0},
                    fit_intercept=True, intercept_scaling=cfg.bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(x64[rows], ys.astype(np.int64))
    stopped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return np.append(svc.coef_[0], svc.intercept_[0] / cfg.bias), stopped


def _sk_grid(x: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float],
             cfg: SVMConfig, columns: Tensor | None = None, label: SolveLabel | None = None,
             stats: dict | None = None) -> Tensor:
    """``_solve_grid`` with one LinearSVC per (C, class, mask); ignored rows are left out."""
    x64 = x.detach().cpu().numpy().astype(np.float64)
    yn, seen = y.cpu().numpy(), (weight > 0).cpu().numpy()
    mn = masks.cpu().numpy()
    out = np.zeros((len(c_values), y.shape[1], mn.shape[1], x.shape[1] + 1))
    failed = []
    for cls in range(y.shape[1]):
        keep = None if columns is None else np.append(columns[cls, :-1].cpu().numpy(), True)  # + bias
        for ci, c in enumerate(c_values):
            for j in range(mn.shape[1]):
                rows = mn[:, j] & seen[:, cls]
                if keep is None:
                    out[ci, cls, j], stopped = _sk_fit(x64, yn[:, cls], rows, c, cfg)
                else:
                    out[ci, cls, j, keep], stopped = _sk_fit(x64[:, keep[:-1]], yn[:, cls], rows, c, cfg)
                if stopped:
                    failed.append((cls, c, j))
    _report(failed, cfg, label, stats)
    return torch.from_numpy(out).to(x.device, x.dtype)


def _grid(x: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float], cfg: SVMConfig,
          stats: dict | None = None, columns: Tensor | None = None, init: Tensor | None = None,
          augmented: bool = False, label: SolveLabel | None = None) -> Tensor:
    """``columns``: [n, D] bool feature columns per class (None: all); the bias is always used.
    ``init``: [n, D + 1] starting weights (bias column last) for the torch solver."""
    if columns is not None:
        columns = torch.cat([columns, torch.ones(columns.shape[0], 1, dtype=torch.bool,
                                                 device=columns.device)], 1)
    if cfg.solver == "sklearn":
        return _sk_grid(x[:, :-1] if augmented else x, y, weight, masks, c_values, cfg, columns, label, stats)
    F = x if augmented else _augment(x, cfg.bias)
    with _threads_for(F):
        return _solve_grid(F, y, weight, masks, c_values, cfg, stats, columns, init, label)


def _split(W: Tensor, bias: float) -> tuple[Tensor, Tensor]:
    return W[..., :-1], bias * W[..., -1]


# --------------------------------------------------------------------------- public API


@torch.no_grad()
def train_svms(x: Tensor, y: Tensor, c: float | Tensor, *, cfg: SVMConfig, ignore: Tensor | None = None,
               feature_mask: Tensor | None = None, init: tuple[Tensor, Tensor] | None = None,
               augmented: bool = False, stats: dict | None = None, label: SolveLabel | None = None
               ) -> tuple[Tensor, Tensor]:
    """One-vs-rest SVMs on all rows of ``x`` [N, D] (used as given, not normalised) for labels
    ``y`` [N, n] (bool or 0/1), with ``c`` one C for all classes or ``[n]`` per class; ``ignore``
    [N, n] marks rows a class must not see; ``feature_mask`` [n, D] (bool) the feature columns
    each class may use (its SVM is the one trained on those columns alone; the others get weight
    0). The columns of ``y`` need not be distinct classes: one label column per (class, subset)
    trains many subsets at once. ``init`` ``(W [n, D], b [n])``: where the torch solver starts
    (a warm start, e.g. the previous round's detectors in hard-negative mining; the solution is
    the same to the solver's tolerance). ``augmented``: the last column of ``x`` already is the
    bias feature (``cfg.bias``), so no augmented copy is made; ``D`` is then one less.
    Solves that stop at ``max_iter`` above ``cfg.tol`` are logged as a warning naming them
    (``label``: where, class names) and counted in ``stats["unconverged"]``.
    Returns ``W`` [n, D] and ``b`` [n]."""
    x, y, weight = _inputs(x, y, ignore, cfg, augmented=augmented)
    n = y.shape[1]
    d = x.shape[1] - 1 if augmented else x.shape[1]
    c = torch.as_tensor(c, dtype=torch.float64).flatten().cpu()
    c = c.expand(n) if c.numel() == 1 else c
    if c.numel() != n:
        raise ValueError(f"c has {c.numel()} values for {n} classes")
    if feature_mask is not None:
        feature_mask = torch.as_tensor(feature_mask, device=x.device).bool()
        if feature_mask.shape != (n, d):
            raise ValueError(f"feature_mask has shape {tuple(feature_mask.shape)}, "
                             f"expected {(n, d)}")
    start = None
    if init is not None:
        W0, b0 = (torch.as_tensor(t, device=x.device, dtype=x.dtype) for t in init)
        if W0.shape != (n, d) or b0.shape != (n,):
            raise ValueError(f"init has shapes {tuple(W0.shape)}, {tuple(b0.shape)}; expected "
                             f"{(n, d)}, {(n,)}")
        start = torch.cat([W0, b0[:, None] / cfg.bias], 1)  # the bias feature's weight
    full = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    W = torch.zeros(n, d + 1, dtype=x.dtype, device=x.device)
    for value in sorted(set(c.tolist())):  # each class solved at its own C only
        cols = torch.nonzero(c == value).squeeze(1).to(x.device)
        sub = None if feature_mask is None else feature_mask[cols]
        names = None if label is None or label.classes is None else [label.classes[i] for i in cols.tolist()]
        sub_label = None if label is None else replace(label, classes=names)
        W[cols] = _grid(x, y[:, cols], weight[:, cols], full, [value], cfg, stats, columns=sub,
                        init=None if start is None else start[cols], augmented=augmented,
                        label=sub_label)[0, :, 0]
    return _split(W, cfg.bias)


def _select(x: Tensor, y: Tensor, weight: Tensor, cfg: SVMConfig, *, full: bool, stats: dict | None = None,
            label: SolveLabel | None = None) -> tuple[Tensor, np.ndarray, Tensor | None]:
    """CV table, best C and (with ``full``) the all-rows solutions [nC, n, D+1]."""
    fold, masks = _fold_masks(x.shape[0], cfg, x.device, full)
    mask_names = [f"CV fold {f}" for f in range(cfg.folds if cfg.folds >= 2 else 0)] + ["all rows"] * full
    label = replace(label or SolveLabel(), masks=mask_names)
    W = _grid(x, y, weight, masks, cfg.c_grid, cfg, stats, label=label)
    n_cv = cfg.folds if cfg.folds >= 2 else 0
    if n_cv:
        Wcv, bcv = _split(W[:, :, :n_cv], cfg.bias)
        scores = torch.einsum("nd,ckfd->ckfn", x, Wcv) + bcv[..., None]
        table = _cv_table(scores.double().cpu().numpy(), y.cpu().numpy(), (weight > 0).cpu().numpy(),
                          fold.numpy())
    else:
        table = np.full((y.shape[1], len(cfg.c_grid)), np.nan)
    return _best_c(table, cfg.c_grid), table, (W[:, :, -1] if full else None)


@torch.no_grad()
def select_c(x: Tensor, y: Tensor, *, cfg: SVMConfig, ignore: Tensor | None = None,
             stats: dict | None = None, label: SolveLabel | None = None) -> tuple[Tensor, Tensor]:
    """Cross-validated choice of C per class on ``x`` as given (see the module doc).

    Returns ``best_c`` [n] and ``cv_ap`` [n, len(cfg.c_grid)] (mean held-out VOC07 AP; NaN for a
    class without held-out positives, whose C is then the smallest)."""
    x, y, weight = _inputs(x, y, ignore, cfg)
    best, table, _ = _select(x, y, weight, cfg, full=False, stats=stats, label=label)
    return best, torch.from_numpy(table)


@dataclass
class Probe:
    """A fitted probe: ``W`` [n, D], ``b`` [n], chosen ``c`` [n], ``cv_ap`` [n, len(c_grid)], and
    the feature normalisation (``normalize`` mode and ``scale``, the multiplier of ``"mean_norm"``)."""

    W: Tensor
    b: Tensor
    c: Tensor
    cv_ap: Tensor
    c_grid: tuple[float, ...]
    normalize: str
    scale: float = 1.0

    def _prepare(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).to(self.W.device, self.W.dtype)
        if self.normalize == "l2":
            return normalize_features(x, "l2")
        return x * self.scale if self.normalize == "mean_norm" else x

    @torch.no_grad()
    def decision_function(self, x_test: Tensor) -> Tensor:
        """Scores [N, n] of test features, normalised as the training features were."""
        return self._prepare(x_test) @ self.W.T + self.b


@torch.no_grad()
def fit_probe(x_train: Tensor, y_train: Tensor, *, cfg: SVMConfig, ignore: Tensor | None = None,
              stats: dict | None = None, label: SolveLabel | None = None) -> Probe:
    """Normalise ``x_train`` (``cfg.normalize``), choose C per class by cross-validation and keep
    the SVMs trained on all rows with that C. One batch (torch solver) covers every class, C and
    fold plus the all-rows problems. ``stats`` receives iteration counts (torch solver) and the
    number of solves stopped at ``max_iter`` (``"unconverged"``, each logged as a warning that
    names ``label``'s where, the class, C and fold)."""
    x = _matrix(x_train)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # normalised at least in float32
    scale = _mean_norm_scale(x, cfg.target_norm) if cfg.normalize == "mean_norm" else 1.0
    x = normalize_features(x, "l2") if cfg.normalize == "l2" else x * scale
    x, y, weight = _inputs(x, y_train, ignore, cfg)  # dtype "auto" judges the rows as solved
    best, table, Wfull = _select(x, y, weight, cfg, full=True, stats=stats, label=label)
    pick = torch.tensor([cfg.c_grid.index(v) for v in best.tolist()], device=x.device)
    W, b = _split(Wfull[pick, torch.arange(y.shape[1], device=x.device)], cfg.bias)
    return Probe(W=W, b=b, c=best, cv_ap=torch.from_numpy(table), c_grid=cfg.c_grid,
                 normalize=cfg.normalize, scale=scale)
