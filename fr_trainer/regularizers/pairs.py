"""Pair-based regularizers over the all-gathered batch: pair-wise Circle loss (Sun et al.
2020) and the triplet ranking loss (Taha et al. 2020) with batch-hard or semi-hard mining.

Each rank gathers the global batch (embeddings with autograd, labels), takes its own B rows
as anchors against all G rows ([B, G] similarities, never [G, G] on one rank), sums its
anchors' losses and joins the sums and counts with one all-reduce of two floats. The loss
is the same scalar on every rank; each rank back-propagates its anchors' part and the
all-gather's backward sums the parts of every row, so the gradients are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import rank_and_world_size
from fr_trainer.regularizers._gather import ANY_LABEL, gather_batch, join_sum

MINING = ("batch_hard", "semi_hard")


def _anchor_masks(y: torch.Tensor, rank: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor rows of this rank [B], positives [B, G] (same label, not itself), negatives [B, G])."""
    rows = torch.arange(rank * batch, (rank + 1) * batch, device=y.device)
    same = y.index_select(0, rows)[:, None] == y[None, :]
    itself = rows[:, None] == torch.arange(y.shape[0], device=y.device)[None, :]
    return rows, same & ~itself, ~same


def _anchor_rows(valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` [B, G] with the rows of anchors that take no part set to 0: finite, so that
    their (masked out) losses and the zero gradients through them stay free of NaN (a row
    of -inf has a NaN logsumexp gradient)."""
    return torch.where(valid[:, None], values, 0.0)


class CirclePairLoss(nn.Module):
    """Pair-wise Circle loss. Per anchor (cosine similarities s to the other rows):

        L = softplus(logsumexp_n gamma a_n (s_n - d_n) + logsumexp_p -gamma a_p (s_p - d_p))

    a_p = max(0, 1 + m - s_p), a_n = max(0, s_n + m) (detached, as in the paper),
    d_p = 1 - m, d_n = m. Anchors without a positive or without a negative in the global
    batch contribute nothing; the loss is the mean over the anchors that have both (0 when
    none has). Defaults gamma = 80, m = 0.4 (the paper's pair-wise setting for retrieval).
    Call: `loss(local_embeddings [B, D], local_labels [B] int64) -> scalar`.
    """

    def __init__(self, gamma: float = 80.0, m: float = 0.4, process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got gamma={gamma}")
        if not 0.0 <= m < 1.0:
            raise ValueError(f"m must lie in [0, 1), got m={m}")
        self.gamma, self.m, self.process_group = float(gamma), float(m), process_group

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        group = self.process_group
        x, y = gather_batch(embeddings, labels, ANY_LABEL, group)
        rank, _ = rank_and_world_size(group)
        rows, pos, neg = _anchor_masks(y, rank, embeddings.shape[0])
        xn = F.normalize(x, dim=1)
        valid = pos.any(1) & neg.any(1)  # (masked, not selected: no data-sized tensor, no host sync)
        sim = xn.index_select(0, rows) @ xn.t()  # [B, G]
        detached = sim.detach()
        a_p = (1.0 + self.m - detached).clamp_min(0.0)
        a_n = (detached + self.m).clamp_min(0.0)
        z_p = _anchor_rows(valid, torch.where(pos, -self.gamma * a_p * (sim - (1.0 - self.m)), float("-inf")))
        z_n = _anchor_rows(valid, torch.where(neg, self.gamma * a_n * (sim - self.m), float("-inf")))
        per_anchor = F.softplus(torch.logsumexp(z_n, dim=1) + torch.logsumexp(z_p, dim=1))
        total, count = join_sum(torch.where(valid, per_anchor, 0.0).sum(), valid.sum(), group)
        return total / count.clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, m={self.m}"


class TripletLoss(nn.Module):
    """Triplet ranking loss on squared Euclidean distances (of L2-normalised embeddings
    unless `normalize=False`), margin 0.2.

    mining="batch_hard": per anchor with a positive and a negative in the global batch,
        max(0, max_p d_ap - min_n d_an + margin); the mean over those anchors.
    mining="semi_hard": per (anchor, positive) pair whose anchor has a negative, the
        negative is the closest one with d_ap < d_an < d_ap + margin; when none exists,
        the hardest negative (min d_an); loss max(0, d_ap - d_an + margin); the mean over
        those pairs.
    The selection (argmax / argmin / band) carries no gradient; the distances it selects
    do. Call: `loss(local_embeddings [B, D], local_labels [B] int64) -> scalar`.
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard", normalize: bool = True,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"mining={mining!r} is not one of {MINING}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got margin={margin}")
        self.margin, self.mining, self.normalize = float(margin), mining, bool(normalize)
        self.process_group = process_group

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        group = self.process_group
        x, y = gather_batch(embeddings, labels, ANY_LABEL, group)
        if self.normalize:
            x = F.normalize(x, dim=1)
        rank, _ = rank_and_world_size(group)
        rows, pos, neg = _anchor_masks(y, rank, embeddings.shape[0])
        anchors = x.index_select(0, rows)
        dist = (anchors.square().sum(1, keepdim=True) + x.square().sum(1)[None, :]
                - 2.0 * anchors @ x.t()).clamp_min(0.0)  # [B, G]
        # the losses of the anchors (batch_hard) or (anchor, positive) pairs (semi_hard) that
        # take part, masked rather than selected: no data-sized tensor, so no host sync
        if self.mining == "batch_hard":
            losses, taking_part = self._batch_hard(dist, pos, neg)
        else:
            losses, taking_part = self._semi_hard(dist, pos, neg)
        total, count = join_sum(torch.where(taking_part, losses, 0.0).sum(), taking_part.sum(), group)
        return total / count.clamp_min(1.0)

    def _batch_hard(self, dist: torch.Tensor, pos: torch.Tensor,
                    neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = pos.any(1) & neg.any(1)
        inf = float("inf")
        hardest_p = _anchor_rows(valid, torch.where(pos, dist, -inf)).amax(1)
        hardest_n = _anchor_rows(valid, torch.where(neg, dist, inf)).amin(1)
        return (hardest_p - hardest_n + self.margin).clamp_min(0.0), valid

    def _semi_hard(self, dist: torch.Tensor, pos: torch.Tensor,
                   neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = neg.any(1)
        inf = float("inf")
        sorted_n, _ = torch.sort(_anchor_rows(valid, torch.where(neg, dist, inf)), dim=1)  # [B, G], +inf padded
        # first negative strictly farther than each positive (d_an > d_ap)
        first = torch.searchsorted(sorted_n.detach().contiguous(), dist.detach().contiguous(), right=True)
        candidate = sorted_n.gather(1, first.clamp_max(sorted_n.shape[1] - 1))
        in_band = (first < sorted_n.shape[1]) & (candidate.detach() < dist.detach() + self.margin)
        chosen = torch.where(in_band, candidate, sorted_n[:, :1].expand_as(candidate))
        losses = (dist - chosen + self.margin).clamp_min(0.0)
        return losses, pos & valid[:, None]

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, normalize={self.normalize}"
