"""samplers.py: per-rank counts, determinism, reshuffling and the repeated-augmentation layout."""
from collections import Counter

import pytest

from samplers import RASampler, samples_per_replica


def rank_lists(size, num_replicas, epoch=0, **kwargs):
    samplers = [RASampler(range(size), num_replicas=num_replicas, rank=r, **kwargs) for r in range(num_replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize('size,num_replicas,expected', [
    (1000, 1, 768), (1000, 2, 384), (1000, 4, 192), (300, 4, 64), (256, 2, 128),
    (10, 1, 10), (10, 2, 5), (10, 4, 3), (255, 4, 64), (1, 4, 1),
])
def test_per_rank_counts(size, num_replicas, expected):
    assert samples_per_replica(size, num_replicas) == expected
    for indices in rank_lists(size, num_replicas):
        assert len(indices) == expected
        assert all(0 <= i < size for i in indices)
    assert len(RASampler(range(size), num_replicas=num_replicas, rank=0)) == expected


def test_imagenet_count():
    assert samples_per_replica(1281167, 8) == 1281024 // 8 == 160128


def test_defaults_without_process_group():
    sampler = RASampler(range(600))
    assert (sampler.num_replicas, sampler.rank, sampler.num_repeats) == (1, 0, 3)
    assert len(list(sampler)) == 512


def test_deterministic_for_a_seed_and_epoch():
    assert rank_lists(50, 2, seed=7) == rank_lists(50, 2, seed=7)
    assert rank_lists(50, 2, seed=7) != rank_lists(50, 2, seed=8)


def test_set_epoch_changes_the_order():
    sampler = RASampler(range(300), num_replicas=1, rank=0)
    first = list(sampler)
    assert list(sampler) == first  # no reshuffle without set_epoch
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and len(second) == len(first)
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_each_index_repeated_in_a_row():
    sampler = RASampler(range(20), num_replicas=2, rank=0, num_repeats=3)
    repeated = sampler.repeated_indices()
    assert len(repeated) == sampler.total_size == 60
    assert Counter(repeated) == {i: 3 for i in range(20)}
    assert all(repeated[k] == repeated[k + 1] == repeated[k + 2] for k in range(0, 60, 3))
    assert [repeated[k] for k in range(0, 60, 3)] != list(range(20))  # shuffled
    unshuffled = RASampler(range(4), num_replicas=1, rank=0, shuffle=False, num_repeats=2)
    assert unshuffled.repeated_indices() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_padding_wraps_to_a_multiple_of_replicas():
    sampler = RASampler(range(5), num_replicas=4, rank=0, num_repeats=3)
    repeated = sampler.repeated_indices()
    assert len(repeated) == 16 and repeated[15] == repeated[0]
    assert RASampler(range(1), num_replicas=4, rank=3, num_repeats=1).repeated_indices() == [0, 0, 0, 0]


def test_copies_of_an_image_go_to_different_ranks_at_the_same_step():
    ranks = rank_lists(768, 3, num_repeats=3)
    assert all(len(indices) == 256 for indices in ranks)
    assert ranks[0] == ranks[1] == ranks[2]


def test_ranks_cover_a_small_dataset():
    for num_replicas in (1, 2, 4):
        ranks = rank_lists(10, num_replicas, num_repeats=1)
        assert set().union(*ranks) == set(range(10))
        together = Counter(i for indices in ranks for i in indices)
        assert sum(together.values()) == 10 + (-10) % num_replicas  # padding only
    ranks = rank_lists(10, 2, num_repeats=3)
    sampler = RASampler(range(10), num_replicas=2, rank=0)
    assert sorted(ranks[0] + ranks[1]) == sorted(sampler.repeated_indices()[:10])


def test_bad_arguments():
    with pytest.raises(ValueError, match='empty dataset'):
        RASampler([], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match='rank 2 is outside'):
        RASampler(range(10), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match='num_repeats must be >= 1'):
        RASampler(range(10), num_replicas=1, rank=0, num_repeats=0)
