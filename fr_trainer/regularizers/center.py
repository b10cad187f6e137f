"""Center loss (Wen et al. 2016) with the centres sharded like the class weights.

    L_c = lambda * 0.5 * sum_i ||x_i - c_{y_i}||^2 / G

over the all-gathered batch (G rows). Rank r holds the centres of its `ClassShard` and
computes the distances of the rows whose label it owns: no G x K distance matrix is built,
and the only collectives are the all-gather of the batch and one all-reduce of two floats.

Two ways to move the centres:
- `update="paper"` (default): the centres are a buffer without gradient; in training mode
  each forward, after computing the loss with the current centres, the owner applies
  c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)
  with n_j the number of rows of class j in the global batch (alpha = 0.5).
- `update="sgd"`: the centres are a Parameter learned by the optimizer with the gradient
  dL/dc_j = lambda * sum_{i: y_i = j} (c_j - x_i) / G (sharded: only the owner has it).

Gradients w.r.t. the embeddings are exact: lambda (x_i - c_{y_i}) / G, reduced back to
the rank that owns row i.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import rank_and_world_size
from fr_trainer.distributed.shard import ClassShard
from fr_trainer.regularizers._gather import gather_batch, join_sum

UPDATES = ("paper", "sgd")


class CenterLoss(nn.Module):
    """Sharded center loss. Call `loss(local_embeddings [B, D], local_labels [B] int64)`
    -> scalar (the same on every rank).

    Args:
        num_classes: K. embedding_size: D.
        loss_weight: the paper's lambda (0.003): the returned value is already weighted.
        alpha: the centres' learning rate of the paper's update rule (0.5).
        update: "paper" (buffer moved by the rule above) or "sgd" (a Parameter).
        process_group: the group the centres are sharded over (None: the default group
            when initialised, else a single process).
    `centres` [shard.num_local, D] start at zero.
    """

    def __init__(self, num_classes: int, embedding_size: int, loss_weight: float = 0.003,
                 alpha: float = 0.5, update: str = "paper",
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"update={update!r} is not one of {UPDATES}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got alpha={alpha}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        rank, world_size = rank_and_world_size(process_group)
        self.shard = ClassShard(num_classes, world_size, rank)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.loss_weight, self.alpha, self.update = float(loss_weight), float(alpha), update
        self.process_group = process_group
        centres = torch.zeros(self.shard.num_local, embedding_size)
        if update == "sgd":
            self.centres = nn.Parameter(centres)
        else:
            self.register_buffer("centres", centres)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = gather_batch(embeddings.to(self.centres.dtype), labels, self.num_classes, self.process_group)
        # every row, the ones another rank owns masked out (not selected: the selection's
        # size is data, which a GPU would have to report to the host)
        owned = self.shard.owns(y)
        local_y = torch.where(owned, y - self.shard.start, torch.zeros_like(y))
        diff = torch.where(owned[:, None], x - self.centres.index_select(0, local_y), torch.zeros_like(x))
        local = 0.5 * self.loss_weight * diff.square().sum()
        loss = join_sum(local, 0.0, self.process_group)[0] / x.shape[0]
        if self.update == "paper" and self.training:
            self._paper_update(diff.detach(), local_y, owned)
        return loss

    @torch.no_grad()
    def _paper_update(self, diff: torch.Tensor, local_y: torch.Tensor, owned: torch.Tensor) -> None:
        """c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j), for owned j (the
        rows of other ranks have diff 0 and count 0)."""
        delta = torch.zeros_like(self.centres).index_add_(0, local_y, -diff)  # sum (c_j - x_i)
        counts = torch.zeros(self.shard.num_local, dtype=diff.dtype, device=diff.device)
        counts.index_add_(0, local_y, owned.to(diff.dtype))
        self.centres.sub_(delta * (self.alpha / (1.0 + counts))[:, None])

    def extra_repr(self) -> str:
        s = self.shard
        return (f"num_classes={s.num_classes}, shard=[{s.start}, {s.end}) of world {s.world_size}, "
                f"embedding_size={self.embedding_size}, loss_weight={self.loss_weight}, "
                f"alpha={self.alpha}, update={self.update!r}")
