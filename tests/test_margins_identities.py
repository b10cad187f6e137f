"""Identities from the papers and unit checks of the issue-5 margins (single process):
SV with t = 1 is its plain counterpart, class-level Circle is CE of its logits, the SV
mask on hand-built cosines, gamma = 256 stays finite, SphereFace's psi, CurricularFace's
t buffer, gradcheck of the fused head, and keyword errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from margin_reference_extra import extra_reference_loss, psi

from fr_trainer.heads import MarginSoftmaxCrossEntropy, PartialFC
from fr_trainer.margins import create_margin, list_margins

K, D, B = 37, 8, 5


def _loss_and_grads(margin, x: torch.Tensor, seed: int = 2, **kw):
    head = PartialFC(K, D, margin=margin, seed=seed, **kw).double()
    xi = x.clone().requires_grad_()
    loss = head(xi, _labels())
    loss.backward()
    return loss.detach(), xi.grad, head.weight.grad


def _labels() -> torch.Tensor:
    return torch.tensor([0, 3, 3, 17, K - 1])


def test_contract_names_are_registered() -> None:
    names = {"softmax", "normface", "coco", "cosface", "arcface", "combined", "sphereface",
             "sv_softmax", "sv_cosface", "sv_arcface", "mv_softmax", "circle", "curricularface"}
    assert names <= set(list_margins())


@pytest.mark.parametrize("sv,plain,kw", [
    ("sv_softmax", "normface", {"s": 32.0}),
    ("sv_cosface", "cosface", {"s": 32.0, "m": 0.35}),
    ("sv_arcface", "arcface", {"s": 32.0, "m": 0.5}),
    ("mv_softmax", "cosface", {"s": 32.0, "m": 0.35}),
])
def test_support_vector_with_t_one_is_the_plain_margin(sv: str, plain: str, kw: dict) -> None:
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = _loss_and_grads(sv, x, t=1.0, **kw)
    want = _loss_and_grads(plain, x, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # and t > 1 changes it (the test can fail)
    assert not torch.allclose(_loss_and_grads(sv, x, t=1.2, **kw)[0], want[0])


def test_sv_mask_selects_exactly_the_classes_that_beat_the_target() -> None:
    cos = torch.tensor([[0.50, 0.70, 0.20, 0.51, 0.50],
                        [-0.3, -0.1, -0.31, 0.9, -0.29]], dtype=torch.float64)
    target_cos = torch.tensor([0.50, -0.30], dtype=torch.float64)  # row 0: cos_y = 0.5; row 1: cos_y = -0.3
    expected = torch.tensor([[False, True, False, True, False],
                             [False, True, False, True, True]])
    margin = create_margin("sv_softmax", s=2.0, t=1.5)
    rows = margin.nontarget_rows(target_cos)  # the boundary of each row: cos_y itself
    assert torch.equal(margin.support_vector_mask(cos, rows), expected.to(cos.dtype))  # a float mask
    logits = margin.nontarget_logits(cos.clone(), rows)
    want = torch.where(expected, 2.0 * (1.5 * cos + 0.5), 2.0 * cos)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-15)
    grad = margin.nontarget_grad(cos, rows)
    torch.testing.assert_close(grad, torch.where(expected, 3.0, 2.0).to(torch.float64), rtol=0, atol=0)
    # SV-AM: the boundary is cos_y - m, so more classes are support vectors
    am = create_margin("sv_cosface", m=0.25)
    torch.testing.assert_close(am.nontarget_rows(target_cos), target_cos - 0.25, rtol=0, atol=0)
    assert torch.equal(am.support_vector_mask(cos, am.nontarget_rows(target_cos)),
                       torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=cos.dtype))


def _circle_naive(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, gamma: float, m: float) -> float:
    """The paper's class-level form, softplus(logsumexp_n z_n - z_p), one sample at a time."""
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i] / x[i].norm()
        cos = [(xi @ (w[j] / w[j].norm())).item() for j in range(w.shape[0])]
        s_p = cos[int(y[i])]
        z_p = gamma * max(0.0, 1.0 + m - s_p) * (s_p - (1.0 - m))
        z_n = [gamma * max(0.0, c + m) * (c - m) for j, c in enumerate(cos) if j != int(y[i])]
        top = max(z_n)
        lse_n = top + math.log(sum(math.exp(z - top) for z in z_n))
        d = lse_n - z_p
        total += d + math.log1p(math.exp(-d)) if d > 0 else math.log1p(math.exp(d))
    return total / x.shape[0]


@pytest.mark.parametrize("gamma,m", [(256.0, 0.25), (32.0, 0.4)])
def test_class_level_circle_is_ce_of_its_logits(gamma: float, m: float) -> None:
    head = PartialFC(K, D, margin="circle", gamma=gamma, m=m, seed=2).double()
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    loss = head(x, _labels()).item()
    assert loss == pytest.approx(_circle_naive(x, head.weight.detach(), _labels(), gamma, m), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_circle_gamma_256_stays_finite(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    head = PartialFC(K, D, margin="circle", gamma=256.0, seed=1).to(dtype)
    w = head.weight.detach()
    labels = _labels()
    # rows exactly on, and exactly opposite to, their centre: logits near +-1000
    x = torch.cat([w[labels[:3]] * 50.0, -w[labels[3:]] * 50.0]).clone().requires_grad_()
    loss = head(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    assert loss.item() > 100.0  # the opposite rows pay ~ gamma * 2.25 * 1.75 / B each
    ref, _ = extra_reference_loss("circle", x.detach().double(), w.double(), labels, {})
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_sphereface_psi_values_and_monotone() -> None:
    margin = create_margin("sphereface", s=1.0, m=4)
    thetas = torch.tensor([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi], dtype=torch.float64)
    z, _ = margin.target(torch.cos(thetas))
    torch.testing.assert_close(z, torch.tensor([1.0, -1.0, -3.0, -5.0, -7.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    dense = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    for m in (4.0, 2.5):
        values, derivative = create_margin("sphereface", s=1.0, m=m).target(torch.cos(dense))
        assert (values[1:] <= values[:-1] + 1e-12).all(), f"psi not decreasing for m={m}"
        assert (derivative >= -1e-9).all(), f"negative slope for m={m} at {dense[derivative < -1e-9]}"
        c = torch.cos(dense[1:-1]).clone().requires_grad_()
        psi(torch.acos(c), m).sum().backward()
        torch.testing.assert_close(derivative[1:-1], c.grad, rtol=1e-7, atol=1e-7)
    # theta = 0: the Chebyshev form gives the limit m * m sin(m theta)/(m sin theta) -> m^2, not 0/0
    assert margin.target(torch.ones(1, dtype=torch.float64))[1].item() == pytest.approx(16.0)


def test_curricular_t_buffer() -> None:
    head = PartialFC(K, D, margin="curricularface", seed=2).double()
    assert "margin.t" in head.state_dict() and float(head.margin.t) == 0.0
    assert not head.margin.t.requires_grad
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    labels = _labels()
    cos_t = torch.nn.functional.cosine_similarity(x, head.weight.detach()[labels])
    head(x, labels).backward()
    t1 = 0.01 * cos_t.mean().item()
    assert float(head.margin.t) == pytest.approx(t1, rel=1e-12)
    head(x, labels)
    assert float(head.margin.t) == pytest.approx(0.99 * t1 + 0.01 * cos_t.mean().item(), rel=1e-12)
    saved = copy.deepcopy(head.state_dict())
    head.eval()
    head(x, labels)
    assert torch.equal(head.margin.t, saved["margin.t"]), "eval mode must not move t"
    fresh = PartialFC(K, D, margin="curricularface", seed=2).double()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.margin.t, saved["margin.t"])


def test_curricular_hard_examples_hand_built() -> None:
    margin = create_margin("curricularface", s=2.0, m=0.5)
    margin.t.fill_(0.25)  # exact in the float32 buffer
    target_cos = torch.tensor([math.cos(1.0)], dtype=torch.float64)  # cos(theta + m) = cos(1.5)
    cos = torch.tensor([[math.cos(1.5) - 1e-9, math.cos(1.5) + 1e-9, 0.9]], dtype=torch.float64)
    rows = margin.nontarget_rows(target_cos)  # the threshold cos(theta_y + m)
    torch.testing.assert_close(rows, torch.tensor([math.cos(1.5)], dtype=torch.float64), rtol=0, atol=1e-15)
    logits = margin.nontarget_logits(cos.clone(), rows)
    c0, c1 = cos[0, 0].item(), cos[0, 1].item()
    want = torch.tensor([2.0 * c0, 2.0 * c1 * (0.25 + c1), 2.0 * 0.9 * 1.15], dtype=torch.float64)
    torch.testing.assert_close(logits[0], want, rtol=0, atol=1e-15)
    torch.testing.assert_close(margin.nontarget_grad(cos, rows)[0],
                               torch.tensor([2.0, 2.0 * (0.25 + 2 * c1), 2.0 * 2.05], dtype=torch.float64))


@pytest.mark.parametrize("name,kw", [
    ("sv_softmax", {}), ("sv_cosface", {}), ("sv_arcface", {}), ("mv_softmax", {"target": "arcface"}),
    ("sphereface", {}), ("sphereface", {"m": 2.5}), ("curricularface", {}),
])
@pytest.mark.parametrize("chunk_size", [None, 10])
def test_gradcheck_fused_head(name: str, kw: dict, chunk_size: int | None) -> None:
    """The head's hand-written backward equals finite differences (masks are piecewise
    constant; curricular t is frozen by eval mode so every evaluation uses the same t)."""
    torch.manual_seed(0)
    margin = create_margin(name, s=8.0, **kw)
    if name == "curricularface":
        margin.t.fill_(0.2)
        margin.eval()
    margin.double()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(K, D, dtype=torch.float64) * 0.5).requires_grad_()
    targets = torch.randint(0, K, (B,))

    def fn(xx, ww):
        return MarginSoftmaxCrossEntropy.apply(xx, ww, None, None, targets, margin, None, chunk_size)

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_keyword_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"t must be >= 1 .*t=0.9"):
        create_margin("sv_softmax", t=0.9)
    with pytest.raises(ValueError, match="'sphere'"):
        create_margin("mv_softmax", target="sphere")
    with pytest.raises(ValueError, match="easy_margin"):
        create_margin("mv_softmax", easy_margin=True)
    with pytest.raises(ValueError, match=r"m must lie in \[0, 1\), got m=1.5"):
        create_margin("circle", m=1.5)
    with pytest.raises(ValueError, match="m=0.5"):
        create_margin("sphereface", m=0.5)
    with pytest.raises(ValueError, match="does not take s"):
        create_margin("circle", s=64.0)
    with pytest.raises(ValueError, match="needs the target cosine"):
        create_margin("sv_softmax").nontarget_logits(torch.zeros(2, 3), None)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_the_per_row_terms_of_a_non_target_formula_are_computed_once_per_step(monkeypatch, compute_dtype) -> None:
    """sv_arcface's boundary f(m, theta_y): once for the target logits and once for the
    non-target mask (`nontarget_rows`), not once per row block of every pass (64 x 9,000
    cosines are ~3 row blocks of the CPU policy, each pass over them)."""
    from fr_trainer.heads import PartialFC
    from fr_trainer.margins.support_vector import SVArcFace

    calls = []
    plain = SVArcFace.boundary
    monkeypatch.setattr(SVArcFace, "boundary", lambda self, cos_t: calls.append(cos_t.shape) or plain(self, cos_t))
    head = PartialFC(9000, 16, margin="sv_arcface", seed=0, compute_dtype=compute_dtype)
    x = torch.randn(64, 16, requires_grad=True)
    head(x, torch.randint(0, 9000, (64,))).backward()
    assert len(calls) == 2 and all(shape == (64,) for shape in calls), calls
