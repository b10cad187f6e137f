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


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("policy", [CPU, CUDA], ids=["cpu-policy", "cuda-policy"])
def test_the_16_bit_sub_centre_head_keeps_16_bit_cosines_and_is_close_to_the_fp64_plain_path(
        monkeypatch, compute, threshold, policy) -> None:
    """With a 16-bit compute dtype over fp32 centres, the sub-centre cosines come out of the GEMM
    in 16 bits (their [G, C k] buffer half the fp32 one); loss within 5e-3 and gradients at
    cosine >= 0.999 of the plain fp64 path; exact ties still split evenly; a large loss scale
    (fp16's overflow risk) scales the gradients and changes nothing else."""
    from fr_trainer.heads import subcenter_fused

    torch.manual_seed(4)
    num_classes, k, dim, rows = 301, 3, 32, 24
    w = torch.randn(num_classes, k, dim, dtype=torch.float64)
    w[:10, 1] = w[:10, 0]
    targets = torch.randint(0, num_classes, (rows,))
    targets[:5] = torch.arange(5)
    x = 0.6 * torch.nn.functional.normalize(w[targets, 0], dim=1) + 0.8 * torch.nn.functional.normalize(
        torch.randn(rows, dim, dtype=torch.float64), dim=1)
    targets[-3:] = -1
    margin = create_margin("subcenter_arcface", k=k)
    plain = _grads(lambda a, b: subcenter_loss(a, b, targets, margin, None, threshold), x, w)
    seen: list[torch.dtype] = []
    plain_mm = torch.mm

    def watching_mm(a, b, **kw):
        result = plain_mm(a, b, **kw)
        if result.shape == (rows, num_classes * k):
            seen.append(result.dtype)
        return result

    monkeypatch.setattr(subcenter_fused.torch, "mm", watching_mm)
    results = {}
    for scale in (1.0, 2.0**20):
        xs, ws = x.float().requires_grad_(True), w.float().requires_grad_(True)
        loss = SubcenterSoftmaxCrossEntropy.apply(xs, ws, targets, margin, None, threshold, policy, compute)
        (loss * scale).backward()
        results[scale] = (loss.detach(), xs.grad / scale, ws.grad / scale)
    assert seen and set(seen) == {compute}
    loss, grad_x, grad_w = results[1.0]
    assert abs(float(loss) - float(plain[0])) <= 5e-3 * abs(float(plain[0]))
    for name, ours, reference in (("grad x", grad_x, plain[1]), ("grad w", grad_w, plain[2])):
        cosine = torch.nn.functional.cosine_similarity(ours.double().flatten(), reference.flatten(), dim=0)
        assert float(cosine) >= 0.999, (name, float(cosine))
    assert float(grad_w[:10, 0].abs().sum()) > 0 and torch.equal(grad_w[:10, 0], grad_w[:10, 1])
    scaled = results[2.0**20]
    assert float(scaled[0]) == float(loss)
    assert torch.isfinite(scaled[1]).all() and torch.isfinite(scaled[2]).all()
    assert torch.allclose(scaled[1], grad_x, rtol=1e-5, atol=1e-9) and torch.allclose(scaled[2], grad_w, rtol=1e-5,
                                                                                        atol=1e-9)
