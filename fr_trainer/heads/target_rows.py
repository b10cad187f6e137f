"""Adding the targets' rows to a piece of the centres' gradient (the backward's last term of
each piece: `margin_softmax._CentreGradRows`, `bf16_exponentials.backward_`)."""

from __future__ import annotations

import torch


def add_target_rows_(out: torch.Tensor, a: int, b: int, whole: bool, cols: torch.Tensor,
                     values: torch.Tensor) -> None:
    """out, the rows [a, b) of a block's centre gradient, += values [G, D] at the block
    columns `cols` [G] that fall in [a, b) (`whole`: the piece is the block, every column)."""
    if whole:
        out.index_add_(0, cols, values)
        return
    inside = (cols >= a) & (cols < b)
    out.index_add_(0, (cols - a).clamp_(0, b - a - 1), torch.where(inside[:, None], values, 0.0))
