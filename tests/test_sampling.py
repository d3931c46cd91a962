"""Step-deterministic batch samplers: resumable, permutation epochs, rank slices, fg/bg mix."""

from __future__ import annotations

import numpy as np
import pytest

from cnnft.data.sampling import EpochSampler, ForegroundBackgroundSampler


def _indices(batch: list[tuple[int, int]]) -> list[int]:
    return [i for i, _ in batch]


def _seeds(batch: list[tuple[int, int]]) -> list[int]:
    return [s for _, s in batch]


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
    r0 = EpochSampler(40, 3, seed=5, rank=0, world_size=2)
    r1 = EpochSampler(40, 3, seed=5, rank=1, world_size=2)
    assert len(r0) == len(r1) == 40 // 6
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
    first = dict(sampler.batch(0))
    later = {i: s for st in range(8, 16) for i, s in sampler.batch(st)}
    assert all(first[i] != later[i] for i in first if i in later)


def test_epoch_sampler_needs_one_full_batch() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        EpochSampler(7, 4, seed=0, world_size=2)
    assert len(EpochSampler(8, 4, seed=0, world_size=2)) == 1


FG = np.arange(100, 110)
BG = np.arange(0, 60)


@pytest.mark.parametrize("world_size", [1, 2])
def test_fg_bg_batches(world_size: int) -> None:
    samplers = [ForegroundBackgroundSampler(FG, BG, batch_size=8, fg_per_batch=2, seed=4,
                                            rank=r, world_size=world_size)
                for r in range(world_size)]
    # one epoch = enough steps for the foreground set to be drawn about once
    assert len(samplers[0]) == -(-len(FG) // (2 * world_size))
    fg_seen = set()
    for step in range(40):
        for sampler in samplers:
            batch = _indices(sampler.batch(step))
            assert len(batch) == 8
            assert set(batch[:2]) <= set(FG.tolist())
            assert set(batch[2:]) <= set(BG.tolist())
            fg_seen.update(batch[:2])
        glob = samplers[0].global_batch(step).tolist()
        assert [i for s in samplers for i in _indices(s.batch(step))] == glob
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
