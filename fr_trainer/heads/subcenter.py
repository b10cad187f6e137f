"""The Sub-center ArcFace head path (`margin.subcenters = k > 1`).

Centres are [C_local, k, D]: the k sub-centres of a class are one row of every
class-sharded tensor, so initialisation (`init_centres` with k D columns), checkpoints and
resharding keep them together on the shard that owns the class with no special case.
The class cosine is the max over its sub-centres; the margin (ArcFace) is then applied as
in the fused head: target `margin.target` (its value, and its derivative as a straight
line through the cosine, so `gradient="straight_through"` works), non-targets `s cos`,
non-target cosines above the inter-class filtering threshold counted as 0.

This is the plain path, the reference the head's fused one
(`fr_trainer.heads.subcenter_fused`, used by `PartialFC`) is tested against: the
[G, C_local k] cosines are built by autograd (no row blocking, no 16-bit buffer; a
`compute_dtype` is not used here) and joined across shards by `ShardedCrossEntropy`, the
same log-space join as the fused head (all-reduce MAX of the
row maxima, all-reduce SUM of [sum-exp, target logit]).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import all_reduce_
from fr_trainer.heads.margin_softmax import NORM_EPS
from fr_trainer.margins import Margin


class ShardedCrossEntropy(torch.autograd.Function):
    """Mean over the G rows of `logsumexp_j z_ij - z_{i y_i}` of logits sharded by columns.

    Inputs: logits [G, C_local] (this rank's classes), targets [G] (the column of the row's
    class, -1 where another rank owns it), process group. Returns the same scalar on every
    rank; the gradient is (softmax - onehot) / G on this rank's columns."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        owned, cols = targets >= 0, targets.clamp_min(0)  # a mask, not a list: no host sync
        row_max = all_reduce_(logits.amax(dim=1), dist.ReduceOp.MAX, group)
        sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
        at_target = logits.gather(1, cols[:, None]).squeeze(1)
        z_owned = torch.where(owned, at_target, torch.zeros_like(at_target))
        joined = all_reduce_(torch.stack([sum_exp, z_owned]), dist.ReduceOp.SUM, group)
        log_sum_exp = row_max + torch.log(joined[0])
        ctx.save_for_backward(logits, log_sum_exp, owned, cols)
        return (log_sum_exp - joined[1]).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, log_sum_exp, owned, cols = ctx.saved_tensors
        grad = torch.exp(logits - log_sum_exp[:, None])
        grad.scatter_add_(1, cols[:, None], -owned.to(grad.dtype)[:, None])
        return grad.mul_(grad_loss / logits.shape[0]), None, None


def check_subcenter_margin(margin: Margin) -> None:
    """The sub-centre head applies margins whose non-target logits are `s cos` only."""
    if not (margin.linear_nontarget and not margin.needs_global_target and not margin.needs_norms):
        raise ValueError(f"the sub-centre head supports margins with s cos non-targets only, not {margin!r}")


def class_cosines(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos_ij = max over the k sub-centres of class j [G, C_local], from x [G, D] and
    weight [C_local, k, D] (differentiable: the gradient goes to the maximising sub-centre)."""
    num_classes, k, dim = weight.shape
    xh = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
    wh = weight / torch.linalg.vector_norm(weight, dim=2, keepdim=True).clamp_min(NORM_EPS)
    return (xh @ wh.reshape(num_classes * k, dim).t()).view(x.shape[0], num_classes, k).amax(dim=2)


def subcenter_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, margin: Margin,
                   group: ProcessGroup | None, threshold: float = 0.0) -> torch.Tensor:
    """The sharded loss of a sub-centre margin: x [G, D] gathered embeddings, weight
    [C_local, k, D], targets [G] (local column or -1), the filtering threshold (0: off)."""
    check_subcenter_margin(margin)
    cos = class_cosines(x, weight)
    owned, cols = targets >= 0, targets.clamp_min(0)
    is_target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, cols[:, None], owned[:, None])
    if threshold > 0:
        cos = cos.masked_fill((cos.detach() > threshold) & ~is_target, 0.0)
    cos_t = cos.gather(1, cols[:, None]).squeeze(1)
    value, slope = margin.target(cos_t.detach())
    z_t = value + slope * (cos_t - cos_t.detach())
    logits = torch.where(is_target, z_t[:, None], margin.scale * cos)
    return ShardedCrossEntropy.apply(logits, targets, group)
