"""A resumed optimizer keeps its state beside its parameters: checkpoints are read on the
CPU, and every state tensor (AdamW's per-row `step` too) must follow its parameter to the
device it trains on. A GPU is stood in for by the `meta` device: a state tensor left on
the CPU shows as `cpu` there."""

from __future__ import annotations

import copy

import pytest
import torch

from fr_trainer.train.optim import SGD, AdamW

OPTIMIZERS = [
    (SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


def _params(device: str) -> list[torch.nn.Parameter]:
    """A dense parameter (the backbone's) and a row-sparse one (the head's centres)."""
    return [torch.nn.Parameter(torch.zeros(5, 3, device=device)),
            torch.nn.Parameter(torch.zeros(8, 4, device=device))]


def _trained(kind, settings) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = _params("cpu")
    with torch.no_grad():
        for p in params:
            p.normal_()
    optimizer = kind(params, **settings)
    for _ in range(3):
        params[0].grad = torch.randn(5, 3)
        rows = torch.tensor([1, 4, 6])
        params[1].grad = torch.sparse_coo_tensor(rows[None], torch.randn(3, 4), (8, 4), check_invariants=True)
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("kind,settings", OPTIMIZERS)
def test_loaded_state_lives_on_the_parameters_device(kind, settings) -> None:
    saved = _trained(kind, settings)[0].state_dict()
    assert any("step" in s for s in saved["state"].values()) == (kind is AdamW)
    params = _params("meta")
    optimizer = kind(params, **settings)
    optimizer.load_state_dict(saved)
    assert len(optimizer.state) == 2  # dense and sparse parameter both have state
    for param in params:
        state = optimizer.state[param]
        assert state
        for key, value in state.items():
            assert value.device == param.device, (kind.__name__, key, value.device)
            if value.is_floating_point():
                assert value.dtype == param.dtype
    if kind is AdamW:  # the per-row step keeps its integer type
        assert all(optimizer.state[p]["step"].dtype == torch.int64 for p in params)


@pytest.mark.parametrize("kind,settings", OPTIMIZERS)
def test_a_reloaded_optimizer_continues_exactly(kind, settings) -> None:
    """On the same device the reloaded optimizer's next step equals the unbroken one's."""
    original, params = _trained(kind, settings)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reloaded = kind(copies, **settings)
    reloaded.load_state_dict(copy.deepcopy(original.state_dict()))
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 4]]), torch.randn(2, 4), (8, 4), check_invariants=True)
    grads = (torch.randn(5, 3), sparse)
    for optimizer, group in ((original, params), (reloaded, copies)):
        group[0].grad, group[1].grad = grads[0].clone(), grads[1].clone()
        optimizer.step()
    for a, b in zip(params, copies):
        assert torch.equal(a.detach(), b.detach())
