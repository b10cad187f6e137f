"""`clip_global_norm` (fr_trainer/train/grads.py) in one process: the norm of dense and
sparse (sampled head) gradients together, every gradient scaled in place by
min(1, max / norm) on the device, left bit for bit as it was within the bound, and the
norm returned as a device tensor (no host read)."""

from __future__ import annotations

import torch

from fr_trainer.train.grads import clip_global_norm


def _params() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    backbone = torch.nn.Parameter(torch.zeros(5, 3))
    backbone.grad = torch.randn(5, 3, generator=generator)
    head = torch.nn.Parameter(torch.zeros(10, 3))
    rows = torch.tensor([[1, 4, 7]])
    head.grad = torch.sparse_coo_tensor(rows, torch.randn(3, 3, generator=generator), (10, 3)).coalesce()
    return backbone, head


def _expected_norm(backbone, head) -> float:
    return float(torch.cat([backbone.grad.flatten(), head.grad.to_dense().flatten()]).double().norm())


def test_clipping_scales_dense_and_sparse_gradients_in_place_to_the_bound() -> None:
    backbone, head = _params()
    norm = _expected_norm(backbone, head)
    dense, values = backbone.grad, head.grad._values()
    before = (dense.clone(), values.clone())
    returned = clip_global_norm([backbone], [head], max_norm=norm / 4)
    assert isinstance(returned, torch.Tensor) and abs(float(returned) - norm) < 1e-9 * norm
    assert backbone.grad is dense and head.grad._values().data_ptr() == values.data_ptr()  # in place
    factor = (norm / 4) / (norm + 1e-6)
    torch.testing.assert_close(dense, before[0] * factor)
    torch.testing.assert_close(head.grad._values(), before[1] * factor)
    assert abs(_expected_norm(backbone, head) - norm / 4) < 1e-5 * norm


def test_gradients_within_the_bound_are_left_as_they_were() -> None:
    backbone, head = _params()
    before = (backbone.grad.clone(), head.grad._values().clone())
    clip_global_norm([backbone], [head], max_norm=10 * _expected_norm(backbone, head))
    assert torch.equal(backbone.grad, before[0]) and torch.equal(head.grad._values(), before[1])
