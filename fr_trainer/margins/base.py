"""The margin interface: how a margin turns cosines into logits.

A softmax-type head produces a logit row `z` per sample and applies cross-entropy. A
margin says how the target cosine becomes the target logit (`target`) and how the other
cosines become their logits (`nontarget_logits`), with the derivatives the fused head
needs (`target` returns dz/dcos; `nontarget_grad`). Margins are pure functions of local
tensors: they never communicate.

Gradient semantics. `gradient="exact"` (the default wherever a margin has a choice)
returns the true derivative of the target logit w.r.t. the cosine.
`gradient="straight_through"` pretends the margin is a constant shift: dz/dcos = s (what
insightface's current ArcFace does by applying the margin under no_grad).
"""

from __future__ import annotations

import torch
from torch import nn

GRADIENT_MODES = ("exact", "straight_through")


class Margin(nn.Module):
    """Base of every margin. Subclasses set `scale` and override `target_exact`.

    Attributes:
        normalized: True when the head feeds cosines (normalised features and centres);
            False for the plain softmax, which feeds `w . x + b`.
        has_bias: the head gives the centres a bias (plain softmax only).
        linear_nontarget: the non-target logits are `scale * cos`; the head may then keep
            the softmax from the forward pass instead of recomputing the logits.
        needs_global_target: every shard needs the target cosine of every row (SV, MV,
            CurricularFace): the head all-reduces it (G floats) before the non-targets.
    """

    normalized: bool = True
    has_bias: bool = False
    linear_nontarget: bool = True
    needs_global_target: bool = False

    def __init__(self, scale: float, gradient: str = "exact") -> None:
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient={gradient!r} is not one of {GRADIENT_MODES}")
        if not scale > 0:
            raise ValueError(f"the scale must be positive, got {scale}")
        self.scale = float(scale)
        self.gradient = gradient

    def target(self, cos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits and d(logit)/d(cos), both [N], from target cosines [N]."""
        logit, derivative = self.target_exact(cos_t)
        if self.gradient == "straight_through":
            derivative = torch.full_like(cos_t, self.scale)
        return logit, derivative

    def target_exact(self, cos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits [N] and their exact derivative [N]; default: no margin."""
        return self.scale * cos_t, torch.full_like(cos_t, self.scale)

    def nontarget_logits(self, cos: torch.Tensor, target_cos: torch.Tensor | None) -> torch.Tensor:
        """Logits of a block of cosines [N, c]; may work in place on `cos`.

        `target_cos` [N] is the target cosine of each row when `needs_global_target`.
        """
        return cos.mul_(self.scale)

    def nontarget_grad(self, cos: torch.Tensor, target_cos: torch.Tensor | None) -> torch.Tensor | float:
        """d(logit)/d(cos) for a block of non-target cosines [N, c] (or a scalar)."""
        return self.scale

    def update_state(self, target_cos: torch.Tensor) -> None:
        """Called once per forward with the global target cosines when
        `needs_global_target` (CurricularFace's running t); no-op by default."""

    def extra_repr(self) -> str:
        return f"s={self.scale}, gradient={self.gradient!r}"
