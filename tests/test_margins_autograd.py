"""Item 5 of issue 11: a margin defines only its target value; the base class's autograd
derivative on the [G] target cosines equals the closed forms the margins used to write by
hand (tests/margin_closed_forms.py) within 1e-10 in fp64, on a grid of cosines that holds
cos = +-1 exactly and both sides of every fall-back / interval edge; it stays finite at
sin = 0; straight-through stays s; the head's call under no autograd works; and there is
one ArcFace target."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from margin_closed_forms import closed_form

from fr_trainer.margins import _angular, create_margin, list_margins
from fr_trainer.margins import family as family_module

NUM_CLASSES = 1003
VARIANTS = {  # extra keyword sets on top of every margin's defaults
    "arcface": [{"m": 2.8}, {"easy_margin": True}, {"fallback": False}, {"m": 0.2, "s": 16.0}],
    "combined": [{"m1": 0.9, "m2": 0.4, "m3": 0.15}],
    "cosface": [{"m": 0.2, "s": 30.0}],
    "sphereface": [{"m": 2.5}, {"m": 3.0}, {"m": 1.0}],
    "sv_arcface": [{"m": 2.8}, {"easy_margin": True}],
    "mv_softmax": [{"target": "arcface"}, {"target": "arcface", "easy_margin": True}],
    "curricularface": [{"m": 0.3}],
    "circle": [{"gamma": 64.0, "m": 0.4}],
}


def _margins() -> list[tuple[str, dict]]:
    return [(name, kw) for name in list_margins() for kw in [{}] + VARIANTS.get(name, [])]


def _edges(margin) -> list[float]:
    """Cosines at which a target changes branch: ArcFace's th, 0 (easy margin), SphereFace's
    interval ends, Circle's a_p = 0."""
    edges = [0.0]
    m = getattr(margin, "m", None)
    if isinstance(m, float) and m > 0:
        edges.append(math.cos(math.pi - m))
        if type(margin).__name__ == "SphereFace":
            edges += [math.cos(k * math.pi / m) for k in range(1, math.ceil(m))]
    return edges


def _grid(margin) -> torch.Tensor:
    values = [-1.0, 1.0, -1.0 + 1e-15, 1.0 - 1e-15, -1.0 + 1e-7, 1.0 - 1e-7]
    values += torch.linspace(-0.999, 0.999, 97, dtype=torch.float64).tolist()
    for edge in _edges(margin):
        values += [edge, math.nextafter(edge, 2.0), math.nextafter(edge, -2.0), edge + 1e-6, edge - 1e-6]
    return torch.tensor([v for v in values if -1.0 <= v <= 1.0], dtype=torch.float64)


def _norms(n: int) -> torch.Tensor:
    return torch.linspace(0.5, 150.0, n, dtype=torch.float64)


@pytest.mark.parametrize("name,kw", _margins(), ids=lambda v: str(v))
def test_autograd_derivative_equals_the_old_closed_form(name: str, kw: dict) -> None:
    margin = create_margin(name, num_classes=NUM_CLASSES, **kw).double()
    cos = _grid(margin)
    norms = _norms(cos.numel()) if margin.needs_norms else None
    with torch.no_grad():  # as the head calls it: inside an autograd.Function's forward
        logit, derivative = margin.target(cos, norms)
    assert logit.shape == derivative.shape == cos.shape and not logit.requires_grad
    assert torch.isfinite(logit).all() and torch.isfinite(derivative).all(), (name, kw)
    try:
        want_logit, want_derivative = closed_form(name, margin, cos)
    except KeyError:  # a margin born value-only: central differences away from its kinks
        want_logit, want_derivative = _finite_differences(margin, cos, norms)
        inside = (cos.abs() < 0.99) & ~torch.isnan(want_derivative)
        torch.testing.assert_close(derivative[inside], want_derivative[inside], rtol=1e-6, atol=1e-6)
        return
    torch.testing.assert_close(logit, want_logit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(derivative, want_derivative, rtol=1e-10, atol=1e-10)


def _finite_differences(margin, cos: torch.Tensor, norms: torch.Tensor | None):
    h = 1e-6
    value = lambda c: margin.target_value(c, norms) if margin.needs_norms else margin.target_value(c)  # noqa: E731
    with torch.no_grad():
        up, down = value((cos + h).clamp(-1, 1)), value((cos - h).clamp(-1, 1))
        kink = ((value(cos + h / 2) - value(cos - h / 2)) / h - (up - down) / (2 * h)).abs() > 1e-4
        d = (up - down) / (2 * h)
    return value(cos), torch.where(kink, torch.nan, d)


@pytest.mark.parametrize("name", ["arcface", "combined", "sphereface", "sv_arcface", "curricularface"])
def test_derivative_is_finite_at_cos_one_exactly(name: str) -> None:
    kw = {"m": 2.5} if name == "sphereface" else {}
    margin = create_margin(name, **kw).double()
    cos = torch.tensor([1.0, -1.0], dtype=torch.float64)
    logit, derivative = margin.target(cos)
    assert torch.isfinite(logit).all() and torch.isfinite(derivative).all()
    want = closed_form(name, margin, cos)[1]
    torch.testing.assert_close(derivative, want, rtol=1e-10, atol=0)


def test_straight_through_is_s_for_every_margin() -> None:
    for name in list_margins():
        margin = create_margin(name, num_classes=NUM_CLASSES, gradient="straight_through").double()
        cos = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64)
        norms = _norms(7) if margin.needs_norms else None
        logit, derivative = margin.target(cos, norms)
        assert torch.equal(derivative, torch.full_like(cos, margin.scale)), name
        exact = create_margin(name, num_classes=NUM_CLASSES).double()
        assert torch.equal(logit, exact.target(cos, norms)[0]), name


def test_one_arcface_target() -> None:
    source = inspect.getsource(family_module.ArcFace)
    assert "arcface_value" in source and "sin_m" not in source and "target_exact" not in source
    assert not hasattr(_angular, "arcface_target")
    # every margin that uses ArcFace's target goes through the one function
    cos = torch.linspace(-1, 1, 41, dtype=torch.float64)
    plain = _angular.arcface_value(cos, 0.5)
    for name in ("arcface", "sv_arcface", "curricularface"):
        margin = create_margin(name, m=0.5, s=1.0).double()
        torch.testing.assert_close(margin.target(cos)[0], plain, rtol=0, atol=0)


def test_a_new_margin_needs_only_its_formula() -> None:
    from fr_trainer.margins import Margin

    class Quadratic(Margin):
        def target_value(self, cos_t, norms=None):
            return self.scale * (cos_t - 0.1 * cos_t * cos_t)

    cos = torch.linspace(-1, 1, 11, dtype=torch.float64)
    with torch.no_grad():
        logit, derivative = Quadratic(scale=10.0).target(cos)
    torch.testing.assert_close(derivative, 10.0 * (1 - 0.2 * cos), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(logit, 10.0 * (cos - 0.1 * cos * cos), rtol=0, atol=0)


def test_magface_norm_derivative_is_the_closed_form() -> None:
    margin = create_margin("magface").double()
    cos = torch.linspace(-0.5, 0.99, 9, dtype=torch.float64)
    norms = torch.tensor([5.0, 10.5, 30.0, 60.0, 80.0, 100.0, 109.0, 120.0, 55.0], dtype=torch.float64)
    logit, d_cos, d_norm = margin.target_terms(cos, norms)
    slope = (0.8 - 0.45) / 100.0
    m = slope * (norms.clamp(10, 110) - 10) + 0.45
    theta = torch.acos(cos)
    inside = (norms > 10) & (norms < 110)
    want = torch.where(inside, -64.0 * torch.sin(theta + m) * slope, torch.zeros_like(cos))
    torch.testing.assert_close(logit, 64.0 * torch.cos(theta + m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_norm, want, rtol=1e-10, atol=1e-12)
    penalty, d_penalty = margin.norm_penalty_terms(norms)
    a = norms.clamp(10, 110)
    torch.testing.assert_close(penalty, 35.0 * (1 / a + a / 110.0**2), rtol=1e-14, atol=0)
    torch.testing.assert_close(d_penalty, torch.where(inside, 35.0 * (-1 / a**2 + 1 / 110.0**2), 0 * a),
                               rtol=1e-12, atol=1e-15)
