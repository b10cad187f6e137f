"""Parameter and multiply-accumulate counts (shapes only: runs on the meta device)."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 112, 112)) -> int:
    """Multiply-accumulates per image of Conv2d and Linear layers (input `input_size`), plus
    what modules declare through a `count_extra_macs(inputs, output) -> int` method (the
    attention products of the ViTs, which are functions, not modules).

    This is the figure papers call "FLOPs" or "MAdds" for face backbones (BN, PReLU and
    additions are not counted). The model is copied to the meta device, so it is cheap.
    """
    meta = _to_meta(model)
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            total += output.numel() * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        if hasattr(module, "count_extra_macs"):
            total += int(module.count_extra_macs(inputs, output))

    handles = [m.register_forward_hook(hook) for m in meta.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "count_extra_macs")]
    try:
        meta.eval()
        with torch.no_grad():
            meta(torch.empty(input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total // input_size[0]


def _to_meta(model: nn.Module) -> nn.Module:
    import copy

    if all(p.is_meta for p in model.parameters()):
        return model
    clone = copy.deepcopy(model)  # small models only; for big ones build on meta directly
    return clone.to("meta")
