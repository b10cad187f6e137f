"""`ClassShard`: which contiguous block of classes a rank owns.

The remainder of an uneven split is handled here and nowhere else: the first
`num_classes % world_size` ranks own one class more than the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassShard:
    """The classes `[start, start + num_local)` owned by `rank` of `world_size`."""

    num_classes: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        if self.num_classes < self.world_size:
            raise ValueError(
                f"num_classes={self.num_classes} is smaller than world_size={self.world_size}: "
                "every rank must own at least one class; use fewer ranks"
            )

    @staticmethod
    def sizes(num_classes: int, world_size: int) -> list[int]:
        """Number of classes of every rank, in rank order."""
        base, extra = divmod(num_classes, world_size)
        return [base + (1 if r < extra else 0) for r in range(world_size)]

    @staticmethod
    def starts(num_classes: int, world_size: int) -> list[int]:
        """First class of every rank, in rank order."""
        base, extra = divmod(num_classes, world_size)
        return [r * base + min(r, extra) for r in range(world_size)]

    @property
    def num_local(self) -> int:
        return self.sizes(self.num_classes, self.world_size)[self.rank]

    @property
    def start(self) -> int:
        return self.starts(self.num_classes, self.world_size)[self.rank]

    @property
    def end(self) -> int:
        return self.start + self.num_local

    def owns(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the labels that fall in this shard."""
        return (labels >= self.start) & (labels < self.end)

    def owner_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Rank that owns each label (labels must be in range)."""
        starts = torch.tensor(self.starts(self.num_classes, self.world_size), device=labels.device)
        return torch.searchsorted(starts, labels, right=True) - 1
