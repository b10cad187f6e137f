"""Learning-rate schedule by samples seen: linear warmup, then polynomial decay.

The schedule belongs to the run, not to the world size: it is a function of the number of
samples the run has consumed (`seen`, counted before the coming optimizer step), with the
run's total and warmup fixed in samples when the run starts (`fr_trainer.train.run_plan`).
A resume at another world size or per-rank batch size therefore continues the same curve.

lr(seen) = base * (seen + G) / warmup                                   for seen < warmup
         = base * (1 - (seen - warmup) / (total - warmup)) ** power     afterwards
(G: the samples of the coming step. With a constant G, `seen = step * G` and this is exactly
the per-step form `poly_lr(step, ...)`: both are quotients of the same integers.)
"""

from __future__ import annotations

import torch


def poly_lr(
    step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, power: float = 2.0
) -> float:
    """The learning rate of optimizer step `step` (0-based), in steps of a constant size."""
    return poly_lr_by_samples(step, 1, base_lr, total_steps, warmup_steps, power)


def poly_lr_by_samples(
    seen: int,
    step_samples: int,
    base_lr: float,
    total_samples: int,
    warmup_samples: int = 0,
    power: float = 2.0,
) -> float:
    """The learning rate of the optimizer step that follows `seen` samples and consumes
    `step_samples` more."""
    if seen < warmup_samples:
        return base_lr * min(1.0, (seen + step_samples) / warmup_samples)
    span = max(1, total_samples - warmup_samples)
    progress = min(1.0, (seen - warmup_samples) / span)
    return base_lr * (1.0 - progress) ** power


class PolySchedule:
    """Sets every param group's lr before each optimizer step (base lr scaled per group
    by its optional `lr_scale`). Its only state is the number of samples seen."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        total_samples: int,
        warmup_samples: int = 0,
        power: float = 2.0,
        step_samples: int = 1,
    ) -> None:
        if total_samples < 1:
            raise ValueError(f"total_samples must be >= 1, got {total_samples}")
        if step_samples < 1:
            raise ValueError(f"step_samples must be >= 1, got {step_samples}")
        self.optimizer, self.base_lr = optimizer, base_lr
        self.total_samples, self.warmup_samples, self.power = total_samples, warmup_samples, power
        self.step_samples = step_samples
        self.samples_seen = 0

    def lr(self, seen: int | None = None) -> float:
        seen = self.samples_seen if seen is None else seen
        return poly_lr_by_samples(
            seen, self.step_samples, self.base_lr, self.total_samples, self.warmup_samples, self.power
        )

    def apply(self) -> float:
        """Set the lr of the coming optimizer step; returns it."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        """The coming step has consumed its `step_samples`."""
        self.samples_seen += self.step_samples

    @property
    def done(self) -> bool:
        return self.samples_seen >= self.total_samples

    def steps_left(self) -> int:
        return max(0, -(-(self.total_samples - self.samples_seen) // self.step_samples))

    def state_dict(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "base_lr": self.base_lr,
            "total_samples": self.total_samples,
            "warmup_samples": self.warmup_samples,
            "power": self.power,
            "step_samples": self.step_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the samples seen (the plan itself comes from `run_plan`)."""
        if "samples_seen" in state:
            self.samples_seen = int(state["samples_seen"])
        else:  # checkpoints before the schedule counted samples: steps of the saved size
            self.samples_seen = int(state["step_count"]) * int(state.get("step_samples", 1))
