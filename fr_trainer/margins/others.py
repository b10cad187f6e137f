"""sphereface, circle (class-level) and curricularface (LOSSES.md, table "Margin-softmax
family"). Pure functions of local tensors; formulas, defaults and gradient semantics in
each class's docstring.
"""

from __future__ import annotations

import math

import torch

from fr_trainer.margins._angular import arcface_value, cos_plus_m, safe_acos
from fr_trainer.margins.base import Margin, indicator_above
from fr_trainer.margins.registry import register_margin


def _chebyshev(cos: torch.Tensor, order: int) -> torch.Tensor:
    """T_order(cos) = cos(order theta) for an integer order >= 1, by the three-term
    recurrence (a polynomial of cos: its autograd derivative, order U_{order-1}(cos), is
    exact at theta = 0 and pi)."""
    t_prev, t_cur = torch.ones_like(cos), cos
    for _ in range(order - 1):
        t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
    return t_cur


@register_margin("sphereface")
class SphereFace(Margin):
    """SphereFace (A-Softmax) on normalised features: target `s psi(theta_y)`,
    `psi(theta) = (-1)^k cos(m theta) - 2k` for theta in [k pi/m, (k+1) pi/m]; others `s cos_j`.

    psi is continuous and decreasing on [0, pi]. Exact gradient (default, autograd):
    d psi / d cos = (-1)^k m sin(m theta) / sin(theta); for an integer m, cos(m theta) is
    the Chebyshev polynomial T_m(cos), whose derivative m U_{m-1}(cos) is exact at theta = 0
    and pi; for a non-integer m it goes through acos (sin floored at 1e-12).
    `gradient="straight_through"`: d z / d cos = s. The scale s defaults to 64 (as the other
    normalised margins of the table); the original's lambda annealing is not included.
    """

    def __init__(self, s: float = 64.0, m: float = 4.0, gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        if not m >= 1.0:
            raise ValueError(f"sphereface needs m >= 1 (m = 1 is NormFace), got m={m}")
        self.m = float(m)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        cos_t = cos_t.clamp(-1.0, 1.0)
        theta = torch.acos(cos_t.detach())  # the interval index k carries no gradient
        # the last interval [k pi/m, pi] is closed: theta = pi belongs to k = ceil(m) - 1
        k = torch.floor(self.m * theta / math.pi).clamp_max_(math.ceil(self.m) - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
        if self.m.is_integer():
            cos_m_theta = _chebyshev(cos_t, int(self.m))
        else:
            cos_m_theta = torch.cos(self.m * safe_acos(cos_t))
        return self.scale * (sign * cos_m_theta - 2.0 * k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


@register_margin("circle")
class CircleClassLevel(Margin):
    """Circle loss with class-level labels: CE of the logits

        z_y = gamma a_p (cos_y - d_p),  a_p = max(0, 1 + m - cos_y),  d_p = 1 - m
        z_j = gamma a_n (cos_j - d_n),  a_n = max(0, cos_j + m),      d_n = m,

    i.e. `softplus(logsumexp_j z_j - z_y)` per sample (the paper's unified form).
    Defaults gamma = 256, m = 0.25. The head works in log space, so gamma = 256 (logits
    near +-1000) stays finite.

    Gradient semantics (the paper's): the self-paced weights a_p and a_n are detached
    (treated as constants), so d z_y / d cos_y = gamma a_p and d z_j / d cos_j = gamma a_n.
    `gradient="straight_through"` makes the target derivative gamma.
    Nothing extra is needed when sharded (each non-target logit is a function of its own
    cosine), but the non-target logits are not linear: the head recomputes them in backward.
    """

    linear_nontarget = False

    def __init__(self, gamma: float = 256.0, m: float = 0.25, gradient: str = "exact") -> None:
        super().__init__(scale=gamma, gradient=gradient)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"circle's relaxation m must lie in [0, 1), got m={m}")
        self.gamma, self.m = float(gamma), float(m)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        a_p = (1.0 + self.m - cos_t.detach()).clamp_min(0.0)  # self-paced weight, detached
        return self.gamma * a_p * (cos_t - (1.0 - self.m))

    def nontarget_logits(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        a_n = (cos + self.m).clamp_min_(0.0)
        return cos.sub_(self.m).mul_(a_n).mul_(self.gamma)

    def nontarget_grad(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return (cos + self.m).clamp_min_(0.0).mul_(self.gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, m={self.m}, gradient={self.gradient!r}"


@register_margin("curricularface")
class CurricularFace(Margin):
    """CurricularFace: target `s cos(theta_y + m)` with ArcFace's th/mm fall-back; others

        z_j = s cos_j               if cos(theta_y + m) >= cos_j   (easy)
        z_j = s cos_j (t + cos_j)   otherwise                      (hard)

    with the mask against the plain `cos(theta_y + m)` (no fall-back), as in the paper.
    `t` is a registered buffer (saved in checkpoints) that starts at 0 and, once per
    forward in training mode and before use, becomes `0.99 t + 0.01 mean_G(cos_y)`, the
    mean over the *global* batch of the raw target cosines: identical on every rank. In
    eval mode `t` is left as it is (like BatchNorm's running statistics).

    Sharding: `needs_global_target = True` (the head all-reduces the G target cosines,
    used both for the mask and for t). The head calls `update_state` once in forward;
    backward recomputes the non-target logits with the same t, so do not run a second
    forward of the same head between a forward and its backward.

    Gradient semantics: t and the hard/easy mask carry no gradient; otherwise exact:
    d z_j / d cos_j = s (t + 2 cos_j) on hard classes, s on easy ones; the target's is
    ArcFace's exact derivative (`gradient="straight_through"`: s).
    """

    linear_nontarget = False
    needs_global_target = True
    formula_temporaries = 2  # nontarget_grad holds the hard mask and 2 cos + t - 1 at once
    momentum = 0.01

    def __init__(self, s: float = 64.0, m: float = 0.5, gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        self.m = float(m)
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))

    def update_state(self, target_cos: torch.Tensor) -> None:
        if self.training:
            with torch.no_grad():
                mean = target_cos.detach().mean().to(self.t.dtype)
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * mean)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * arcface_value(cos_t, self.m)

    def nontarget_rows(self, target_cos: torch.Tensor | None) -> torch.Tensor | None:
        """The hard/easy threshold cos(theta_y + m) of each row [N]."""
        if target_cos is None:
            return None
        with torch.no_grad():
            return cos_plus_m(target_cos.detach(), self.m)

    def hard_mask(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """[N, c] in cos's dtype, 1 where cos_ij > cos(theta_{y_i} + m), else 0, from [N, c]
        cosines and the rows' thresholds [N] (`nontarget_rows`)."""
        if rows is None:
            raise ValueError("curricularface needs the target cosine of every row "
                             "(needs_global_target); call it through the head")
        return indicator_above(cos, rows)

    def nontarget_logits(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        hard = self.hard_mask(cos, rows)
        t = self.t.to(cos.dtype)
        bump = hard.mul_(cos + (t - 1.0)).mul_(cos)  # cos (t + cos) - cos on hard classes
        return cos.add_(bump).mul_(self.scale)

    def nontarget_grad(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        hard = self.hard_mask(cos, rows)
        t = self.t.to(cos.dtype)
        bump = hard.mul_(torch.add(t - 1.0, cos, alpha=2.0))  # (t + 2 cos) - 1 on hard classes
        return bump.add_(1.0).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, t={float(self.t):.6g}"
