"""Batched torch SVM probe (cnnft.svm) against scikit-learn's LinearSVC (tests/svm_reference.py)
and on constructed cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from cnnft.errors import ConfigError
from cnnft.metrics import average_precision, mean_average_precision
from cnnft.svm import (
    Probe,
    SolveLabel,
    SVMConfig,
    fit_probe,
    normalize_features,
    select_c,
    train_svms,
)
from cnnft.svm.solver import _newton, augment, row_space_basis, solve_grid
from tests.svm_reference import sklearn_solver


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these problems are small, and on a shared machine two threads spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def objective(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, C: float, pos_weight: float,
              bias: float) -> torch.Tensor:
    """liblinear's primal objective per class; the bias weight b / B is regularised."""
    x, W, b = x.double(), W.double(), b.double()
    w_full = torch.cat([W, (b / bias)[:, None]], 1)
    margins = torch.where(y, 1.0, -1.0).double() * (x @ W.T + b)
    cw = torch.where(y, pos_weight, 1.0).double()
    return 0.5 * (w_full ** 2).sum(1) + C * (cw * (1 - margins).clamp_min(0) ** 2).sum(0)


def clusters(n: int, dim: int, classes: int, *, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative features with one class per row; class k shifts its own block of dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.nn.functional.one_hot(torch.randint(classes, (n,), generator=g), classes).bool()
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    block = dim // (2 * classes)
    for k in range(classes):
        x[y[:, k], k * block:(k + 1) * block] += sep
    return x.relu(), y


def random_problem(seed: int, n: int = 240, dim: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = (x[:, :3].sum(1) + torch.randn(n, generator=g, dtype=torch.float64) > 0.8)
    return x, y


@pytest.mark.parametrize(("C", "bias", "dtype"), [(0.05, 1.0, "float64"), (1.0, 2.5, "float64"),
                                                  (10.0, 1.0, "float64"), (1.0, 1.0, "float32")])
def test_objective_and_weights_match_liblinear(C: float, bias: float, dtype: str) -> None:
    x, y = random_problem(0)
    cfg = SVMConfig(pos_weight=2.0, bias=bias, tol=1e-6 if dtype == "float64" else 1e-4, dtype=dtype)
    W, b = train_svms(x, y, C, cfg=cfg)
    svc = LinearSVC(C=C, loss="squared_hinge", penalty="l2", dual=False, tol=1e-10, max_iter=100_000,
                    class_weight={1: 2.0, 0: 1.0}, intercept_scaling=bias).fit(x.numpy(), y.numpy())
    Wr = torch.from_numpy(svc.coef_)
    br = torch.from_numpy(svc.intercept_)
    f, fr = objective(x, y[:, None], W, b, C, 2.0, bias), objective(x, y[:, None], Wr, br, C, 2.0, bias)
    assert abs(f.item() - fr.item()) <= 1e-3 * fr.item()
    scale = Wr.abs().max().item()
    tol = 1e-4 if dtype == "float64" else 5e-3
    assert torch.allclose(W.double(), Wr, atol=tol * scale)
    assert abs(b.item() - br.item()) <= tol * scale * bias
    s, sr = (x @ W.double().T + b.double()).flatten(), (x @ Wr.T + br).flatten()
    assert np.corrcoef(s.numpy(), sr.numpy())[0, 1] > 0.999


def test_batched_equals_one_at_a_time() -> None:
    x, _ = random_problem(1)
    g = torch.Generator().manual_seed(1)
    y = torch.stack([(x[:, k] + 0.7 * torch.randn(len(x), generator=g, dtype=torch.float64) > 0.3)
                     for k in range(4)], 1)
    c = torch.tensor([0.01, 1.0, 0.3, 10.0])
    cfg = SVMConfig(dtype="float64", tol=1e-8)
    W, b = train_svms(x, y, c, cfg=cfg)
    for k in range(4):
        Wk, bk = train_svms(x, y[:, k], c[k].item(), cfg=cfg)
        assert torch.allclose(W[k], Wk[0], atol=1e-6) and torch.allclose(b[k], bk[0], atol=1e-6)
    # every C of a grid in one batch (no warm start) and one problem per chunk give the same
    # solutions as the default warm-started batches
    for other in (SVMConfig(dtype="float64", tol=1e-8, warm_start=False),
                  SVMConfig(dtype="float64", tol=1e-8, max_problems=1)):
        W2, b2 = train_svms(x, y, c, cfg=other)
        assert torch.allclose(W, W2, atol=1e-6) and torch.allclose(b, b2, atol=1e-6)


def test_newton_solves_k_independent_problems() -> None:
    x, y = random_problem(2, n=150, dim=20)
    F = augment(x, 1.0)
    T = torch.where(y, 1.0, -1.0).double()[:, None].repeat(1, 3)
    g = torch.Generator().manual_seed(0)
    S = torch.rand(len(x), 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 5.0]).double()
    stats: dict = {}
    W, stopped = _newton(F, T, S, tol=1e-9, max_iter=100, stats=stats)
    assert not stopped.any() and stats["newton"] > 0
    for k in range(3):
        Wk, _ = _newton(F, T[:, k:k + 1], S[:, k:k + 1], tol=1e-9, max_iter=100)
        assert torch.allclose(W[k], Wk[0], atol=1e-7)


def test_zero_weight_rows_are_ignored() -> None:
    x, y = random_problem(3)
    y2 = torch.stack([y, ~y], 1)
    ignore = torch.zeros_like(y2)
    ignore[::3, 0] = True  # class 0 must not see every third row; class 1 sees all
    cfg = SVMConfig(dtype="float64", tol=1e-9)
    W, b = train_svms(x, y2, 0.5, cfg=cfg, ignore=ignore)
    keep = ~ignore[:, 0]
    Wk, bk = train_svms(x[keep], y[keep], 0.5, cfg=cfg)
    assert torch.allclose(W[0], Wk[0], atol=1e-7) and torch.allclose(b[0], bk[0], atol=1e-7)
    Wa, ba = train_svms(x, ~y, 0.5, cfg=cfg)
    assert torch.allclose(W[1], Wa[0], atol=1e-7) and torch.allclose(b[1], ba[0], atol=1e-7)
    # the sklearn path leaves the rows out too
    Ws, bs = train_svms(x, y2, 0.5, cfg=SVMConfig(tol=1e-8, dtype="float64"), ignore=ignore,
                        solver=sklearn_solver(100_000))
    assert torch.allclose(Ws[0], Wk[0], atol=1e-4) and torch.allclose(bs[0], bk[0], atol=1e-4)


def test_separable_classes_reach_ap_one_and_shuffled_labels_chance() -> None:
    x, y = clusters(600, 60, 4, sep=4.0, seed=0)
    xt, yt = clusters(2000, 60, 4, sep=4.0, seed=1)
    cfg = SVMConfig(c_grid=(0.01, 1.0), folds=3)
    assert mean_average_precision(fit_probe(x, y, cfg=cfg).decision_function(xt), yt)[1] == 1.0
    # one signal direction per class; training labels shuffled across rows leave nothing to learn
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(600, 40, generator=g), torch.randn(3000, 40, generator=g)
    y, yt = x[:, :4] > 0.7, xt[:, :4] > 0.7
    assert mean_average_precision(fit_probe(x, y, cfg=cfg).decision_function(xt), yt)[1] > 0.95
    aps = []
    for seed in range(3):
        shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
        aps.append(mean_average_precision(fit_probe(x, shuffled, cfg=cfg).decision_function(xt), yt)[1])
    # chance AP is about the positive rate (0.24); 11-point interpolation adds a little at recall 0
    rate = yt.double().mean().item()
    assert abs(np.mean(aps) - rate) < 0.05 and max(aps) < rate + 0.1, (aps, rate)


def test_select_c_rejects_a_huge_c_under_label_noise() -> None:
    # as many dimensions as training rows per fold and 10% flipped labels: a weakly regularised
    # SVM fits the flips
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 200, generator=g, dtype=torch.float64)
    y = (x[:, :4] > 0.5) ^ (torch.rand(300, 4, generator=g) < 0.1)
    x[:, :4] *= 3
    grid = (1e-3, 1e-1, 10.0, 1e3)
    best, cv = select_c(x, y, cfg=SVMConfig(c_grid=grid, dtype="float64"))
    assert cv.shape == (4, len(grid)) and best.shape == (4,)
    assert best.tolist() == [1e-3] * 4
    assert (cv[:, -1] < cv[:, 0] - 0.05).all(), cv


def test_select_c_rejects_a_tiny_c_when_features_must_be_combined() -> None:
    # the signal hides under a nuisance that a second feature measures: only a weakly regularised
    # SVM learns to subtract it; a tiny C ranks by the first feature alone
    g = torch.Generator().manual_seed(0)
    y = torch.rand(300, 2, generator=g) < 0.3
    nuisance = 3 * torch.randn(300, 2, generator=g, dtype=torch.float64)
    measured = nuisance + 0.05 * torch.randn(300, 2, generator=g, dtype=torch.float64)
    x = torch.cat([y.double() + nuisance, measured, torch.randn(300, 4, generator=g, dtype=torch.float64)], 1)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    best, cv = select_c(x, y, cfg=SVMConfig(c_grid=grid, dtype="float64"))
    assert (best > 1e-4).all()
    assert (cv[:, 0] < 0.6).all() and (cv[:, 2] > 0.99).all(), cv


def test_select_c_ties_go_to_the_smaller_c_and_empty_classes_are_handled() -> None:
    x, y = clusters(300, 40, 3, sep=6.0, seed=2)
    y = torch.cat([y, torch.zeros(len(y), 1, dtype=torch.bool)], 1)  # class 3: no positives at all
    grid = (1.0, 0.01, 10.0)
    best, cv = select_c(x, y, cfg=SVMConfig(c_grid=grid, folds=3))
    assert torch.equal(cv[:3], torch.ones(3, 3, dtype=cv.dtype))  # separable: every C gives AP 1
    assert torch.isnan(cv[3]).all()
    assert best.tolist() == [0.01] * 4
    # LinearSVC refuses one-class data: the reference solves it in the dual (never the torch solver)
    for kwargs in ({}, {"solver": sklearn_solver()}):
        probe = fit_probe(x, y, cfg=SVMConfig(c_grid=grid, folds=3), **kwargs)
        assert torch.isfinite(probe.decision_function(x)).all() and probe.c.tolist() == [0.01] * 4


def test_ignored_rows_leave_cross_validation_ap() -> None:
    x, y = clusters(300, 40, 2, sep=6.0, seed=3)
    ignore = torch.zeros_like(y)
    # "difficult" rows labelled against their features: they would cost AP if they were counted
    hard = torch.arange(0, 300, 10)
    y[hard] = ~y[hard]
    ignore[hard] = True
    _, cv = select_c(x, y, cfg=SVMConfig(c_grid=(0.1, 1.0)), ignore=ignore)
    assert torch.equal(cv, torch.ones_like(cv))
    _, cv = select_c(x, y, cfg=SVMConfig(c_grid=(0.1, 1.0)))
    assert (cv < 1).all()


def test_normalize_features() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 8, generator=g) * torch.arange(1, 51)[:, None]
    xt = torch.rand(30, 8, generator=g) * 7
    assert torch.allclose(normalize_features(x, "l2").norm(dim=1), torch.ones(50))
    assert torch.equal(normalize_features(torch.zeros(2, 3), "l2"), torch.zeros(2, 3))
    xn = normalize_features(x, "mean_norm", 20.0)
    assert xn.norm(dim=1).mean().item() == pytest.approx(20.0, rel=1e-5)
    xtn = normalize_features(xt, "mean_norm", 20.0, reference=x)
    scale = (xn / x)[x > 0]
    assert torch.allclose(scale, scale[0]) and torch.allclose((xtn / xt)[xt > 0], scale[0])  # train's scale
    assert torch.equal(normalize_features(x, "none"), x)
    with pytest.raises(ConfigError):
        normalize_features(x, "l1")


def test_probe_applies_training_normalisation() -> None:
    x, y = clusters(200, 30, 2, sep=3.0, seed=4)
    xt, _ = clusters(50, 30, 2, sep=3.0, seed=5)
    x = 3 * x
    for mode in ("l2", "mean_norm", "none"):
        cfg = SVMConfig(c_grid=(0.1, 1.0), normalize=mode, dtype="float64", tol=1e-8)
        probe = fit_probe(x, y, cfg=cfg)
        assert isinstance(probe, Probe) and probe.W.shape == (2, 30) and probe.b.shape == (2,)
        assert probe.cv_ap.shape == (2, 2) and set(probe.c.tolist()) <= {0.1, 1.0}
        expected = normalize_features(xt, mode, 20.0, reference=x)
        W, b = train_svms(normalize_features(x, mode, 20.0), y, probe.c, cfg=cfg)
        assert torch.allclose(probe.decision_function(xt), expected @ W.T + b, atol=1e-6)
        if mode == "mean_norm":
            assert (x * probe.scale).norm(dim=1).mean().item() == pytest.approx(20.0, rel=1e-5)


def test_torch_and_sklearn_probes_agree() -> None:
    g = torch.Generator().manual_seed(0)
    n, dim, classes = 500, 80, 4
    proto = (torch.rand(classes, dim, generator=g) < 0.15) * 1.5
    y = torch.rand(n + 1000, classes, generator=g) < 0.3
    noise = torch.randn(n + 1000, dim, generator=g, dtype=torch.float64)
    x = (y.double() @ proto.double() + 1.2 * noise).relu()
    cfg = SVMConfig(c_grid=(0.01, 0.1, 1.0), folds=3, tol=1e-5)
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for solver, kwargs in (("torch", {}), ("sklearn", {"solver": sklearn_solver()})):
            probe = fit_probe(x[:n], y[:n], cfg=cfg, **kwargs)
            scores[solver] = mean_average_precision(probe.decision_function(x[n:]), y[n:])
    per_t, m_t = scores["torch"]
    per_s, m_s = scores["sklearn"]
    assert 0.4 < m_t < 0.98  # neither trivial nor chance
    assert abs(m_t - m_s) < 0.005 and np.abs(per_t - per_s).max() < 0.01


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="normalize"):
        SVMConfig(normalize="l1")
    with pytest.raises(ConfigError, match="folds"):
        SVMConfig(folds=1)
    with pytest.raises(ConfigError, match="c_grid"):
        SVMConfig(c_grid=(0.0, 1.0))
    with pytest.raises(ConfigError,
                       match=r"probe dtype='float16'; expected one of \['float32', 'float64', 'auto'\]"):
        SVMConfig(dtype="float16")
    x, y = random_problem(4, n=20, dim=5)
    with pytest.raises(ValueError, match="labels"):
        train_svms(x, torch.full((20, 2), 2), 1.0, cfg=SVMConfig())
    with pytest.raises(ValueError, match="ignore"):
        train_svms(x, y, 1.0, cfg=SVMConfig(), ignore=torch.zeros(20, 3, dtype=torch.bool))


def test_fold_cv_ap_matches_a_direct_computation() -> None:
    """select_c's table entry = mean over folds of the AP of an SVM trained on the other folds."""
    from cnnft.svm import fold_ids

    x, y = random_problem(5, n=120, dim=10)
    cfg = SVMConfig(c_grid=(0.5,), folds=3, dtype="float64", tol=1e-8, normalize="none")
    _, cv = select_c(x, y, cfg=cfg)
    fold = fold_ids(len(x), 3, cfg.seed)
    aps = []
    for f in range(3):
        W, b = train_svms(x[fold != f], y[fold != f], 0.5, cfg=cfg)
        aps.append(average_precision((x[fold == f] @ W.T + b)[:, 0], y[fold == f]))
    assert cv[0, 0].item() == pytest.approx(np.mean(aps), abs=1e-12)


def test_warm_start_reaches_the_same_solution() -> None:
    """``init`` only moves the starting point: from a perturbed solution or from the cold solution
    itself, the solver ends at the cold solution (to its tolerance); bad shapes are refused."""
    x, y = clusters(300, 40, 4, sep=1.5, seed=3)
    cfg = SVMConfig(c_grid=(0.1,), folds=1, bias=10.0, tol=1e-8, dtype="float64", normalize="none")
    W, b = train_svms(x, y, 0.1, cfg=cfg)
    g = torch.Generator().manual_seed(0)
    for init in ((W + 0.05 * torch.randn(W.shape, generator=g, dtype=W.dtype), b - 0.3), (W, b)):
        W2, b2 = train_svms(x, y, 0.1, cfg=cfg, init=init)
        torch.testing.assert_close(W2, W, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b2, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"init has shapes \(4, 39\), \(4,\); expected \(4, 40\)"):
        train_svms(x, y, 0.1, cfg=cfg, init=(W[:, 1:], b))


def test_auto_dtype_solves_nearly_constant_features_in_float64() -> None:
    """``relative_spread`` is the rows' RMS distance from their mean over their RMS norm; with
    ``dtype="auto"`` rows that differ by < 10% of their norm (untrained fc layers) are solved in
    float64, and the solution is then the float64 one; spread-out features stay float32."""
    from cnnft.svm import relative_spread, resolved, solver_dtype

    g = torch.Generator().manual_seed(0)
    assert relative_spread(torch.ones(50, 8)) == 0.0
    assert relative_spread(torch.zeros(5, 3)) == 0.0
    signs = torch.tensor([[1.0], [-1.0]]).repeat(3, 1) * torch.ones(6, 4)
    assert relative_spread(signs) == pytest.approx(1.0)  # mean zero
    base, noise = torch.rand(64, generator=g) + 0.5, torch.randn(300, 64, generator=g)
    y = noise[:, 0] > 0.5
    flat = base + 0.003 * noise  # rows within 0.3% of their norm of each other
    assert relative_spread(flat) == pytest.approx(0.003 * 8 / base.norm().item(), rel=0.05)
    auto = SVMConfig()
    assert solver_dtype(flat, auto) == torch.float64 and solver_dtype(noise.abs(), auto) == torch.float32
    assert solver_dtype(flat, SVMConfig(dtype="float32")) == torch.float32
    # decided once for a sequence of solves (mining): a config with a concrete dtype
    assert resolved(auto, flat).dtype == "float64" and resolved(auto, noise.abs()).dtype == "float32"
    assert resolved(SVMConfig(dtype="float32"), flat).dtype == "float32"
    assert relative_spread(flat, max_rows=50) == pytest.approx(relative_spread(flat), rel=0.1)
    W, b = train_svms(flat, y, 1.0, cfg=SVMConfig(tol=1e-8))
    W64, b64 = train_svms(flat.double(), y, 1.0, cfg=SVMConfig(tol=1e-8, dtype="float64"))
    assert W.dtype == torch.float64
    torch.testing.assert_close(flat.double() @ W.T + b, flat.double() @ W64.T + b64)


# ----------------------------------------------------------------------------- hinge loss (R-CNN)


def detection_like(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative features (pool5-like), 15% positives, scaled to mean norm 20."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.15
    proto = (torch.rand(dim, generator=g) < 0.2).double()
    x = (torch.randn(n, dim, generator=g, dtype=torch.float64) + y[:, None].double() * proto).relu()
    return x * (20 / x.norm(dim=1).mean()), y


def test_hinge_matches_liblinear_l1_loss_dual() -> None:
    """R-CNN's detector SVM (liblinear -s 3: C 1e-3, positive weight 2, bias 10, mean norm 20):
    held-out decision values agree with LinearSVC(loss="hinge", dual=True) within 3% of their
    spread (liblinear itself at R-CNN's default eps 0.1 is ~3% off); the squared hinge is far off."""
    x, y = detection_like(1600, 100, seed=0)
    xtr, ytr, xte = x[:1000], y[:1000], x[1000:]
    svc = LinearSVC(C=1e-3, loss="hinge", dual=True, class_weight={1: 2.0, 0: 1.0}, intercept_scaling=10,
                    tol=1e-7, max_iter=200000).fit(xtr.numpy(), ytr.numpy().astype(int))
    ref = xte.numpy() @ svc.coef_[0] + svc.intercept_[0]
    spread = ref.std()
    out = {}
    for loss in ("hinge", "squared_hinge"):
        cfg = SVMConfig(c_grid=(1e-3,), folds=1, pos_weight=2.0, bias=10.0, normalize="none", tol=1e-4,
                        loss=loss, dtype="float64")
        stats: dict = {}
        W, b = train_svms(xtr, ytr, 1e-3, cfg=cfg, stats=stats)
        assert stats["unconverged"] == 0
        out[loss] = (xte @ W.T + b)[:, 0].numpy()
    assert np.abs(out["hinge"] - ref).max() < 0.03 * spread
    assert np.abs(out["hinge"] - ref).mean() < 0.005 * spread
    assert np.abs(out["squared_hinge"] - ref).max() > 0.2 * spread  # the two losses differ
    # the sklearn reference path fits the same loss
    cfg = SVMConfig(c_grid=(1e-3,), folds=1, pos_weight=2.0, bias=10.0, normalize="none", tol=1e-6,
                    loss="hinge", dtype="float64")
    W, b = train_svms(xtr, ytr, 1e-3, cfg=cfg, solver=sklearn_solver(200000))
    assert np.abs((xte @ W.T + b)[:, 0].numpy() - ref).max() < 1e-3 * spread


def test_hinge_batched_and_warm_started_solutions_agree() -> None:
    x, y = detection_like(600, 40, seed=1)
    y2 = torch.stack([y, torch.roll(y, 7)], 1)
    cfg = SVMConfig(dtype="float64", tol=1e-6, loss="hinge", bias=10.0)
    W, b = train_svms(x, y2, 1e-3, cfg=cfg)
    for k in range(2):
        Wk, bk = train_svms(x, y2[:, k], 1e-3, cfg=cfg)
        assert torch.allclose(W[k], Wk[0], atol=1e-6) and torch.allclose(b[k], bk[0], atol=1e-5)
    W2, b2 = train_svms(x, y2, 1e-3, cfg=cfg, init=(0.5 * W, b - 0.3))
    scores, scores2 = x @ W.T + b, x @ W2.T + b2
    assert (scores - scores2).abs().max() < 1e-3 * scores.std()


def test_loss_is_validated_with_the_choices() -> None:
    assert SVMConfig().loss == "squared_hinge"  # the probes' protocol is unchanged by default
    with pytest.raises(ConfigError, match=r"svm loss='l1'; expected one of \['squared_hinge', 'hinge'\]"):
        SVMConfig(loss="l1")


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_solve_stopped_at_max_iter_warns_naming_where_class_and_c(solver: str, caplog) -> None:
    x, y = detection_like(300, 20, seed=2)
    y2 = torch.stack([y, ~y], 1)
    cfg = SVMConfig(c_grid=(0.1, 1.0), folds=2, max_iter=1, tol=1e-9, loss="hinge")
    kwargs = {"solver": sklearn_solver(max_iter=1)} if solver == "sklearn" else {}
    stats: dict = {}
    with caplog.at_level("WARNING", logger="cnnft.svm"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_probe(x, y2, cfg=cfg, stats=stats, label=SolveLabel("probe layer relu7", ("cat", "dog")),
                  **kwargs)
    assert stats["unconverged"] > 0
    text = caplog.text
    assert "probe layer relu7" in text and "class cat C=0.1 (CV fold 0)" in text
    assert "class dog C=1 (all rows)" in text or "more" in text
    assert f"{stats['unconverged']} SVM solve(s) stopped at" in text
    caplog.clear()
    stats = {}
    fit_probe(x, y2, cfg=SVMConfig(c_grid=(0.1,), folds=1, dtype="float64"), stats=stats)
    assert stats["unconverged"] == 0 and "stopped at" not in caplog.text


# ----------------------------------------------------------------------------- package structure


def test_reference_never_runs_the_torch_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scikit-learn reference solves one-class training sets itself (liblinear's dual by
    L-BFGS-B), to the torch solver's solution, and never calls the torch solver."""
    import cnnft.svm.solver

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g, dtype=torch.float64).relu()
    solutions = {}
    for y in (torch.zeros(80, dtype=torch.bool), torch.ones(80, dtype=torch.bool)):
        cfg = SVMConfig(dtype="float64", tol=1e-10, max_iter=200)
        solutions[bool(y[0])] = train_svms(x, y, 0.5, cfg=cfg)
    with monkeypatch.context() as m:
        m.setattr(cnnft.svm.solver, "_newton", lambda *a, **k: pytest.fail("torch solver called"))
        for positive, (W, b) in solutions.items():
            y = torch.full((80,), positive)
            Ws, bs = train_svms(x, y, 0.5, cfg=SVMConfig(dtype="float64", tol=1e-8), solver=sklearn_solver())
            assert (W - Ws).abs().max() < 1e-6 and (b - bs).abs().max() < 1e-6
            assert (b.item() > 0) == positive


def test_fold_assignment_is_pinned() -> None:
    """The CV folds every earlier result used (cnnft.svm.cv: scikit-learn's KFold gives others)."""
    from sklearn.model_selection import KFold

    from cnnft.svm import fold_ids

    ids = fold_ids(10, 3, 0)
    assert ids.tolist() == [0, 1, 0, 1, 0, 0, 2, 2, 1, 2]
    kfold = [sorted(test.tolist()) for _, test in KFold(3, shuffle=True, random_state=0).split(range(10))]
    assert sorted(kfold) != sorted(sorted(torch.nonzero(ids == f).flatten().tolist()) for f in range(3))


def test_config_from_mapping_refuses_unknown_keys_and_layers_on_a_base() -> None:
    cfg = SVMConfig.from_mapping({"c_grid": [0.1, 1.0], "folds": 2})
    assert cfg.c_grid == (0.1, 1.0) and cfg.folds == 2 and cfg.normalize == "l2"
    with pytest.raises(ConfigError, match=r"analyses.probe_cls.svm: unknown SVM setting\(s\) \['solver'\] "
                                          r"\(solver=sklearn is gone: the scikit-learn reference is "
                                          r"tests/svm_reference.py\)"):
        SVMConfig.from_mapping({"solver": "sklearn"}, "analyses.probe_cls.svm")
    base = SVMConfig(c_grid=(1e-3,), folds=1, bias=10.0, loss="hinge")
    assert SVMConfig.from_mapping({"tol": 1e-5}, base=base) == SVMConfig(c_grid=(1e-3,), folds=1, bias=10.0,
                                                                         loss="hinge", tol=1e-5)


def test_one_scorer_for_probes_and_its_normalisation() -> None:
    """``LinearScorer`` holds weights, bias and normalisation; ``Probe`` is one (plus C and CV AP)."""
    from cnnft.svm import LinearScorer, mean_norm_scale

    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 4, generator=g, dtype=torch.float64)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    assert torch.equal(LinearScorer(W, b).scores(x), x @ W.T + b)
    assert torch.equal(LinearScorer(W, b, "mean_norm", 2.5).scores(x), (x * 2.5) @ W.T + b)
    assert torch.equal(LinearScorer(W, b, "l2").scores(x), normalize_features(x, "l2") @ W.T + b)
    # the scale of streamed chunks (detection) is the scale of their rows together (probes)
    assert mean_norm_scale(iter([x[:7], x[7:]]), 20.0) == pytest.approx(mean_norm_scale(x, 20.0), rel=1e-15)
    assert (x * mean_norm_scale(x, 20.0)).norm(dim=1).mean().item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="mean_norm: cannot scale features to mean norm 20.0: the 2 sampled"):
        mean_norm_scale(torch.zeros(2, 3), 20.0)
    y = x[:, 0] > 0.5
    probe = fit_probe(x, y, cfg=SVMConfig(c_grid=(0.1,), folds=1, normalize="mean_norm"))
    assert isinstance(probe, LinearScorer) and probe.scale == mean_norm_scale(x, 20.0)
    assert torch.equal(probe.normalized(x), x.to(probe.W.dtype) * probe.scale)


@pytest.mark.parametrize("loss", ["squared_hinge", "hinge"])
def test_row_space_solve_takes_the_same_steps_as_the_solve_on_the_features(
        loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer rows than features (the image probes): solve_grid solves on the rows' coordinates in
    an orthonormal basis of their span. The same iterates up to rounding (Newton and CG step
    counts within one step or 3%, where a stopping test falls on rounding), the same weights to
    well within the tolerance, the same C per class; not used with a column mask, a start,
    N >= D + 1 or a basis above ROW_SPACE_MAX_BYTES."""
    from functools import partial

    import cnnft.svm.solver as solver

    calls = []
    monkeypatch.setattr(solver, "row_space_basis", lambda F: calls.append(F.shape) or row_space_basis(F))
    x, y = clusters(60, 150, 3, sep=1.0, seed=4)
    cfg = SVMConfig(c_grid=(0.01, 1.0), folds=3, bias=10.0, tol=1e-5, dtype="float64", loss=loss)
    masks = torch.stack([torch.arange(60) % 3 != f for f in range(3)] + [torch.ones(60, dtype=torch.bool)], 1)
    weight = torch.where(y, 2.0, 1.0).double()
    runs = {}
    for row_space in (False, True):
        stats: dict = {}
        W = solve_grid(x, y, weight, masks, cfg.c_grid, cfg, stats=stats, row_space=row_space)
        runs[row_space] = (W, stats)
    assert calls == [(60, 151)]
    (W0, s0), (W1, s1) = runs[False], runs[True]
    assert abs(s0["newton"] - s1["newton"]) <= 1 and abs(s0["cg"] - s1["cg"]) <= 0.03 * s0["cg"]
    assert float((W1 - W0).abs().max()) < 1e-4 * float(W0.abs().max())  # the solves' tol: 1e-5
    a = fit_probe(x, y, cfg=cfg, solver=partial(solve_grid, row_space=False))
    b = fit_probe(x, y, cfg=cfg)
    assert torch.equal(a.c, b.c)
    assert float((b.W - a.W).abs().max()) < 1e-4 * float(a.W.abs().max())
    calls.clear()
    solve_grid(x, y, weight, masks, cfg.c_grid, cfg, columns=torch.ones(3, 150, dtype=torch.bool))
    solve_grid(x, y, weight, masks[:, -1:], [1.0], cfg, init=torch.zeros(3, 151, dtype=torch.float64))
    solve_grid(x[:, :40], y, weight, masks, cfg.c_grid, cfg)
    monkeypatch.setattr(solver, "ROW_SPACE_MAX_BYTES", 8 * 60 * 151 - 1)  # the basis would not fit
    solve_grid(x, y, weight, masks, cfg.c_grid, cfg)
    assert calls == []
