"""Margins against a naive per-sample loop, gradcheck of the fused head, and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from fr_trainer.heads import MarginSoftmaxCrossEntropy, PartialFC
from fr_trainer.margins import coco_alpha_lower_bound, create_margin, list_margins

K, D, B = 37, 8, 5


def naive_loss(name: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kw: dict) -> float:
    """Cross-entropy written one sample and one class at a time with the math module."""
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i].tolist()
        norm_x = math.sqrt(sum(v * v for v in xi))
        logits = []
        for j in range(w.shape[0]):
            wj = w[j].tolist()
            norm_w = math.sqrt(sum(v * v for v in wj))
            cos = sum(a * b for a, b in zip(xi, wj)) / (norm_x * norm_w)
            if j != int(y[i]):
                s = kw["alpha"] if name == "coco" else kw["s"]
                logits.append(s * cos)
                continue
            theta = math.acos(cos)
            if name == "cosface":
                logits.append(kw["s"] * (cos - kw["m"]))
            elif name == "arcface":
                m = kw["m"]
                value = math.cos(theta + m) if theta + m <= math.pi else cos - math.sin(math.pi - m) * m
                logits.append(kw["s"] * value)
            elif name == "combined":
                logits.append(kw["s"] * (math.cos(kw["m1"] * theta + kw["m2"]) - kw["m3"]))
            elif name == "coco":
                logits.append(kw["alpha"] * cos)
            else:
                logits.append(kw["s"] * cos)
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[int(y[i])]
    return total / x.shape[0]


@pytest.mark.parametrize("name,kw", [
    ("normface", {"s": 30.0}),
    ("coco", {"alpha": 7.5}),
    ("cosface", {"s": 64.0, "m": 0.35}),
    ("arcface", {"s": 64.0, "m": 0.5}),
    ("arcface", {"s": 16.0, "m": 2.5}),
    ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
])
def test_margin_matches_naive_loop(name: str, kw: dict) -> None:
    torch.manual_seed(3)
    head = PartialFC(K, D, margin=name, seed=2, **kw).double()
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, K, (B,))
    loss = head(x, y).item()
    assert loss == pytest.approx(naive_loss(name, x, head.weight.detach(), y, kw), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name,kw", [
    ("softmax", {}), ("normface", {}), ("coco", {}), ("cosface", {}), ("arcface", {}),
    ("arcface", {"easy_margin": True}), ("arcface", {"m": 2.7}), ("combined", {}),
])
@pytest.mark.parametrize("chunk_size", [None, 10])
def test_gradcheck_fused_head(name: str, kw: dict, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    margin = create_margin(name, num_classes=K, **kw)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(K, D, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.randn(K, dtype=torch.float64, requires_grad=True) if margin.has_bias else None
    targets = torch.randint(0, K, (B,))
    inputs = (x, w) if bias is None else (x, w, bias)

    def fn(*tensors):
        b = tensors[2] if len(tensors) == 3 else None
        return MarginSoftmaxCrossEntropy.apply(tensors[0], tensors[1], b, None, targets, margin, None, chunk_size)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_all_gather_single_process_is_identity() -> None:
    from fr_trainer.distributed import all_gather_with_grad
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: all_gather_with_grad(t, None) * 2, (x,))


def test_chunked_equals_unchunked() -> None:
    torch.manual_seed(1)
    x = torch.randn(9, 12, dtype=torch.float64)
    y = torch.randint(0, 101, (9,))
    outs = []
    for chunk in (None, 1, 7, 50, 101, 1000):
        head = PartialFC(101, 12, margin="arcface", chunk_size=chunk, seed=4).double()
        xi = x.clone().requires_grad_()
        loss = head(xi, y)
        loss.backward()
        outs.append((loss.detach(), xi.grad, head.weight.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_arcface_straight_through_gradient_is_s() -> None:
    cos = torch.tensor([-0.95, -0.2, 0.3, 0.99], dtype=torch.float64)
    exact = create_margin("arcface")
    through = create_margin("arcface", gradient="straight_through")
    z1, d1 = exact.target(cos)
    z2, d2 = through.target(cos)
    assert torch.equal(z1, z2)
    assert torch.equal(d2, torch.full_like(cos, 64.0))
    assert not torch.allclose(d1, d2)
    # exact derivative equals autograd of the formula away from the fall-back
    c = cos[1:].clone().requires_grad_()
    torch.cos(torch.acos(c) + 0.5).mul(64).sum().backward()
    torch.testing.assert_close(d1[1:], c.grad)
    assert float(d1[0]) == 64.0  # cos <= cos(pi - m): the th/mm fall-back, slope s


def test_easy_margin_only_where_cos_positive() -> None:
    margin = create_margin("arcface", easy_margin=True, s=1.0)
    cos = torch.tensor([-0.5, 0.5], dtype=torch.float64)
    z, _ = margin.target(cos)
    assert float(z[0]) == -0.5
    assert float(z[1]) == pytest.approx(math.cos(math.acos(0.5) + 0.5))


def test_coco_alpha_bound() -> None:
    for k in (2, 10, 85_742, 10_000_000):
        assert coco_alpha_lower_bound(k) == pytest.approx(0.5 * math.log(k - 1) + 3.0, rel=1e-12)
        alpha = coco_alpha_lower_bound(k, eps=0.9)
        p = math.exp(alpha) / (math.exp(alpha) + (k - 1) * math.exp(-alpha))
        assert p == pytest.approx(0.9, rel=1e-12)
    assert create_margin("coco", num_classes=1001).scale == pytest.approx(0.5 * math.log(1000) + 3)
    with pytest.raises(ValueError, match="eps"):
        coco_alpha_lower_bound(10, eps=1.0)


def test_registry_names_and_errors() -> None:
    assert {"softmax", "normface", "coco", "cosface", "arcface", "combined"} <= set(list_margins())
    with pytest.raises(ValueError, match="known: .*arcface"):
        create_margin("arcfase")
    with pytest.raises(ValueError, match="does not take mm"):
        create_margin("arcface", mm=0.1)
    with pytest.raises(ValueError, match="gradient"):
        create_margin("arcface", gradient="approx")


def test_large_scale_stays_finite() -> None:
    head = PartialFC(50, 8, margin="normface", s=2000.0, seed=0).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    loss = head(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_head_rejects_bad_inputs() -> None:
    head = PartialFC(10, 4, seed=0)
    with pytest.raises(ValueError, match=r"outside \[0, 10\): \[10, -1\]"):
        head(torch.randn(3, 4), torch.tensor([1, 10, -1]))
    with pytest.raises(ValueError, match="int64"):
        head(torch.randn(3, 4), torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        head(torch.randn(3, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="one per"):
        head(torch.randn(3, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="margin keywords"):
        PartialFC(10, 4, margin=create_margin("cosface"), s=3.0)
    with pytest.raises(ValueError, match="keep the centres in float32"):
        PartialFC(10, 4, seed=0).half()(torch.randn(3, 4), torch.tensor([1, 2, 3]))


def test_head_runs_in_fp32_under_autocast() -> None:
    head = PartialFC(40, 8, seed=0)
    x = torch.randn(6, 8).bfloat16().requires_grad_()
    y = torch.arange(6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = head(x, y)
    expected = PartialFC(40, 8, seed=0)(x.detach().float(), y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32
