"""When the trainer reads a step's results on the host (`train.host_reads`).

Each optimizer step ends with one row on the device: [the loss summed over its
micro-batches, a loss was non-finite on some rank, a stop was asked on some rank] (the
flags all-reduced with MAX, so every rank reads the same). Reading it is a host sync: on a
GPU the host waits there for the whole step, and the device then waits for the host to
queue the next one.

- "every_step": the row is read at the end of its step (the non-finite policy decides
  before the optimizer steps; a stop is agreed at once). `train.nonfinite = "skip"` needs
  it: a skipped step must be known before its optimizer step.
- "when_logging": the rows wait on the device and are read together at the steps that log
  (every `log.every_steps`), and before any checkpoint, verification or the end of the run.
  A non-finite loss (`train.nonfinite = "stop"`) then stops the run at that read, naming the
  step it came from; the steps since were taken but are never saved (a save always reads
  first). A stop signal is acted on at the read after it.
- "auto": "when_logging" on CUDA with `train.nonfinite = "stop"`, else "every_step" (on a
  CPU a read costs nothing).

The head's input check is the step's other host read (fr_trainer/heads/validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def resolve_host_reads(choice: str, device_type: str, nonfinite: str) -> str:
    """"every_step" or "when_logging" for `train.host_reads = choice`."""
    if choice == "auto":
        return "when_logging" if device_type == "cuda" and nonfinite == "stop" else "every_step"
    return choice


@dataclass(frozen=True)
class StepRecord:
    step: int  # the optimizer step (1-based) the row belongs to
    loss: float  # its loss: the mean over its micro-batches
    nonfinite: bool  # a loss was NaN/inf on some rank
    stop: bool  # a stop was asked on some rank


class StepReads:
    """The rows of the steps not read yet, and their one read."""

    def __init__(self, mode: str, accumulate: int) -> None:
        if mode not in ("every_step", "when_logging"):
            raise ValueError(f"host reads {mode!r}: resolve it first (resolve_host_reads)")
        self.mode, self.accumulate = mode, accumulate
        self._pending: list[tuple[int, torch.Tensor]] = []
        self.reads = 0  # host reads made (tests, the log)

    @property
    def deferred(self) -> bool:
        return self.mode == "when_logging"

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, step: int, loss_sum: torch.Tensor, flags: torch.Tensor) -> None:
        """Step `step`'s loss sum [] and agreed flags [non-finite, stop], on the device."""
        self._pending.append((step, torch.cat([loss_sum.detach().float().reshape(1), flags.float()])))

    def read(self) -> list[StepRecord]:
        """Every pending row, in step order, in one host read (none when nothing waits)."""
        if not self._pending:
            return []
        steps = [step for step, _ in self._pending]
        pending = [row for _, row in self._pending]  # (one row: a view, not a stacking op every step)
        rows = (torch.stack(pending) if len(pending) > 1 else pending[0][None]).tolist()  # the host read
        self._pending.clear()
        self.reads += 1
        return [StepRecord(step, loss / self.accumulate, nonfinite > 0, stop > 0)
                for step, (loss, nonfinite, stop) in zip(steps, rows)]
