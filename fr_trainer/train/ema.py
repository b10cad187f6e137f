"""An exponential moving average of the backbone weights (`model.ema_decay`, 0 = off).

After every optimizer step that is actually taken (not a step skipped for a non-finite
loss, nor one the fp16 GradScaler skipped for inf/NaN gradients):

    ema_param  = d * ema_param + (1 - d) * param       for every parameter
    ema_buffer = buffer                                 (BatchNorm running statistics, copied)

with d = `model.ema_decay`, or, with `model.ema_warmup = true`, d_n = min(decay,
(1 + n) / (10 + n)) where n is the number of updates made before this one (the average
follows the weights closely at first, when the early weights are far from the final ones).

The average is of the backbone only (the module DDP and DeepSpeed wrap: the trainer passes
the unwrapped `Trainer.backbone`, whose weights are replicated on every rank), so every
rank holds the same average; the trainer broadcasts rank 0's buffers with the backbone's
(`Trainer.sync_buffers`) and rank 0 saves it in the checkpoint's common part, next to the
backbone (key "ema": {"backbone": state_dict, "updates": n, "decay": d}). It therefore
resumes at any world size with the backbone and is covered by the manifest and finiteness
checks like every other tensor of common.pt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fr_trainer.train.checkpoint_io import CheckpointError
from fr_trainer.train.foreach import by_device_and_dtype, copy_all_, scale_

WARMUP_OFFSET = 10  # d_n = min(decay, (1 + n) / (10 + n))


class EmaError(ValueError):
    """A saved average that does not fit this backbone."""


def warmed_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number `updates` (0-based)."""
    if not warmup:
        return decay
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class BackboneEMA:
    """The moving average, held in `self.module` (a copy of the backbone, eval mode, no
    gradients, same device and dtype)."""

    def __init__(self, module: nn.Module, source: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        param = next(source.parameters(), None)
        if param is not None:
            module = module.to(param.device, param.dtype)
        module.load_state_dict(source.state_dict())
        module.eval().requires_grad_(False)
        self.module = module

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """One step of the average towards `source`'s current weights."""
        d = warmed_decay(self.decay, self.updates, self.warmup)
        averages = list(self.module.parameters())
        params = list(source.parameters())
        if len(averages) != len(params):
            raise EmaError(f"the EMA holds {len(averages)} parameters, the backbone {len(params)}")
        for group, values in by_device_and_dtype(averages, params, cpu_runs=True):
            scale_(group, d)
            torch._foreach_add_(group, values, alpha=1.0 - d)
        self.copy_buffers(source)
        self.updates += 1

    @torch.no_grad()
    def copy_buffers(self, source: nn.Module) -> None:
        averages, buffers = list(self.module.buffers()), list(source.buffers())
        if len(averages) != len(buffers):
            raise EmaError(f"the EMA holds {len(averages)} buffers, the backbone {len(buffers)}")
        copy_all_(averages, buffers)

    def buffers(self) -> list[torch.Tensor]:
        return list(self.module.buffers())

    def state_dict(self) -> dict:
        return {"backbone": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.module.load_state_dict(state["backbone"])
        except (KeyError, RuntimeError) as error:
            raise EmaError(f"the saved EMA does not fit the backbone ({' '.join(str(error).split())[:200]})") from None
        self.updates = int(state.get("updates", 0))


def build_ema(
    decay: float, warmup: bool, source: nn.Module, fresh: Callable[[], nn.Module]
) -> BackboneEMA | None:
    """The average of `source` (a fresh module from `fresh()` holds it), or None when
    decay is 0. A fresh module, not a deepcopy: `source` may be compiled in place."""
    if decay == 0.0:
        return None
    return BackboneEMA(fresh(), source, decay, warmup)


def scaler_step_taken(scale_before: float, scale_after: float) -> bool:
    """Whether a GradScaler step was taken: the scaler lowers its scale exactly when it
    found inf/NaN gradients and skipped the optimizer step."""
    return scale_after >= scale_before


def resume_ema(ema: BackboneEMA | None, saved: dict | None, backbone: nn.Module, folder) -> list[str]:
    """Restore the average from a checkpoint's "ema" entry (after the backbone is loaded);
    returns notes for the resume log. A run that turns the EMA on at a resume starts it
    from the resumed weights; one that turns it off drops the saved average."""
    if ema is None:
        return [f"{folder} holds an EMA of the backbone; model.ema_decay = 0 drops it"] if saved else []
    if not saved:
        ema.load_state_dict({"backbone": backbone.state_dict(), "updates": 0})
        return [f"{folder} has no EMA of the backbone: the average starts from the resumed weights"]
    try:
        ema.load_state_dict(saved)
    except EmaError as error:
        raise CheckpointError(f"{folder}: {error}; resume with the same model or set checkpoint.resume=never") from None
    notes = []
    if float(saved.get("decay", ema.decay)) != ema.decay:
        notes.append(f"model.ema_decay {saved['decay']} (checkpoint) -> {ema.decay} (config)")
    return notes
