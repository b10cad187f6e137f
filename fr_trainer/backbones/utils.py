"""Small model utilities that need no training loop."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact average over `batches`.

    Resets the running stats, runs the batches in training mode with a cumulative moving
    average (momentum=None), then restores each module's momentum and the model's mode.
    Useful to get a freshly initialised (or pruned) model into a sane eval-mode state,
    e.g. before an export parity check. Gradient checkpointing is not involved (no grad).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return model
