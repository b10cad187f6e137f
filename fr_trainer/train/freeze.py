"""Fine-tuning: the backbone frozen for the first `model.freeze_steps` optimizer steps.

While frozen (steps 0 .. freeze_steps-1 of the run, counted across resumes):

- the backbone's BatchNorm layers run in eval mode (the running statistics of the
  pretrained model are used and not updated; dropout is off);
- the backbone's gradients are dropped (set to None) before clipping and the optimizer
  step, so SGD/AdamW leave its weights, momentum and weight decay untouched: the weights
  stay bit for bit those of the pretrained model, and the momentum starts from zero at
  the unfreeze. The head (and a regularizer) trains as usual.

The backward pass still runs through the backbone (DDP expects a gradient for every
parameter it wraps each step), so a frozen step costs what a normal one does.

After `freeze_steps` the backbone trains with `optim.backbone_lr_scale` x the scheduled LR
(the optimizer's backbone param group carries it as `lr_scale`).
"""

from __future__ import annotations

from torch import nn


class BackboneFreeze:
    def __init__(self, backbone: nn.Module, freeze_steps: int) -> None:
        self.backbone, self.freeze_steps = backbone, freeze_steps

    def frozen(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based: the number of steps already taken) is frozen."""
        return step < self.freeze_steps

    def begin_step(self, step: int) -> bool:
        """Put the backbone in eval mode while frozen (train mode otherwise); returns `frozen(step)`."""
        frozen = self.frozen(step)
        if self.freeze_steps:
            self.backbone.train(not frozen)
        return frozen

    def drop_grads(self) -> None:
        for param in self.backbone.parameters():
            param.grad = None
