"""Learning-rate schedule by optimizer steps: linear warmup, then polynomial decay.

lr(step) = base * (step + 1) / warmup                      for step < warmup
         = base * (1 - (step - warmup) / (total - warmup)) ** power   afterwards
(`step` counts optimizer steps from 0; the schedule's only state is that count.)
"""

from __future__ import annotations

import torch


def poly_lr(
    step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, power: float = 2.0
) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (1.0 - progress) ** power


class PolySchedule:
    """Sets every param group's lr before each optimizer step (base lr scaled per group
    by its optional `lr_scale`)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        power: float = 2.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.optimizer, self.base_lr = optimizer, base_lr
        self.total_steps, self.warmup_steps, self.power = total_steps, warmup_steps, power
        self.step_count = 0

    def lr(self, step: int | None = None) -> float:
        step = self.step_count if step is None else step
        return poly_lr(step, self.base_lr, self.total_steps, self.warmup_steps, self.power)

    def apply(self) -> float:
        """Set the lr of the coming optimizer step; returns it."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "power": self.power,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
