"""DistributedSampler and PKBatchSampler: disjoint, covering, seeded, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from fr_trainer.data.samplers import DistributedSampler, PKBatchSampler, groups_from_labels


@pytest.mark.parametrize("num_samples,world_size", [(12, 3), (10, 4), (7, 1), (5, 8)])
def test_ranks_cover_the_epoch_and_are_disjoint_when_even(
    num_samples: int, world_size: int
) -> None:
    shares = [
        list(DistributedSampler(num_samples, r, world_size, seed=3)) for r in range(world_size)
    ]
    per_rank = -(-num_samples // world_size)
    assert all(len(share) == per_rank for share in shares)
    flat = [i for share in shares for i in share]
    assert set(flat) == set(range(num_samples))  # covers the epoch
    if num_samples % world_size == 0:
        assert len(flat) == len(set(flat))  # disjoint
    else:  # padding repeats exactly the missing number of samples
        assert len(flat) - len(set(flat)) == per_rank * world_size - num_samples


def test_drop_last_is_disjoint_and_equal_sized() -> None:
    shares = [list(DistributedSampler(10, r, 4, seed=1, drop_last=True)) for r in range(4)]
    flat = [i for share in shares for i in share]
    assert all(len(share) == 2 for share in shares) and len(flat) == len(set(flat)) == 8


def test_same_permutation_on_every_rank_and_new_one_per_epoch() -> None:
    def global_order(epoch: int, seed: int) -> list[int]:
        samplers = [DistributedSampler(20, r, 2, seed=seed) for r in range(2)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        ranks = [list(s) for s in samplers]
        return [ranks[i % 2][i // 2] for i in range(20)]

    assert global_order(0, 7) == global_order(0, 7)
    assert global_order(0, 7) != global_order(1, 7)
    assert global_order(0, 7) != global_order(0, 8)
    assert sorted(global_order(3, 7)) == list(range(20))


def test_resume_from_a_position_continues_exactly() -> None:
    sampler = DistributedSampler(101, 1, 3, seed=5)
    sampler.set_epoch(4)
    full = list(sampler)
    state = sampler.state_dict(consumed=13)
    resumed = DistributedSampler(101, 1, 3, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == full[13:] and len(resumed) == len(full) - 13
    with pytest.raises(ValueError, match="world_size=3 but this run has world_size=2"):
        DistributedSampler(101, 1, 2, seed=5).load_state_dict(state)


def test_bad_rank_is_rejected() -> None:
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        DistributedSampler(10, 2, 2)


def _labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.repeat(np.arange(23), rng.integers(1, 9, 23))


def test_pk_batches_have_p_classes_of_k_and_ranks_never_share_a_class() -> None:
    labels = _labels()
    p, k, world = 3, 4, 2
    samplers = [PKBatchSampler.from_labels(labels, p, k, r, world, seed=2) for r in range(world)]
    assert len(samplers[0]) == 23 // (p * world)
    seen_classes = []
    for batches in zip(*samplers):
        step_classes = []
        for batch in batches:
            assert len(batch) == p * k
            classes = labels[np.array(batch)].reshape(p, k)
            assert (classes == classes[:, :1]).all()  # K images of one class per block
            step_classes += list(classes[:, 0])
        assert len(set(step_classes)) == p * world  # disjoint across ranks within a step
        seen_classes += step_classes
    assert len(seen_classes) == len(set(seen_classes))  # no class twice per epoch


def test_pk_draws_without_replacement_when_possible_and_resumes() -> None:
    labels = _labels()
    sampler = PKBatchSampler.from_labels(labels, 2, 3, 0, 1, seed=9)
    sampler.set_epoch(1)
    batches = list(sampler)
    groups = groups_from_labels(labels)
    for batch in batches:
        for block in np.array(batch).reshape(2, 3):
            size = groups[int(labels[block[0]])].size
            assert len(set(block.tolist())) == min(3, size)
    resumed = PKBatchSampler.from_labels(labels, 2, 3, 0, 1, seed=9)
    resumed.set_epoch(1, position=4)
    assert list(resumed) == batches[4:]
    sampler.set_epoch(2)
    assert list(sampler) != batches


def test_pk_rejects_too_few_classes() -> None:
    with pytest.raises(ValueError, match="only 2 classes"):
        PKBatchSampler.from_labels([0, 0, 1, 1], 2, 2, 0, 2)
