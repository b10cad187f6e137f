"""The hand-written target derivatives the margins had before they became value
functions (issue 11, item 5), kept here as closed forms: `closed_form(name, margin, cos)`
returns (logit, d logit / d cos) [N] in the margin's own parameters, for comparison with
the autograd derivative the base class now computes."""

from __future__ import annotations

import math

import torch

SIN_FLOOR = 1e-12


def _sin(cos: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((1.0 - cos * cos).clamp_min(0.0))


def arcface(cos: torch.Tensor, m: float, easy_margin: bool = False, fallback: bool = True):
    """Unscaled (value, derivative)."""
    sin = _sin(cos)
    shifted = cos * math.cos(m) - sin * math.sin(m)
    d_shifted = math.cos(m) + math.sin(m) * cos / sin.clamp_min(SIN_FLOOR)
    if easy_margin:
        keep, other = cos > 0, cos
    elif not fallback:
        keep, other = torch.ones_like(cos, dtype=torch.bool), cos
    else:
        keep, other = cos > math.cos(math.pi - m), cos - math.sin(math.pi - m) * m
    return torch.where(keep, shifted, other), torch.where(keep, d_shifted, torch.ones_like(cos))


def _chebyshev(cos: torch.Tensor, order: int):
    t_prev, t_cur = torch.ones_like(cos), cos
    u_prev, u_cur = torch.zeros_like(cos), torch.ones_like(cos)
    for _ in range(order - 1):
        t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
        u_prev, u_cur = u_cur, 2.0 * cos * u_cur - u_prev
    return t_cur, u_cur


def _sphereface(cos: torch.Tensor, m: float):
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    k = torch.floor(m * theta / math.pi).clamp_max_(math.ceil(m) - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    if float(m).is_integer():
        cos_m_theta, ratio = _chebyshev(cos, int(m))
    else:
        cos_m_theta = torch.cos(m * theta)
        ratio = torch.sin(m * theta) / _sin(cos).clamp_min(SIN_FLOOR)
    return sign * cos_m_theta - 2.0 * k, sign * m * ratio


def _sv_boundary(margin, cos: torch.Tensor):
    name = type(margin).__name__
    if name == "SVSoftmax":
        return cos, torch.ones_like(cos)
    if name == "SVCosFace" or (name == "MVSoftmax" and margin.kind == "cosface"):
        return cos - margin.m, torch.ones_like(cos)
    return arcface(cos, margin.m, margin.easy_margin)


def closed_form(name: str, margin, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled target logit, its exact derivative) [N], or KeyError for a margin that had none."""
    s = margin.scale
    if name in ("softmax", "normface", "coco"):
        return s * cos, torch.full_like(cos, s)
    if name == "cosface":
        return s * (cos - margin.m), torch.full_like(cos, s)
    if name in ("arcface", "curricularface", "subcenter_arcface"):
        value, d = arcface(cos, margin.m, getattr(margin, "easy_margin", False), getattr(margin, "fallback", True))
        return s * value, s * d
    if name == "combined":
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        angle = margin.m1 * theta + margin.m2
        d = margin.m1 * torch.sin(angle) / _sin(cos).clamp_min(SIN_FLOOR)
        return s * (torch.cos(angle) - margin.m3), s * d
    if name == "sphereface":
        value, d = _sphereface(cos, margin.m)
        return s * value, s * d
    if name == "circle":
        a_p = (1.0 + margin.m - cos).clamp_min(0.0)
        return s * a_p * (cos - (1.0 - margin.m)), s * a_p
    if name in ("sv_softmax", "sv_cosface", "sv_arcface", "mv_softmax"):
        value, d = _sv_boundary(margin, cos)
        return s * value, s * d
    raise KeyError(name)
