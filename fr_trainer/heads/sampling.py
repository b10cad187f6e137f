"""Partial-FC sampling of class centres: positives always, negatives uniformly, from a
per-rank stream (`sampling_seed`)."""

from __future__ import annotations

import math

import torch

from fr_trainer.distributed.shard import ClassShard


def num_sampled(num_local: int, sample_rate: float) -> int:
    """Centres a shard uses per step at `sample_rate` (at least one)."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    return max(1, min(num_local, math.ceil(sample_rate * num_local)))


def sample_centres(positives: torch.Tensor, num_local: int, num_sample: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Sorted indices [S] of the centres to use this step.

    `positives` [P] are the local class indices present in the global batch; all of them
    are kept, and the remaining `num_sample - P` slots (if any) are filled with negatives
    drawn uniformly without replacement. S = max(num_sample, P).
    """
    if num_sample >= num_local:
        return torch.arange(num_local, device=positives.device)
    scores = torch.rand(num_local, generator=generator, device=generator.device)
    scores[positives] = 2.0  # above every uniform draw: positives always win
    keep = max(num_sample, int(positives.numel()))
    return torch.topk(scores, keep, sorted=False).indices.sort().values.to(positives.device)


_MASK_63 = (1 << 63) - 1


def sampling_seed(seed: int, shard: ClassShard, step: int | None = None) -> int:
    """The seed of a rank's negative-sampling stream: from (seed, rank) at the start of a
    run; after a reshard from (seed, step, rank, world size), distinct for every rank."""
    if step is None:
        return (seed * 1_000_003 + 7919 * (shard.rank + 1)) % (1 << 63)
    mixed = seed & _MASK_63
    for value in (step, shard.world_size, shard.rank):  # splitmix64-style mixing
        mixed = (mixed * 0x9E3779B97F4A7C15 + value + 1) & _MASK_63
        mixed ^= mixed >> 31
    return mixed
