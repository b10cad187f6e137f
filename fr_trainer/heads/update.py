"""How the optimizer sees a sampled head's gradient (`head.update`).

`PartialFC` with `sample_rate < 1` returns a row-sparse gradient, and our optimizers then
update only the sampled rows: unsampled centres keep their weights and their optimizer
state bit-identical. arcface_torch instead hands a dense gradient (zeros in unsampled
rows) to torch's SGD, so momentum keeps moving and weight decay keeps shrinking every row
each step. `densify` reproduces that for the upstream recipes.
"""

from __future__ import annotations

from torch import nn


def densify(module: nn.Module) -> None:
    """Replace row-sparse gradients of `module`'s parameters by dense ones, in place."""
    for param in module.parameters():
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.to_dense()
