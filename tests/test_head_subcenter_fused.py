"""fr_trainer/heads/subcenter_fused.py equals the plain autograd sub-centre path
(fr_trainer/heads/subcenter.py) in float64: loss, embedding and centre gradients, with
exact ties between sub-centres (a duplicated sub-centre shares the gradient evenly, as
autograd's amax does), with the inter-class filtering threshold, under both block policies.
(Against the dense fp64 reference at 1, 2 and 3 ranks: tests/test_head_new_margins.py.)"""

from __future__ import annotations

import pytest
import torch

from fr_trainer.heads.device_policy import CPU, CUDA
from fr_trainer.heads.subcenter import subcenter_loss
from fr_trainer.heads.subcenter_fused import SubcenterSoftmaxCrossEntropy
from fr_trainer.margins import create_margin


def _grads(fn, x, w):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("policy", [CPU, CUDA], ids=["cpu-policy", "cuda-policy"])
@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
def test_the_fused_sub_centre_loss_equals_the_plain_path(threshold, policy, gradient) -> None:
    torch.manual_seed(3)
    num_classes, k, dim, rows = 57, 3, 12, 20
    x = torch.randn(rows, dim, dtype=torch.float64)
    w = torch.randn(num_classes, k, dim, dtype=torch.float64)
    w[:10, 1] = w[:10, 0]  # exact ties: two sub-centres attain the max together
    x[:5] = w[:5, 0] * 3.0 + 0.3 * torch.randn(5, dim, dtype=torch.float64)  # targets attained by the tied pair
    targets = torch.cat([torch.arange(5), torch.randint(0, num_classes, (rows - 5,))])
    targets[-3:] = -1  # rows whose class another rank owns
    margin = create_margin("subcenter_arcface", k=k, gradient=gradient)
    plain = _grads(lambda a, b: subcenter_loss(a, b, targets, margin, None, threshold), x, w)
    fused = _grads(lambda a, b: SubcenterSoftmaxCrossEntropy.apply(a, b, targets, margin, None, threshold, policy),
                   x, w)
    for name, p, f in zip(("loss", "grad x", "grad w"), plain, fused):
        assert float((p - f).abs().max()) <= 1e-10 * float(p.abs().max()), (name, float((p - f).abs().max()))
    assert float(fused[2][:10, 0].abs().sum()) > 0 and torch.equal(fused[2][:10, 0], fused[2][:10, 1])


def test_a_second_backward_of_a_retained_graph_is_refused_with_the_fix() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(9, 2, 6, requires_grad=True)
    margin = create_margin("subcenter_arcface", k=2)
    loss = SubcenterSoftmaxCrossEntropy.apply(x, w, torch.tensor([0, 3, -1, 8]), margin, None, 0.0, CPU)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward.*run the forward again"):
        loss.backward()
