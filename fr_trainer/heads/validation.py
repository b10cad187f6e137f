"""Input checks of the head, agreed on by every rank before any data collective.

Each rank checks its own inputs and all ranks exchange a small fixed-size report. If any
rank found a problem, every rank raises the same `ValueError` (naming the rank, the
offending values and the fix) instead of entering a collective that would hang.

Host syncs: exactly one per call. The shape and dtype checks read only metadata; the label
range is checked on the labels' device (a count and the first offending values, found by
a stable sort rather than `nonzero`, so nothing is sized on the host), written into the
report on the device, and the report (all-gathered over the ranks, which the batch-size
agreement needs anyway) is read on the host once. That read is the head's one sync per
step (`fr_trainer.heads.margin_softmax` makes none).
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
                  embedding_size: int) -> tuple[int, str]:
    """(code, message) for this rank's shapes and dtypes (metadata only: no sync); code 0
    when fine. The label range is checked on the device by `label_report`."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 \
            or not embeddings.is_floating_point() or embeddings.shape[1] != embedding_size:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
        dtype = getattr(embeddings, "dtype", None)
        return BAD_EMBEDDINGS, (
            f"embeddings must be a floating tensor [B, {embedding_size}], got shape {shape} "
            f"dtype {dtype}; pass the backbone output (embedding_size={embedding_size})")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64 \
            or labels.shape[0] != embeddings.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        dtype = getattr(labels, "dtype", None)
        return BAD_LABELS, (
            f"labels must be an int64 tensor [B] with B={embeddings.shape[0]} (one per "
            f"embedding), got shape {shape} dtype {dtype}; use labels.long()")
    return OK, ""


def label_report(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On the labels' device, without a sync: (count of labels outside [0, num_classes) [],
    the first MAX_REPORTED of them in batch order, 0-padded [MAX_REPORTED])."""
    bad = (labels < 0) | (labels >= num_classes)
    count = bad.sum()
    order = torch.sort(bad.logical_not().to(torch.uint8), stable=True).indices[:MAX_REPORTED]
    values = labels.new_zeros(MAX_REPORTED)
    shown = torch.arange(order.numel(), device=labels.device) < count
    values[: order.numel()] = torch.where(shown, labels.index_select(0, order), torch.zeros_like(order))
    return count, values


def _report(embeddings: torch.Tensor, labels: torch.Tensor, code: int, num_classes: int,
            device: torch.device) -> torch.Tensor:
    """[batch, dim, code, count, values...] on `device`, filled without a host read (the
    host-known numbers are written by fills, not copied from a host tensor)."""
    batch = embeddings.shape[0] if isinstance(embeddings, torch.Tensor) and embeddings.dim() else -1
    dim = embeddings.shape[1] if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 else -1
    row = torch.zeros(_REPORT_SIZE, dtype=torch.int64, device=device)
    for i, value in enumerate((batch, dim, code)):
        row[i : i + 1].fill_(value)  # (`row[i] = value` copies a host tensor in: a sync on CUDA)
    if code == OK:
        count, values = label_report(labels, num_classes)
        row[2] = torch.where(count > 0, LABEL_RANGE, OK).to(device)
        row[3] = count.to(device)
        row[4:] = values.to(device)
    return row


def check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 embedding_size: int, group: ProcessGroup | None, device: torch.device) -> None:
    """Raise ValueError on every rank if any rank's inputs are bad or batch sizes differ."""
    code, message = local_problem(embeddings, labels, num_classes, embedding_size)
    if not is_distributed(group):
        if code != OK:
            raise ValueError(message)
        row = _report(embeddings, labels, code, num_classes, device).tolist()  # the one sync
        if row[2] != OK:
            count, values = row[3], row[4 : 4 + min(row[3], MAX_REPORTED)]
            raise ValueError(f"{_label_problem(count, values, num_classes)}; check the dataset's labels "
                             f"or num_classes")
        return
    reports = all_gather_tensor(_report(embeddings, labels, code, num_classes, device)[None], group)
    reports = reports.tolist()  # the one sync
    me = dist.get_rank(group)
    problems = [_describe(rank, row, num_classes) for rank, row in enumerate(reports) if row[2] != OK]
    if problems:
        own = f" (this rank: {message})" if code != OK else ""
        fix = "; check the dataset's labels or num_classes" if any(r[2] == LABEL_RANGE for r in reports) else ""
        raise ValueError("PartialFC inputs rejected on every rank before any collective: "
                         + "; ".join(problems) + own + fix)
    batches = {row[0] for row in reports}
    if len(batches) > 1:
        sizes = {rank: row[0] for rank, row in enumerate(reports)}
        raise ValueError(
            f"every rank must pass the same batch size to PartialFC, got {sizes} (rank {me} "
            f"is this one); drop the last incomplete batch (drop_last=True)")


def _label_problem(count: int, values: list[int], num_classes: int) -> str:
    more = " ..." if count > MAX_REPORTED else ""
    return f"{count} label(s) outside [0, {num_classes}): {values}{more}"


def _describe(rank: int, row: list[int], num_classes: int) -> str:
    code, count, values = row[2], row[3], row[4 : 4 + min(row[3], MAX_REPORTED)]
    if code == LABEL_RANGE:
        return f"rank {rank} has {_label_problem(count, values, num_classes)}"
    if code == BAD_EMBEDDINGS:
        return f"rank {rank} passed embeddings of the wrong shape or dtype (got [B, D] = [{row[0]}, {row[1]}])"
    return f"rank {rank} passed labels that are not int64 [B] matching its embeddings"
