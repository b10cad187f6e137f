"""The margin-softmax family: softmax, normface, coco, cosface, arcface, combined.

Formulas and defaults follow LOSSES.md (the table "Margin-softmax family").
"""

from __future__ import annotations

import math

import torch

from fr_trainer.margins._angular import arcface_value, safe_acos
from fr_trainer.margins.base import Margin
from fr_trainer.margins.registry import register_margin


@register_margin("softmax")
class Softmax(Margin):
    """Plain softmax: logits `w_j . x + b_j`, no normalisation, no margin."""

    normalized = False
    has_bias = True

    def __init__(self, gradient: str = "exact") -> None:
        super().__init__(scale=1.0, gradient=gradient)


@register_margin("normface")
class NormFace(Margin):
    """NormFace: `s cos_j` for every class."""

    def __init__(self, s: float = 30.0, gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)


def coco_alpha_lower_bound(num_classes: int, eps: float = 0.9975273768433653) -> float:
    """Smallest COCO scale alpha at which the true-class probability can reach `eps`.

    With cosines in [-1, 1] the best a sample can do is cos_y = 1 and cos_j = -1 for the
    other K - 1 classes, giving p_y = e^a / (e^a + (K-1) e^-a). Asking p_y >= eps:
        e^{2a} >= (K-1) eps / (1 - eps)  =>  a >= 0.5 ln(K-1) + 0.5 ln(eps / (1 - eps)).
    The paper's practical setting, 0.5 ln(K-1) + 3, is this bound at
    eps = e^6 / (1 + e^6) ~ 0.99753 (the default here).
    """
    if num_classes < 2:
        raise ValueError(f"COCO needs at least 2 classes, got num_classes={num_classes}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    return 0.5 * math.log(num_classes - 1) + 0.5 * math.log(eps / (1.0 - eps))


@register_margin("coco")
class Coco(Margin):
    """COCO (congenerous cosine): `alpha cos_j` with the centroids = normalised class
    weights learned by backprop. `alpha` defaults to `coco_alpha_lower_bound(K)`."""

    def __init__(self, alpha: float | None = None, num_classes: int | None = None,
                 gradient: str = "exact") -> None:
        if alpha is None:
            if num_classes is None:
                raise ValueError("coco needs alpha=... or num_classes=... to derive alpha")
            alpha = coco_alpha_lower_bound(num_classes)
        super().__init__(scale=alpha, gradient=gradient)


@register_margin("cosface")
class CosFace(Margin):
    """CosFace: target `s (cos_y - m)`, others `s cos_j`."""

    def __init__(self, s: float = 64.0, m: float = 0.35, gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        self.m = float(m)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (cos_t - self.m)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


@register_margin("arcface")
class ArcFace(Margin):
    """ArcFace: target `s cos(theta_y + m)`, others `s cos_j`.

    Exact gradient (default, autograd of `arcface_value`): d/dcos cos(theta + m) =
    cos m + sin m * cos / sin(theta) (sin floored at 1e-12).
    Where theta + m > pi the target stops being monotone; there (cos_y <= cos(pi - m)) the
    target is `cos_y - m sin(pi - m)` (the th/mm fall-back, derivative 1).
    `easy_margin=True` applies the margin only where cos_y > 0 (and never falls back).
    `fallback=False` drops the th/mm fall-back: the target is `s cos(theta_y + m)` everywhere,
    as arcface_torch computes it.
    `gradient="straight_through"`: dz/dcos = s everywhere (arcface_torch's no-grad margin;
    with `fallback=False` that is its ArcFace exactly).
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False,
                 gradient: str = "exact", fallback: bool = True) -> None:
        super().__init__(scale=s, gradient=gradient)
        self.m = float(m)
        self.easy_margin = bool(easy_margin)
        self.fallback = bool(fallback)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * arcface_value(cos_t, self.m, self.easy_margin, self.fallback)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, m={self.m}, easy_margin={self.easy_margin}, "
            f"fallback={self.fallback}"
        )


@register_margin("subcenter_arcface")
class SubcenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al., ECCV 2020): k centres per class, all on the shard
    that owns the class; the class cosine is the max over its k sub-centres
    (cos_ij = max_l cos(x_i, w_jl)), then ArcFace on those cosines (target
    `s cos(theta_y + m)` with the th/mm fall-back, others `s cos_j`). Defaults s = 64,
    m = 0.5, k = 3. The gradient of a class cosine goes to its maximising sub-centre.
    The head holds the centres as [C_local, k, D] (`fr_trainer/heads/subcenter.py`);
    `tools/subcenter_clean.py` lists the samples far from their class's dominant sub-centre
    and writes the k = 1 (plain ArcFace) centres."""

    def __init__(self, s: float = 64.0, m: float = 0.5, k: int = 3, gradient: str = "exact") -> None:
        super().__init__(s=s, m=m, gradient=gradient)
        if int(k) != k or k < 1:
            raise ValueError(f"subcenter_arcface needs a whole number of sub-centres k >= 1, got k={k}")
        self.subcenters = int(k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.subcenters}"


@register_margin("combined")
class Combined(Margin):
    """Combined margin: target `s (cos(m1 theta_y + m2) - m3)`, others `s cos_j`.

    Exact derivative (autograd): m1 sin(m1 theta + m2) / sin(theta) (sin floored at 1e-12).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                 gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (torch.cos(self.m1 * safe_acos(cos_t) + self.m2) - self.m3)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
