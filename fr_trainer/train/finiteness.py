"""Keeping NaN/inf out of checkpoints, resumes and skipped steps.

- `nonfinite_entries(state)` names the floating tensors of a (nested) state -- state dicts,
  optimizer state, a checkpoint's common or shard part -- that hold NaN or inf.
  `checkpoint.save_checkpoint` refuses to write such a state (every rank agrees; the error
  names the tensors) and the trainer turns that into `NonFiniteLoss` (exit status 3 from
  `fr-trainer train`); `Trainer.load` refuses a non-finite checkpoint and the resume falls
  back to the newest finite one.
- `BufferSnapshot` is what makes `train.nonfinite=skip` leave a skipped step without
  effect: the forward passes of the skipped micro-steps have already moved BatchNorm's
  running statistics (and num_batches_tracked); restoring the snapshot taken before them
  puts every buffer back bit for bit.
- `NonFiniteSteps` is the `train.nonfinite` policy for a step whose loss is NaN/inf: it
  counts such steps in a row and says whether to stop (the trainer raises `NonFiniteLoss`
  with its message) or to skip the step (the trainer logs the message).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fr_trainer.train.config import TrainConfig
from fr_trainer.train.foreach import copy_all_


class NonFiniteState(RuntimeError):
    """Weights, buffers or optimizer state hold NaN/inf; not saved."""


def _is_checked(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """'name (k of n non-finite)' for each floating tensor in `state` (dicts, lists and
    tuples are walked; keys joined with '.') that holds NaN or inf."""
    found: list[str] = []
    if _is_checked(state):
        if state.numel() and not bool(torch.isfinite(state).all()):
            bad = int((~torch.isfinite(state)).sum())
            found.append(f"{prefix or 'tensor'} ({bad} of {state.numel()} non-finite)")
    elif isinstance(state, dict):
        for key, value in state.items():
            found += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            found += nonfinite_entries(value, f"{prefix}[{index}]")
    return found


def describe(entries: list[str], most: int = 4) -> str:
    """The first few entries and how many there are in all."""
    more = f", ... ({len(entries)} tensors in all)" if len(entries) > most else ""
    return ", ".join(entries[:most]) + more


class BufferSnapshot:
    """Copies of the buffers of `modules` (BatchNorm running_mean/var, num_batches_tracked,
    a margin's state, ...): `take()` copies them (into the same tensors every step, one op
    per (device, dtype) group after the first), `restore()` copies them back in place."""

    def __init__(self, modules: Iterable[nn.Module | None]) -> None:
        self._modules = [m for m in modules if m is not None]
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def _current(self) -> list[torch.Tensor]:
        seen: set[int] = set()
        found = []
        for module in self._modules:
            for buffer in module.buffers():
                if id(buffer) not in seen:
                    seen.add(id(buffer))
                    found.append(buffer)
        return found

    @torch.no_grad()
    def take(self) -> BufferSnapshot:
        buffers = self._current()
        if len(buffers) == len(self._buffers) and all(a is b for a, b in zip(buffers, self._buffers)):
            copy_all_(self._saved, buffers)
        else:  # (first use, or a module replaced a buffer)
            self._buffers, self._saved = buffers, [b.detach().clone() for b in buffers]
        return self

    @torch.no_grad()
    def restore(self) -> None:
        copy_all_(self._buffers, self._saved)


class NonFiniteSteps:
    """`train.nonfinite` (read from `train` at each step): "stop" stops at the first step
    whose loss is NaN/inf; "skip" skips such steps until more than
    `train.max_nonfinite_skips` come in a row."""

    def __init__(self, train: TrainConfig) -> None:
        self.train = train
        self.in_a_row = 0

    def finite(self) -> None:
        """A step with a finite loss: the run of non-finite ones is over."""
        self.in_a_row = 0

    def nonfinite(self, step: int, loss: float) -> tuple[bool, str]:
        """Count optimizer step `step` (1-based), whose loss is `loss`; returns whether to
        stop and the message (the error's when stopping, else the line that logs the skip)."""
        t = self.train
        self.in_a_row += 1
        where = f"step {step}: loss is {loss}"
        if t.nonfinite == "stop":
            return True, (
                f"{where}; stopping (train.nonfinite=stop). Lower optim.lr, enable "
                "optim.clip_grad_norm, or set train.nonfinite=skip"
            )
        if self.in_a_row > t.max_nonfinite_skips:
            return True, (
                f"{where}; {self.in_a_row} non-finite steps in a row "
                f"(train.max_nonfinite_skips={t.max_nonfinite_skips}); stopping"
            )
        return False, f"{where}; step skipped (train.nonfinite=skip, {self.in_a_row} in a row)"
