"""The batched solver: many one-vs-rest linear SVMs sharing one feature matrix, solved at once.

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

Primal truncated Newton, as liblinear's ``-s 2`` but batched. The objective is piecewise
quadratic and once differentiable; per Newton iteration the gradient is
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

``solve_grid`` is the entry point of ``cnnft.svm.train`` (a ``GridSolver``); the tests' scikit-learn
reference (``tests/svm_reference.py``) is another ``GridSolver`` with the same signature.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cnnft.svm.config import SVMConfig

log = logging.getLogger(__name__)

#: from a cold start, ``loss="hinge"`` is first solved at ``h`` this many times ``hinge_smoothing``
#: (a continuation stage that warm-starts the final one)
HINGE_CONTINUATION = 10.0
#: CG stops at ``||residual|| <= CG_RTOL * ||gradient||`` (TRON's 0.1) or after CG_MAX_ITER steps
CG_RTOL = 0.1
CG_MAX_ITER = 200
#: feature matrices with fewer elements are solved on one CPU thread (see ``_threads_for``)
SMALL_PROBLEM = 1 << 21
#: the row-space solve (``solve_grid``) is skipped when its float64 basis would be larger
ROW_SPACE_MAX_BYTES = 1 << 30


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
def _threads_for(F: Tensor, limit: float = SMALL_PROBLEM) -> Iterator[None]:
    """One intra-op thread for small CPU problems (fewer than ``limit`` elements). Their many small
    ops gain little from threads, and on a busy machine each parallel region waits for a
    descheduled worker: a 900 x 600 CV grid took 36 s of CPU on 2 threads against 0.5 s on 1
    while other jobs shared the 2 cores (LAPACK's QR of a 8665 x 200 matrix: 3.3 s against 0.18 s)."""
    old = torch.get_num_threads()
    if F.device.type != "cpu" or F.numel() >= limit or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def augment(x: Tensor, bias: float) -> Tensor:
    """``x`` [N, D] with the bias feature ``bias`` appended as column D."""
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




def report_unconverged(failed: Sequence[tuple[int, float, int]], label: SolveLabel | None,
                       stats: dict | None, *, limit_name: str, cfg: SVMConfig, limit: int = 20) -> None:
    """Log one warning naming every ``(class, C, mask)`` problem that stopped at its iteration
    limit (``limit_name``, e.g. ``"max_iter=100 Newton iterations"``) above its tolerance, and
    add their count to ``stats["unconverged"]``."""
    if stats is not None:
        stats["unconverged"] = stats.get("unconverged", 0) + len(failed)
    if not failed:
        return
    label = label or SolveLabel()
    names = [label.problem(*f) for f in failed[:limit]]
    more = f" and {len(failed) - limit} more" if len(failed) > limit else ""
    log.warning("%s: %d SVM solve(s) stopped at %s above tol=%g (%s loss): %s%s", label.where,
                len(failed), limit_name, cfg.tol, cfg.loss, ", ".join(names), more)


def _solve_grid(F: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float],
                cfg: SVMConfig, stats: dict | None = None, columns: Tensor | None = None,
                init: Tensor | None = None, label: SolveLabel | None = None) -> Tensor:
    """All problems (C, class, row mask): ``y`` [N, n] bool, ``weight`` [N, n] class weights (0 =
    ignored), ``masks`` [N, m] rows seen by each mask, ``columns`` [n, P] (optional) the feature
    columns each class may use, ``init`` [n, P] (optional) each class's starting point.
    Returns W [len(c_values), n, m, P]; problems that stop at ``max_iter`` are reported
    (``report_unconverged``)."""
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
    report_unconverged(failed, label, stats, limit_name=f"max_iter={cfg.max_iter} Newton iterations", cfg=cfg)
    return out


class GridSolver(Protocol):
    """Solves every (C, class, row mask) problem: see ``solve_grid``."""

    def __call__(self, x: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float],
                 cfg: SVMConfig, *, stats: dict | None = None, columns: Tensor | None = None,
                 init: Tensor | None = None, label: SolveLabel | None = None) -> Tensor: ...


def row_space_basis(F: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, Q)`` with ``F = R Q``: ``Q`` [N, P] orthonormal rows spanning the row space of ``F``
    [N, P] (N < P), ``R`` [N, N] the coordinates of the rows in that basis (QR of ``F^T``; both
    in float64)."""
    q, r = torch.linalg.qr(F.T.double())  # F^T = q r: q [P, N], r [N, N]
    return r.T, q.T


def solve_grid(x: Tensor, y: Tensor, weight: Tensor, masks: Tensor, c_values: Sequence[float],
               cfg: SVMConfig, *, stats: dict | None = None, columns: Tensor | None = None,
               init: Tensor | None = None, label: SolveLabel | None = None,
               row_space: bool = True) -> Tensor:
    """The batched torch solver on features ``x`` [N, D] (the bias feature ``cfg.bias`` is added
    here): ``y`` [N, n] bool, ``weight`` [N, n] class weights (0 = ignored), ``masks`` [N, m]
    rows seen by each mask, ``columns`` [n, D] bool (optional) the feature columns each class may
    use (the bias always), ``init`` [n, D + 1] (optional) starting weights, bias column last.
    Returns W [len(c_values), n, m, D + 1], the bias feature's weight last.

    With fewer rows than columns (the probes: 200 images, up to 8665 features at demo scale) and
    neither ``columns`` nor ``init``, the problems are solved in the row space of the features
    (``row_space``): with ``F = R Q`` (``row_space_basis``), every problem's solution and every
    Newton/CG iterate from zero is ``w = v Q`` (each step is a combination of rows of ``F``), and
    ``Q`` is an isometry, so the solver run on the N x N features ``R`` gives ``v`` through the
    same iterates, objective values and stopping tests, at N / (D + 1) of the arithmetic per
    matmul. That small problem is solved in float64 whatever ``cfg.dtype`` (cheap at N x N; in
    float32 its rounding flipped a near-tied choice of C that the float32 and float64 solves on
    ``F`` agree on); the weights are returned in ``x``'s dtype. Results differ from the solve on
    ``F`` by rounding and by where the stopping tests fall (bench/probe_row_space.py). Skipped
    when the float64 basis would exceed ``ROW_SPACE_MAX_BYTES`` (paper-scale probes: 5011 x 69985
    at pool1 would need 2.8 GB)."""
    if columns is not None:
        columns = torch.cat([columns, torch.ones(columns.shape[0], 1, dtype=torch.bool,
                                                 device=columns.device)], 1)
    F = augment(x, cfg.bias)
    basis = None
    if (row_space and columns is None and init is None and F.shape[0] < F.shape[1]
            and 8 * F.numel() <= ROW_SPACE_MAX_BYTES):
        with _threads_for(F, limit=math.inf):
            F, basis = row_space_basis(F)
        weight = weight.double()
    with _threads_for(F):
        W = _solve_grid(F, y, weight, masks, c_values, cfg, stats, columns, init, label)
    return W if basis is None else (W @ basis).to(x.dtype)
