"""The gather shared by the regularizers and the 'same scalar on every rank' join."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import all_gather_tensor, all_gather_with_grad, all_reduce_
from fr_trainer.heads.validation import check_inputs

# labels of the pair losses are any non-negative ids (no class count is known)
ANY_LABEL = 1 << 62


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs on every rank (raising on all of them), then all-gather
    embeddings [B, D] (with autograd) and labels [B] -> [G, D], [G]."""
    dim = embeddings.shape[-1] if isinstance(embeddings, torch.Tensor) and embeddings.dim() else -1
    check_inputs(embeddings, labels, num_classes, dim, group, embeddings.device)
    return all_gather_with_grad(embeddings, group), all_gather_tensor(labels, group)


def join_sum(local: torch.Tensor, count: torch.Tensor | float, group: ProcessGroup | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over ranks of the scalar `local`, sum over ranks of `count`), the same on every
    rank; the first carries the gradient of this rank's own `local` term only (each rank
    back-propagates its part; `all_gather_with_grad` sums the parts of every row)."""
    if not isinstance(count, torch.Tensor):  # (a host number: a fill, not a host-to-device copy)
        count = local.new_full((), float(count))
    count = count.to(local.dtype)
    both = all_reduce_(torch.stack([local.detach(), count]), dist.ReduceOp.SUM, group)
    return local + (both[0] - local.detach()), both[1]
