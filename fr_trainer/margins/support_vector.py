"""Support-vector guided margins: sv_softmax, sv_cosface, sv_arcface (SV-X-Softmax) and
mv_softmax (LOSSES.md, table "Margin-softmax family").

Every one has a target logit `s f(m, theta_y)` and non-target logits

    z_j = s (t cos_j + t - 1)   if cos_j > f(m, theta_y)   (j is a "support vector")
    z_j = s cos_j               otherwise,

where `f` is the unscaled target: `cos_y` (sv_softmax), `cos_y - m` (sv_cosface,
mv_softmax's default), or ArcFace's `cos(theta_y + m)` with the th/mm fall-back
(sv_arcface, mv_softmax with `target="arcface"`). The extra term is the log of the
paper's indicator re-weighting `h = exp(s (t - 1)(cos_j + 1))` applied to the
mis-classified classes. With `t = 1` every one of them is its plain counterpart
(sv_softmax with t = 1 is NormFace, sv_cosface is CosFace, sv_arcface is ArcFace).

Sharding. The mask of class j needs `f(m, theta_y)` of every row, whose target column may
live on another rank: `needs_global_target = True`, so the head all-reduces the G target
cosines once per step and passes them as `target_cos`.

Gradient semantics. The support-vector mask is a comparison and carries no gradient (it
is piecewise constant, as in the papers); there is no path from a non-target logit back
to the target cosine. Otherwise the gradient is exact: d z_j / d cos_j = s t on support
vectors and s elsewhere; the target derivative is CosFace's (s) or ArcFace's exact one
(autograd of `boundary`; `gradient="straight_through"` makes it s, as for `arcface`).
"""

from __future__ import annotations

import torch

from fr_trainer.margins._angular import arcface_value
from fr_trainer.margins.base import Margin, indicator_above
from fr_trainer.margins.registry import register_margin

TARGET_KINDS = ("cosface", "arcface")


class SupportVectorMargin(Margin):
    """Base of the SV/MV margins: subclasses define the unscaled target `boundary`."""

    linear_nontarget = False
    needs_global_target = True

    def __init__(self, s: float, t: float, gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        if not t >= 1.0:
            raise ValueError(f"t must be >= 1 (t = 1 switches the support-vector term off), got t={t}")
        self.t = float(t)

    def boundary(self, cos_t: torch.Tensor) -> torch.Tensor:
        """f(m, theta_y) [N] (unscaled, differentiable)."""
        return cos_t

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * self.boundary(cos_t)

    def nontarget_rows(self, target_cos: torch.Tensor | None) -> torch.Tensor | None:
        """The support-vector boundary f(m, theta_y) of each row [N]."""
        if target_cos is None:
            return None
        with torch.no_grad():
            return self.boundary(target_cos.detach())

    def support_vector_mask(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """[N, c] in cos's dtype, 1 where cos_ij > f(m, theta_{y_i}), else 0, from cosines
        [N, c] and the rows' boundaries [N] (`nontarget_rows`).

        (Also true at a row's own target column when f(cos_y) < cos_y; the head replaces
        that column by the target logit.)
        """
        if rows is None:
            raise ValueError(f"{type(self).__name__} needs the target cosine of every row "
                             "(needs_global_target); call it through the head")
        return indicator_above(cos, rows)

    def nontarget_logits(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        bump = self.support_vector_mask(cos, rows)
        bump.addcmul_(bump, cos)  # cos + 1 on support vectors, 0 elsewhere
        return cos.add_(bump, alpha=self.t - 1.0).mul_(self.scale)

    def nontarget_grad(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        mask = self.support_vector_mask(cos, rows)
        return mask.mul_(self.scale * (self.t - 1.0)).add_(self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, t={self.t}"


@register_margin("sv_softmax")
class SVSoftmax(SupportVectorMargin):
    """SV-Softmax: target `s cos_y`; support vectors are the classes with cos_j > cos_y."""

    def __init__(self, s: float = 32.0, t: float = 1.2, gradient: str = "exact") -> None:
        super().__init__(s=s, t=t, gradient=gradient)


@register_margin("sv_cosface")
class SVCosFace(SupportVectorMargin):
    """SV-AM-Softmax: target `s (cos_y - m)`; support vectors: cos_j > cos_y - m."""

    def __init__(self, s: float = 32.0, m: float = 0.35, t: float = 1.2, gradient: str = "exact") -> None:
        super().__init__(s=s, t=t, gradient=gradient)
        self.m = float(m)

    def boundary(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


@register_margin("sv_arcface")
class SVArcFace(SupportVectorMargin):
    """SV-Arc-Softmax: ArcFace target `s cos(theta_y + m)` (th/mm fall-back, `easy_margin`
    as for `arcface`); support vectors: cos_j > that target / s."""

    def __init__(self, s: float = 32.0, m: float = 0.5, t: float = 1.2, easy_margin: bool = False,
                 gradient: str = "exact") -> None:
        super().__init__(s=s, t=t, gradient=gradient)
        self.m, self.easy_margin = float(m), bool(easy_margin)

    def boundary(self, cos_t: torch.Tensor) -> torch.Tensor:
        return arcface_value(cos_t, self.m, self.easy_margin)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, easy_margin={self.easy_margin}"


@register_margin("mv_softmax")
class MVSoftmax(SupportVectorMargin):
    """MV-Softmax (the "adaptive" variant of the AAAI 2020 paper): the SV-X form with
    s = 32, m = 0.35, t = 1.12. `target="cosface"` (default, MV-AM-Softmax) or
    `"arcface"` (MV-Arc-Softmax, with `easy_margin` as for `arcface`)."""

    def __init__(self, s: float = 32.0, m: float = 0.35, t: float = 1.12, target: str = "cosface",
                 easy_margin: bool = False, gradient: str = "exact") -> None:
        super().__init__(s=s, t=t, gradient=gradient)
        if target not in TARGET_KINDS:
            raise ValueError(f"mv_softmax target={target!r} is not one of {TARGET_KINDS}")
        if easy_margin and target != "arcface":
            raise ValueError("easy_margin=True only applies to target='arcface'; drop it or set target='arcface'")
        self.m, self.kind, self.easy_margin = float(m), target, bool(easy_margin)

    def boundary(self, cos_t: torch.Tensor) -> torch.Tensor:
        if self.kind == "arcface":
            return arcface_value(cos_t, self.m, self.easy_margin)
        return cos_t - self.m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, target={self.kind!r}, easy_margin={self.easy_margin}"
