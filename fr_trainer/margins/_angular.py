"""Unscaled angular target functions shared by the margins that reuse a CosFace or
ArcFace target (SV-X, MV-Softmax, CurricularFace). Pure functions of local tensors."""

from __future__ import annotations

import math

import torch

# |sin(theta)| is floored here where a derivative divides by it.
SIN_FLOOR = 1e-12


def sin_from_cos(cos: torch.Tensor) -> torch.Tensor:
    """sin(theta) = sqrt(max(0, 1 - cos^2)) [N]."""
    return torch.sqrt((1.0 - cos * cos).clamp_min(0.0))


def cos_plus_m(cos: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) = cos cos_m - sin sin_m, without any fall-back [N]."""
    return cos * math.cos(m) - sin_from_cos(cos) * math.sin(m)


def arcface_target(cos: torch.Tensor, m: float, easy_margin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ArcFace's target without the scale: (value [N], d value / d cos [N]).

    value = cos(theta + m) where cos > cos(pi - m) (where cos > 0 with `easy_margin`);
    elsewhere the th/mm fall-back `cos - m sin(pi - m)` (plain `cos` with `easy_margin`),
    whose derivative is 1. d cos(theta + m)/d cos = cos m + sin m cos / sin(theta).
    """
    sin = sin_from_cos(cos)
    shifted = cos * math.cos(m) - sin * math.sin(m)
    d_shifted = math.cos(m) + math.sin(m) * cos / sin.clamp_min(SIN_FLOOR)
    if easy_margin:
        keep, other = cos > 0, cos
    else:
        keep, other = cos > math.cos(math.pi - m), cos - math.sin(math.pi - m) * m
    value = torch.where(keep, shifted, other)
    derivative = torch.where(keep, d_shifted, torch.ones_like(d_shifted))
    return value, derivative
