"""Feature ablations (paper Sec. 4): shapes, what each keeps, errors, and their configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from cnnft import ablations
from cnnft.ablations import (
    binarize,
    binarize_loc,
    spatial_max,
    spatial_max_binarize,
    spatial_shuffle,
    unroll,
)

ABLATION_CONF = Path(__file__).resolve().parents[1] / "conf" / "ablations"
SPATIAL = [spatial_shuffle, spatial_max, binarize_loc, spatial_max_binarize]


def _maps(n: int = 4, c: int = 5, h: int = 3, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_shapes() -> None:
    x = _maps()
    assert unroll(x).shape == (4, 60)
    assert spatial_shuffle(x).shape == (4, 60)
    assert spatial_max(x).shape == (4, 5)
    assert binarize(x).shape == (4, 60)
    assert binarize_loc(x).shape == (4, 60)
    assert spatial_max_binarize(x).shape == (4, 5)


def test_unroll_flattens_channel_major_and_passes_fc_features() -> None:
    x = _maps()
    assert torch.equal(unroll(x).view(4, 5, 3, 4), x)
    fc = torch.randn(4, 16)
    assert unroll(fc) is fc
    with pytest.raises(ValueError, match=r"unroll needs \[N, C, H, W\] feature maps, got shape \(4, 2, 8\)"):
        unroll(torch.randn(4, 2, 8))


def test_spatial_shuffle_permutes_positions_within_each_map() -> None:
    x = _maps(n=6, c=7, h=5, w=5)
    out = spatial_shuffle(x, seed=3).view(6, 7, 25)
    flat = x.flatten(2)
    # each (image, filter) keeps its multiset of values
    assert torch.equal(out.sort(dim=-1).values, flat.sort(dim=-1).values)
    assert not torch.equal(out, flat)
    # same seed, same result; another seed, another result
    assert torch.equal(spatial_shuffle(x, seed=3), spatial_shuffle(x, seed=3))
    assert not torch.equal(spatial_shuffle(x, seed=3), spatial_shuffle(x, seed=4))
    # recover the permutation from a map of distinct position ids: every image gets its own,
    # and the filters of one image get different ones too
    ids = torch.arange(25.0).expand(6, 7, 25).reshape(6, 7, 5, 5)
    perms = spatial_shuffle(ids, seed=3).view(6, 7, 25)
    assert torch.equal(perms.sort(dim=-1).values, ids.flatten(2))
    assert len({tuple(perms[i, 0].tolist()) for i in range(6)}) == 6
    assert len({tuple(perms[0, f].tolist()) for f in range(7)}) == 7
    # the permutation depends on the seed and shape only, not on the values
    assert torch.equal(perms, spatial_shuffle(ids + 0, seed=3).view(6, 7, 25))
    assert torch.equal(out, flat.gather(-1, perms.long()))


def test_spatial_max_equals_amax() -> None:
    x = _maps()
    assert torch.equal(spatial_max(x), x.amax(dim=(2, 3)))
    assert torch.equal(spatial_max_binarize(x), (x.amax(dim=(2, 3)) > 0).float())
    assert torch.equal(spatial_max_binarize(x, threshold=1.0), (x.amax(dim=(2, 3)) > 1.0).float())


def test_binarize_threshold() -> None:
    x = torch.tensor([[[[-1.0, 0.0], [0.5, 2.0]]]])
    assert binarize(x).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert binarize(x, threshold=0.5).tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert binarize(x, threshold=-2.0).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert binarize(x.double()).dtype == torch.float64
    assert binarize(x).dtype == torch.float32


def test_binarize_loc_marks_each_filters_argmax() -> None:
    x = _maps().abs() + 0.1  # every filter fires
    out = binarize_loc(x).view(4, 5, 12)
    assert torch.equal(out.sum(dim=-1), torch.ones(4, 5))
    assert torch.equal(out.argmax(dim=-1), x.flatten(2).argmax(dim=-1))
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_binarize_loc_ties_and_silent_filters() -> None:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 3.0], [3.0, 0.0]])  # tie: first position (row-major) wins
    x[0, 1] = torch.tensor([[-1.0, -0.5], [-2.0, -3.0]])  # max <= 0: silent, all zeros
    # x[0, 2] all zeros (a dead ReLU map): all zeros, not a 1 at position 0
    assert binarize_loc(x).view(3, 4).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert binarize_loc(x, threshold=-1.0).view(3, 4).tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("fn", SPATIAL, ids=lambda f: f.__name__)
def test_spatial_ablations_reject_fc_features(fn) -> None:
    with pytest.raises(ValueError, match=rf"{fn.__name__} needs \[N, C, H, W\].*\(4, 16\)"):
        fn(torch.randn(4, 16))


def test_binarize_takes_fc_features_too() -> None:
    """Sec. 4.2 binarizes fc6/fc7 as well as pool5."""
    x = torch.tensor([[0.0, 2.0, -1.0, 0.5]])
    assert binarize(x).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match=r"binarize needs \[N, C, H, W\]"):
        binarize(torch.randn(2, 3, 4))


def test_every_config_instantiates_and_runs() -> None:
    names = sorted(f.stem for f in ABLATION_CONF.glob("*.yaml"))
    assert set(names) >= {"unroll", "shuffle", "spatial_max", "binarize", "binarize_loc",
                          "spatial_max_binarize"}
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ABLATION_CONF.parent)):
        cfg = compose("train", overrides=[f"ablations=[{','.join(names)}]"])
    x = _maps().relu()
    for name in names:
        node = cfg.ablations[name]
        out = instantiate(node)(x)
        assert isinstance(out, torch.Tensor) and out.shape[0] == 4, name
        assert out.shape[1] in (5, 60), name
        assert torch.equal(out, getattr(ablations, node._target_.rsplit(".", 1)[1])(x)), name


def test_ablations_declare_whether_they_are_spatial() -> None:
    """``probing.applies`` reads the declaration, not the function's name."""
    import functools

    from cnnft.ablations import declare, is_spatial
    from cnnft.probing import applies

    assert {fn.__name__ for fn in SPATIAL} == {fn.__name__ for fn in
                                               [*SPATIAL, unroll, binarize] if is_spatial(fn)}
    assert not is_spatial(functools.partial(binarize, threshold=0.5))  # as a config builds it
    fc, maps = torch.zeros(2, 6), torch.zeros(2, 3, 2, 2)

    def unroll_lookalike(x: torch.Tensor) -> torch.Tensor:  # undeclared: spatial, whatever its name
        return x.amax(dim=(2, 3))

    unroll_lookalike.__name__ = "unroll"
    assert not applies(unroll_lookalike, fc) and applies(unroll_lookalike, maps)

    @declare(spatial=False)
    def halve(x: torch.Tensor) -> torch.Tensor:
        return x / 2

    assert applies(halve, fc) and applies(functools.partial(halve), fc)
    assert [applies(fn, fc) for fn in SPATIAL] == [False] * 4 and applies(binarize, fc)


def test_ablation_configs_state_the_declaration() -> None:
    """The ``# spatial:`` line of each conf/ablations file matches its function's declaration."""
    from cnnft.ablations import is_spatial

    for path in sorted(ABLATION_CONF.glob("*.yaml")):
        text = path.read_text()
        target = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("_target_:"))
        stated = next(line.split(":", 1)[1].split()[0] for line in text.splitlines()
                      if line.startswith("# spatial:"))
        assert stated == str(is_spatial(getattr(ablations, target.rsplit(".", 1)[1]))).lower(), path.name
