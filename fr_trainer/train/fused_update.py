"""`head.fused_update`: the head's centres stepped inside its backward, a piece at a time.

`PartialFC.update_in_backward` hands each piece's finished rows of the centres' gradient
(16,384 classes on a CPU, 65,536 on CUDA, within each `head.chunk_size` block when chunked)
to the optimizer's `update_rows`, so the whole [C_local, D] fp32 gradient never exists
(20 GB per GPU at 10M classes and D 512; `fr-trainer plan --fused-update` counts it). The
numbers are those of the unfused step, bit for bit (tests/test_head_fused_update.py).

The gradient is gone once the backward is over, so nothing that reads it afterwards can be
on: gradient accumulation, clipping that covers the head, fp16 loss scaling (its skipped
steps would be decided after the head has stepped) and `train.nonfinite = "skip"` (same).
The learning rate of the step is set before the backward (the trainer applies the schedule
before its micro-steps).
"""

from __future__ import annotations

from typing import Any

import torch

from fr_trainer.heads import PartialFC


def fused_update_problems(config: Any) -> list[str]:
    """What in `config` rules out `head.fused_update = true` (empty when it is off or fine)."""
    h, o, t = config.head, config.optim, config.train
    if not h.fused_update:
        return []
    why = "head.fused_update = true steps the centres inside the backward"
    problems = []
    if h.sample_rate < 1.0:
        problems.append(f"{why}; head.sample_rate = {h.sample_rate}: a sampled head's gradient already holds only "
                        "its sampled rows, set head.fused_update = false")
    if o.accumulate > 1:
        problems.append(f"{why}: optim.accumulate = {o.accumulate} needs the gradient summed over micro-batches; "
                        "set optim.accumulate = 1")
    if o.clip_grad_norm > 0 and o.clip_scope == "all":
        problems.append(f"{why}, before the global norm is known: set optim.clip_scope = \"backbone\" "
                        "(arcface_torch's) or optim.clip_grad_norm = 0")
    if t.precision == "fp16":
        problems.append(f"{why}, before fp16 loss scaling can decide to skip the step: use train.precision = "
                        "\"bf16\" (no loss scaling) or fp32")
    if t.nonfinite == "skip":
        problems.append(f"{why}, before a non-finite loss can be skipped: set train.nonfinite = \"stop\"")
    if config.engine.name == "deepspeed":
        problems.append(f"{why}: not supported with engine.name = \"deepspeed\"")
    if not config.regularizer.with_head:
        problems.append(f"{why}: regularizer.with_head = false trains no head")
    return problems


def attach_fused_update(head: PartialFC, optimizer: torch.optim.Optimizer, loss_scaling: bool) -> None:
    """Have `head` step its centres through `optimizer.update_rows` in its backward."""
    if loss_scaling:  # (train.precision = "auto" can resolve to fp16 on a GPU without bf16)
        raise ValueError("head.fused_update = true cannot run with fp16 loss scaling (the precision resolved to "
                         "fp16): set train.precision = \"bf16\" or \"fp32\"")
    weight = head.weight

    def update(start: int, end: int, grad_rows: torch.Tensor) -> None:
        optimizer.update_rows(weight, start, end, grad_rows)

    head.update_in_backward(update)
