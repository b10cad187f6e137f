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
    present = torch.zeros(num_local, dtype=torch.bool, device=positives.device)
    present[positives] = True
    return sample_present(present, num_sample, generator, int(positives.numel()))


def present_classes(local: torch.Tensor, owned: torch.Tensor, num_local: int) -> torch.Tensor:
    """[num_local] bool: which of this shard's classes occur in the batch (`local` [G] the
    local class of each row, valid where `owned`). An index_add of counts, no sync (where
    `torch.unique` of the owned labels would size its result on the host)."""
    counts = torch.zeros(num_local, dtype=torch.int32, device=local.device)
    counts.index_add_(0, local.clamp_min(0), owned.to(torch.int32))
    return counts > 0


def sample_present(present: torch.Tensor, num_sample: int, generator: torch.Generator,
                   max_positives: int) -> torch.Tensor:
    """`sample_centres` from the mask of present classes; `max_positives` bounds their
    number (the batch rows). Sync-free when `num_sample >= max_positives` (then S =
    num_sample); otherwise the number of positives is read on the host once (S depends
    on it)."""
    num_local = present.shape[0]
    if num_sample >= num_local:
        return torch.arange(num_local, device=present.device)
    scores = torch.rand(num_local, generator=generator, device=generator.device).to(present.device)
    scores = torch.where(present, torch.full_like(scores, 2.0), scores)  # positives always win
    keep = num_sample if num_sample >= max_positives else max(num_sample, int(present.sum()))
    return torch.topk(scores, keep, sorted=False).indices.sort().values


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
