"""Samplers: a seeded distributed sampler and a distributed P x K batch sampler.

Both take `(rank, world_size)` explicitly (no process group needed), draw the same
permutation on every rank from `(seed, epoch)`, and resume from a position. The position
that survives a change of world size is `start`: how much of the epoch's permutation the
job as a whole has consumed (samples, or classes for P x K). Ranks consume it interleaved,
so after k batches of B on W ranks exactly its first k*B*W entries are used, whatever the
earlier world sizes were; a resumed job deals out the rest among its own ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of range(num_samples), identical on every rank. int64 [N]."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class DistributedSampler(Sampler[int]):
    """Rank `rank`'s share of a seeded per-epoch permutation of `range(num_samples)`.

    Rank r takes positions r, r + W, r + 2W, ... of the permutation (W = world size), so
    ranks are disjoint and together cover the epoch. `drop_last=True` drops the remainder
    (N mod W samples); otherwise the permutation is padded with its own first samples so
    every rank gets ceil(N / W) (those few samples are seen twice). `set_epoch(epoch,
    position)` reshuffles and skips the first `position` samples of this rank (resume).
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        _check_rank(rank, world_size)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.position, self.start = 0, 0, 0

    @property
    def per_rank(self) -> int:
        """Samples per rank in the rest of the epoch (from global entry `start` on)."""
        rest = self.num_samples - self.start
        if self.drop_last:
            return rest // self.world_size
        return -(-rest // self.world_size)

    def set_epoch(self, epoch: int, position: int = 0, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside [0, {self.num_samples}] for this epoch")
        self.start = int(start)
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"position {position} is outside [0, {self.per_rank}] for this epoch")
        self.epoch, self.position = int(epoch), int(position)

    def indices(self) -> np.ndarray:
        """This rank's share of the epoch from `start` on, int64 [per_rank] (before skipping
        `position`)."""
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        else:
            order = np.arange(self.num_samples)
        order = order[self.start :]
        if order.size == 0:
            return order
        total = self.per_rank * self.world_size
        if total > order.size:
            order = np.concatenate([order, np.resize(order, total - order.size)])
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.position :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.position

    def state_dict(self, consumed: int) -> dict:
        """Where to resume after this rank consumed `consumed` samples of the current epoch."""
        return {
            "epoch": self.epoch,
            "start": self.start,
            "position": int(consumed),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "num_samples", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler has {name}={state[name]} but this "
                    f"run has {name}={getattr(self, name)}; resume with the same data and world size"
                )
        self.set_epoch(state["epoch"], state["position"], state.get("start", 0))


def groups_from_labels(labels: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """Dataset indices per class: labels [N] -> list over classes of int64 index arrays."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    bounds = list(starts[1:]) + [labels.size]
    return [order[start:end] for start, end in zip(starts, bounds)]


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P classes x K images per rank, for pair-wise losses (batch sampler).

    Each epoch shuffles the classes (same order on every rank); batch b of rank r uses
    classes `perm[(b * W + r) * P : (b * W + r + 1) * P]`, so within one global step every
    class sits on exactly one rank with K images. K images are drawn without replacement
    (a class with fewer than K gives all its images, then repeats; the draw depends only on
    (seed, epoch, class)). Yields lists of P*K dataset indices, class by class.
    `set_epoch(epoch, position, start)` deals out the class order from entry `start` on (the
    classes earlier ranks consumed of this epoch) and resumes at batch `position`.
    """

    def __init__(
        self,
        groups: Sequence[np.ndarray],
        p: int,
        k: int,
        rank: int,
        world_size: int,
        *,
        seed: int = 0,
        min_images: int = 1,
    ) -> None:
        _check_rank(rank, world_size)
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be >= 1, got P={p}, K={k}")
        self.groups = [np.asarray(group, dtype=np.int64) for group in groups]
        self.classes = np.array(
            [c for c, g in enumerate(self.groups) if len(g) >= max(min_images, 1)]
        )
        if self.classes.size < p * world_size:
            raise ValueError(
                f"P x world_size = {p} x {world_size} classes per step, but only {self.classes.size} "
                f"classes have >= {max(min_images, 1)} images; lower P or min_images"
            )
        self.p, self.k, self.rank, self.world_size = p, k, rank, world_size
        self.seed, self.epoch, self.position, self.start = seed, 0, 0, 0

    @classmethod
    def from_labels(
        cls,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        rank: int,
        world_size: int,
        **kwargs,
    ) -> PKBatchSampler:
        return cls(groups_from_labels(labels), p, k, rank, world_size, **kwargs)

    @property
    def batches_per_epoch(self) -> int:
        return (self.classes.size - self.start) // (self.p * self.world_size)

    def set_epoch(self, epoch: int, position: int = 0, start: int = 0) -> None:
        if not 0 <= start <= self.classes.size:
            raise ValueError(f"start {start} is outside [0, {self.classes.size}] for this epoch")
        self.start = int(start)
        if not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"position {position} is outside [0, {self.batches_per_epoch}]")
        self.epoch, self.position = int(epoch), int(position)

    def _class_order(self) -> np.ndarray:
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != (self.seed, self.epoch):
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.classes.size)
            self._order = ((self.seed, self.epoch), self.classes[perm])
        return self._order[1]

    def batch(self, index: int) -> list[int]:
        """This rank's batch `index` of the current epoch (P*K dataset indices)."""
        order = self._class_order()
        first = self.start + (index * self.world_size + self.rank) * self.p
        picked: list[int] = []
        for cls in order[first : first + self.p]:
            group = self.groups[int(cls)]
            rng = np.random.default_rng([self.seed, self.epoch, int(cls)])
            if group.size >= self.k:
                chosen = rng.choice(group, size=self.k, replace=False)
            else:  # every image once, then repeats to fill K
                chosen = np.concatenate(
                    [rng.permutation(group), rng.choice(group, self.k - group.size)]
                )
            picked.extend(int(i) for i in chosen)
        return picked

    def __iter__(self) -> Iterator[list[int]]:
        for index in range(self.position, self.batches_per_epoch):
            yield self.batch(index)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position
