"""Dense steps of fr_trainer's SGD/AdamW equal torch.optim's (the sparse rules are tested
with the head in test_head_sampling.py)."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.train.optim import SGD, AdamW

CASES = [
    (SGD, torch.optim.SGD, {"lr": 0.1}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 5e-4}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("ours,theirs,settings", CASES)
def test_dense_step_matches_torch(ours, theirs, settings) -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = ours([a], **settings), theirs([b], **settings)
    for _ in range(6):
        grad = torch.randn(6, 4, dtype=torch.float64)
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-14)


def test_invalid_settings_are_named() -> None:
    param = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        SGD(param, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr, momentum and weight_decay"):
        SGD(param, lr=-1.0)
    with pytest.raises(ValueError, match="invalid AdamW"):
        AdamW(param, betas=(0.9, 1.5))
