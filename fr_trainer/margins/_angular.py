"""Angular building blocks of the margins' target functions, written as value functions
whose autograd derivative is finite everywhere (also at sin(theta) = 0, i.e. cos = +-1).

`safe_sin` and `safe_acos` are sqrt(1 - c^2) and acos(c) with the 1/sin(theta) of their
derivative floored: |sin| is taken as at least SIN_FLOOR there, so a target such as
cos(theta + m) has the finite derivative cos m + sin m cos / max(sin, 1e-12) at cos = 1.
`arcface_value` is the one definition of ArcFace's unscaled target (with its th/mm
fall-back), shared by arcface, sv_arcface, mv_softmax, curricularface and magface.
Pure functions of local tensors.
"""

from __future__ import annotations

import math

import torch

# |sin(theta)| is floored here where a derivative divides by it.
SIN_FLOOR = 1e-12


class _SafeSin(torch.autograd.Function):
    """sin(theta) = sqrt(max(0, 1 - c^2)); d/dc = -c / max(sin, SIN_FLOOR)."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
        ctx.save_for_backward(cos, sin)
        return sin

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        cos, sin = ctx.saved_tensors
        return -grad * cos / sin.clamp_min(SIN_FLOOR)


class _SafeAcos(torch.autograd.Function):
    """theta = acos(clamp(c, -1, 1)); d/dc = -1 / max(sin(theta), SIN_FLOOR)."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos)
        return torch.acos(cos.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (cos,) = ctx.saved_tensors
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
        return -grad / sin.clamp_min(SIN_FLOOR)


def safe_sin(cos: torch.Tensor) -> torch.Tensor:
    """sqrt(max(0, 1 - cos^2)) [N], derivative floored at sin = SIN_FLOOR."""
    return _SafeSin.apply(cos)


def safe_acos(cos: torch.Tensor) -> torch.Tensor:
    """acos(cos) [N] (cos clamped to [-1, 1]), derivative floored at sin = SIN_FLOOR."""
    return _SafeAcos.apply(cos)


def _cos_sin(m: float | torch.Tensor) -> tuple:
    if torch.is_tensor(m):
        return torch.cos(m), torch.sin(m)
    return math.cos(m), math.sin(m)


def cos_plus_m(cos: torch.Tensor, m: float | torch.Tensor) -> torch.Tensor:
    """cos(theta + m) = cos cos_m - sin sin_m, without any fall-back [N]; `m` a float or [N]."""
    cos_m, sin_m = _cos_sin(m)
    return cos * cos_m - safe_sin(cos) * sin_m


def arcface_value(cos: torch.Tensor, m: float | torch.Tensor, easy_margin: bool = False,
                  fallback: bool = True) -> torch.Tensor:
    """ArcFace's target without the scale [N]; `m` a float or a per-row margin [N].

    value = cos(theta + m) where cos > cos(pi - m) (where cos > 0 with `easy_margin`);
    elsewhere the th/mm fall-back `cos - m sin(pi - m)` (plain `cos` with `easy_margin`),
    whose derivative is 1. `fallback=False`: cos(theta + m) everywhere.
    Its autograd derivative is cos m + sin m cos / max(sin(theta), 1e-12) on the first branch.
    """
    shifted = cos_plus_m(cos, m)
    if easy_margin:
        return torch.where(cos > 0, shifted, cos)
    if not fallback:
        return shifted
    if torch.is_tensor(m):
        th, mm = torch.cos(math.pi - m), torch.sin(math.pi - m) * m
    else:
        th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    return torch.where(cos > th, shifted, cos - mm)
