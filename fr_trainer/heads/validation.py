"""Input checks of the head, agreed on by every rank before any data collective.

Each rank checks its own inputs and all ranks exchange a small fixed-size report. If any
rank found a problem, every rank raises the same `ValueError` (naming the rank, the
offending values and the fix) instead of entering a collective that would hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import all_gather_tensor, is_distributed

OK, BAD_EMBEDDINGS, BAD_LABELS, LABEL_RANGE = 0, 1, 2, 3
MAX_REPORTED = 5
_REPORT_SIZE = 4 + MAX_REPORTED  # batch, dim, code, count, values...


def local_problem(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  embedding_size: int) -> tuple[int, str, list[int]]:
    """(code, message, offending values) for this rank's inputs; code 0 when fine."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 \
            or not embeddings.is_floating_point() or embeddings.shape[1] != embedding_size:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
        dtype = getattr(embeddings, "dtype", None)
        return BAD_EMBEDDINGS, (
            f"embeddings must be a floating tensor [B, {embedding_size}], got shape {shape} "
            f"dtype {dtype}; pass the backbone output (embedding_size={embedding_size})"), []
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64 \
            or labels.shape[0] != embeddings.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        dtype = getattr(labels, "dtype", None)
        return BAD_LABELS, (
            f"labels must be an int64 tensor [B] with B={embeddings.shape[0]} (one per "
            f"embedding), got shape {shape} dtype {dtype}; use labels.long()"), []
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        values = bad[:MAX_REPORTED].tolist()
        return LABEL_RANGE, (
            f"{bad.numel()} label(s) outside [0, {num_classes}): {values}"
            f"{' ...' if bad.numel() > MAX_REPORTED else ''}; check the dataset's labels "
            f"or num_classes"), values
    return OK, "", []


def _report(embeddings: torch.Tensor, code: int, count: int, values: list[int],
            device: torch.device) -> torch.Tensor:
    batch = embeddings.shape[0] if isinstance(embeddings, torch.Tensor) and embeddings.dim() else -1
    dim = embeddings.shape[1] if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 else -1
    row = [batch, dim, code, count] + (values + [0] * MAX_REPORTED)[:MAX_REPORTED]
    return torch.tensor(row, dtype=torch.int64, device=device)


def check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 embedding_size: int, group: ProcessGroup | None, device: torch.device) -> None:
    """Raise ValueError on every rank if any rank's inputs are bad or batch sizes differ."""
    code, message, values = local_problem(embeddings, labels, num_classes, embedding_size)
    if not is_distributed(group):
        if code != OK:
            raise ValueError(message)
        return
    count = 0
    if code == LABEL_RANGE:
        count = int(((labels < 0) | (labels >= num_classes)).sum())
    reports = all_gather_tensor(_report(embeddings, code, count, values, device)[None], group)
    reports = reports.cpu().tolist()
    me = dist.get_rank(group)
    problems = [_describe(rank, row, num_classes) for rank, row in enumerate(reports) if row[2] != OK]
    if problems:
        own = f" (this rank: {message})" if code != OK else ""
        raise ValueError("PartialFC inputs rejected on every rank before any collective: "
                         + "; ".join(problems) + own)
    batches = {row[0] for row in reports}
    if len(batches) > 1:
        sizes = {rank: row[0] for rank, row in enumerate(reports)}
        raise ValueError(
            f"every rank must pass the same batch size to PartialFC, got {sizes} (rank {me} "
            f"is this one); drop the last incomplete batch (drop_last=True)")


def _describe(rank: int, row: list[int], num_classes: int) -> str:
    code, count, values = row[2], row[3], row[4 : 4 + min(row[3], MAX_REPORTED)]
    if code == LABEL_RANGE:
        return f"rank {rank} has {count} label(s) outside [0, {num_classes}): {values}"
    if code == BAD_EMBEDDINGS:
        return f"rank {rank} passed embeddings of the wrong shape or dtype (got [B, D] = [{row[0]}, {row[1]}])"
    return f"rank {rank} passed labels that are not int64 [B] matching its embeddings"
