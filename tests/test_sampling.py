"""Step-deterministic batch samplers: resumable, permutation epochs, rank slices, fg/bg mix."""

from __future__ import annotations

import numpy as np
import pytest

from cnnft.data.sampling import EpochSampler, ForegroundBackgroundSampler
from cnnft.errors import ConfigError


def _indices(batch: list[tuple[int, int, int]]) -> list[int]:
    return [i for i, _, _ in batch]


def _seeds(batch: list[tuple[int, int, int]]) -> list[int]:
    return [s for _, s, _ in batch]


def _iterate_from(sampler, position: int) -> list[list[tuple[int, int]]]:
    sampler.position = lambda: position
    return list(sampler)


def test_epoch_sampler_length_and_pure_function_of_step() -> None:
    a, b = EpochSampler(50, 4, seed=7), EpochSampler(50, 4, seed=7)
    assert len(a) == a.steps_per_epoch == 12  # 50 // 4, last partial batch dropped
    for step in (0, 1, 11, 12, 30, 1000):
        assert a.batch(step) == b.batch(step)
    # the order of queries does not matter
    late_first = [b.batch(s) for s in (5, 3, 0)]
    assert late_first == [a.batch(5), a.batch(3), a.batch(0)]
    assert a.batch(0) != EpochSampler(50, 4, seed=8).batch(0)
    assert all(len(a.batch(s)) == 4 for s in range(30))


@pytest.mark.parametrize("position", [0, 5, 11, 12, 17, 23])
def test_epoch_sampler_resumes_at_position(position: int) -> None:
    sampler = EpochSampler(50, 4, seed=3)
    epoch_end = (position // 12 + 1) * 12
    got = _iterate_from(sampler, position)
    assert len(got) == epoch_end - position
    assert got == [EpochSampler(50, 4, seed=3).batch(s) for s in range(position, epoch_end)]
    # iterating again re-reads the position
    sampler.position = lambda: epoch_end
    assert next(iter(sampler)) == sampler.batch(epoch_end)


def test_each_epoch_is_a_permutation_without_repeats() -> None:
    sampler = EpochSampler(50, 4, seed=11)
    epochs = []
    for epoch in range(3):
        idx = [i for s in range(epoch * 12, (epoch + 1) * 12) for i in _indices(sampler.batch(s))]
        assert len(idx) == len(set(idx)) == 48
        assert set(idx) <= set(range(50))
        epochs.append(idx)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    # over one epoch the whole epoch's order is a slice of a permutation of all 50 samples
    full = [i for b in _iterate_from(sampler, 0) for i in _indices(b)]
    assert full == epochs[0]


def test_rank_slices_make_up_the_global_batch() -> None:
    # batch_size is global: two ranks take 3 each of a global batch of 6
    r0 = EpochSampler(40, 6, seed=5, rank=0, world_size=2)
    r1 = EpochSampler(40, 6, seed=5, rank=1, world_size=2)
    assert len(r0) == len(r1) == 40 // 6
    assert r0.batch_size == r1.batch_size == 3
    for step in range(0, 20):
        b0, b1 = r0.batch(step), r1.batch(step)
        glob = r0.global_batch(step).tolist()
        assert glob == r1.global_batch(step).tolist()
        assert len(glob) == 6
        assert _indices(b0) + _indices(b1) == glob
        assert not set(_indices(b0)) & set(_indices(b1))
    # two ranks of 3 see the same samples and seeds as one process with batches of 6
    single = EpochSampler(40, 6, seed=5)
    for step in range(0, 20):
        assert r0.batch(step) + r1.batch(step) == single.batch(step)


def test_sample_seeds_differ_and_are_deterministic() -> None:
    sampler = EpochSampler(64, 8, seed=2)
    seeds = [s for step in range(16) for s in _seeds(sampler.batch(step))]
    assert len(set(seeds)) == len(seeds) == 128
    assert all(0 <= s < 2**31 - 1 for s in seeds)
    again = [s for step in range(16) for s in _seeds(EpochSampler(64, 8, seed=2).batch(step))]
    assert seeds == again
    # the same sample index gets a fresh seed in the next epoch
    first = {i: s for i, s, _ in sampler.batch(0)}
    later = {i: s for st in range(8, 16) for i, s, _ in sampler.batch(st)}
    assert all(first[i] != later[i] for i in first if i in later)


def test_epoch_sampler_needs_one_full_batch() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        EpochSampler(7, 8, seed=0, world_size=2)
    assert len(EpochSampler(8, 8, seed=0, world_size=2)) == 1


def _samplers(make, world_size: int) -> list:
    return [make(rank=r, world_size=world_size) for r in range(world_size)]


def _global_keys(samplers: list, step: int) -> list[tuple[int, int, int]]:
    """Every rank's keys of ``step`` in global-batch order (by position)."""
    return sorted((k for s in samplers for k in s.batch(step)), key=lambda k: k[2])


SAMPLERS = {
    "epoch": lambda **kw: EpochSampler(50, 8, seed=3, **kw),
    "fg_bg": lambda **kw: ForegroundBackgroundSampler(np.arange(100, 110), np.arange(60), 8, 4,
                                                      seed=4, **kw),
}


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_is_the_same_for_any_number_of_processes(kind: str, world_size: int) -> None:
    """Step s trains on the same samples with the same augmentation seeds and positions
    whatever the number of processes; each rank holds an equal, disjoint share."""
    one = SAMPLERS[kind](rank=0, world_size=1)
    many = _samplers(SAMPLERS[kind], world_size)
    assert all(len(s) == len(one) for s in many)  # epochs are as long
    for step in [*range(12), 1000]:
        assert _global_keys(many, step) == one.batch(step)
        assert [p for _, _, p in one.batch(step)] == list(range(8))
        assert all(len(s.batch(step)) == 8 // world_size for s in many)
        assert all(s.global_batch(step).tolist() == one.global_batch(step).tolist() for s in many)


def test_fg_bg_share_per_rank() -> None:
    """Each rank gets fg_per_batch / world foreground windows, then its background share."""
    fg, bg = np.arange(100, 110), np.arange(60)
    for rank in range(2):
        sampler = ForegroundBackgroundSampler(fg, bg, 8, 4, seed=4, rank=rank, world_size=2)
        assert sampler.positions().tolist() == [2 * rank, 2 * rank + 1, 4 + 2 * rank, 5 + 2 * rank]
        batch = _indices(sampler.batch(7))
        assert set(batch[:2]) <= set(fg.tolist()) and set(batch[2:]) <= set(bg.tolist())


def test_single_process_batches_are_unchanged() -> None:
    """One process: the keys the samplers gave before batch sizes became global (recorded from
    the previous code for a few steps; index and seed, position is new)."""
    epoch = EpochSampler(50, 4, seed=7)
    assert [k[:2] for k in epoch.batch(0)] == EPOCH_STEP0
    assert [k[:2] for k in epoch.batch(13)] == EPOCH_STEP13
    fgbg = ForegroundBackgroundSampler(FG, BG, batch_size=8, fg_per_batch=2, seed=4)
    assert [k[:2] for k in fgbg.batch(5)] == FGBG_STEP5


@pytest.mark.parametrize(("kind", "world_size", "message"), [
    ("epoch", 3, "datamodule.batch_size=8 counts samples of the global batch"),
    ("fg_bg", 3, "datamodule.batch_size=8 counts samples of the global batch"),
    ("fg_bg_odd", 2, "datamodule.fg_per_batch=3 counts samples of the global batch"),
])
def test_a_global_batch_that_does_not_divide_is_refused(kind: str, world_size: int,
                                                        message: str) -> None:
    make = SAMPLERS.get(kind) or (lambda **kw: ForegroundBackgroundSampler(
        np.arange(100, 110), np.arange(60), 8, 3, seed=4, **kw))
    with pytest.raises(ConfigError, match=message) as info:
        make(rank=0, world_size=world_size)
    assert f"does not divide among {world_size} processes" in str(info.value)
    assert "trainer.devices x trainer.num_nodes" in str(info.value)


FG = np.arange(100, 110)
BG = np.arange(0, 60)

# (index, seed) keys the samplers gave one process before batch sizes became global
EPOCH_STEP0 = [(10, 1868869221), (45, 1653865097), (24, 1880887029), (46, 240361926)]
EPOCH_STEP13 = [(48, 1751045394), (29, 1959404407), (27, 1468642440), (18, 876830334)]
FGBG_STEP5 = [(109, 1020016819), (105, 1691359325), (48, 313614887), (56, 740887348),
              (3, 215026227), (28, 372132768), (20, 1995832), (9, 1566869216)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_fg_bg_batches(world_size: int) -> None:
    samplers = [ForegroundBackgroundSampler(FG, BG, batch_size=8, fg_per_batch=2, seed=4,
                                            rank=r, world_size=world_size)
                for r in range(world_size)]
    # one epoch = enough steps for the foreground set to be drawn about once
    assert len(samplers[0]) == -(-len(FG) // 2)
    fg_seen = set()
    nfg = 2 // world_size
    for step in range(40):
        for sampler in samplers:
            batch = _indices(sampler.batch(step))
            assert len(batch) == 8 // world_size
            assert set(batch[:nfg]) <= set(FG.tolist())
            assert set(batch[nfg:]) <= set(BG.tolist())
            fg_seen.update(batch[:nfg])
        glob = samplers[0].global_batch(step).tolist()
        assert [i for _, _, i in sorted((p, n, i) for s in samplers
                                        for n, (i, _, p) in enumerate(s.batch(step)))] == glob
    assert fg_seen == set(FG.tolist())  # over 40 steps every foreground window comes up
    again = ForegroundBackgroundSampler(FG, BG, batch_size=8, fg_per_batch=2, seed=4,
                                        world_size=world_size)
    assert again.batch(13) == samplers[0].batch(13)
    assert _iterate_from(samplers[0], 1) == [samplers[0].batch(s)
                                              for s in range(1, len(samplers[0]))]


def test_fg_bg_extremes() -> None:
    only_fg = ForegroundBackgroundSampler(FG, BG, batch_size=4, fg_per_batch=4, seed=0)
    assert set(_indices(only_fg.batch(0))) <= set(FG.tolist())
    only_bg = ForegroundBackgroundSampler(FG, BG, batch_size=4, fg_per_batch=0, seed=0)
    assert set(_indices(only_bg.batch(3))) <= set(BG.tolist())
    assert len(only_bg) >= 1


def test_fg_bg_errors() -> None:
    with pytest.raises(ValueError, match="0 fg"):
        ForegroundBackgroundSampler(np.array([], int), BG, batch_size=4, fg_per_batch=1, seed=0)
    with pytest.raises(ValueError, match="0 bg"):
        ForegroundBackgroundSampler(FG, np.array([], int), batch_size=4, fg_per_batch=1, seed=0)
    with pytest.raises(ValueError, match="fg_per_batch=5"):
        ForegroundBackgroundSampler(FG, BG, batch_size=4, fg_per_batch=5, seed=0)
    with pytest.raises(ValueError, match="fg_per_batch=-1"):
        ForegroundBackgroundSampler(FG, BG, batch_size=4, fg_per_batch=-1, seed=0)
