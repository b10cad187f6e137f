"""The margin interface: how a margin turns cosines into logits.

A softmax-type head produces a logit row `z` per sample and applies cross-entropy. A
margin says how the target cosine becomes the target logit and how the other cosines
become their logits (`nontarget_logits`, with `nontarget_grad` for the fused head's
backward; what they read of each row, a threshold from the target cosine, say, comes from
`nontarget_rows`, once per step). Margins are pure functions of local tensors: they never communicate.

A new margin needs only its formula. It overrides `target_value(cos_t) -> logit`, a
row-wise function of the [G] target cosines written with torch operations; the
derivative dz/dcos the fused head needs comes from `torch.autograd.grad` on that [G]
vector (G elements: negligible next to the [G, C] passes), run under `enable_grad` on a
detached copy because the head calls it inside an autograd.Function's forward. Use
`safe_sin` / `safe_acos` of `margins._angular` for 1/sin(theta) terms so that the
derivative stays finite at cos = +-1. A margin may still override `target_exact` with a
hand-written derivative; `nontarget_grad` ([G, C] blocks) stays hand-written where the
non-target logits are not `s cos`.

Norm-aware margins (AdaFace, MagFace) set `needs_norms = True`: the head then passes the
per-row norms of the gathered fp32 embeddings [G] (before normalisation) as
`target_value(cos_t, norms)`, calls `update_norm_state(norms)` once per forward, adds
`norm_penalty(norms)` (a [G] per-row loss, averaged over the global batch) when it is not
None, and with `norm_gradient = True` chains dz/dnorm (autograd too) back to x along x/||x||.

Gradient semantics. `gradient="exact"` (the default wherever a margin has a choice)
returns the true derivative of the target logit w.r.t. the cosine.
`gradient="straight_through"` pretends the margin is a constant shift: dz/dcos = s (what
insightface's current ArcFace does by applying the margin under no_grad), and no
gradient reaches the norms through the target.
"""

from __future__ import annotations

import torch
from torch import nn

GRADIENT_MODES = ("exact", "straight_through")


def indicator_above(cos: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """1 where cos_ij > threshold_i (or > a float threshold), else 0, in cos's dtype [N, c].

    A float mask for the non-target formulas, not a boolean one: on a CPU a comparison
    written straight into a float tensor runs at the speed of a float `mul` (7.7 ms at
    [256, 50,000], one thread), while a boolean mask costs 18 ms to make and 27-37 ms more
    to multiply by or convert. The comparison carries no gradient."""
    if torch.is_tensor(threshold):
        threshold = threshold[:, None]
    if torch.compiler.is_compiling():  # inductor fuses the comparison either way
        return (cos > threshold).to(cos.dtype)
    return torch.gt(cos, threshold, out=torch.empty_like(cos, requires_grad=False))


class Margin(nn.Module):
    """Base of every margin. Subclasses set `scale` and override `target_value`.

    Attributes:
        normalized: True when the head feeds cosines (normalised features and centres);
            False for the plain softmax, which feeds `w . x + b`.
        has_bias: the head gives the centres a bias (plain softmax only).
        linear_nontarget: the non-target logits are `scale * cos`; the head may then keep
            the softmax from the forward pass instead of recomputing the logits.
        needs_global_target: every shard needs the target cosine of every row (SV, MV,
            CurricularFace): the head all-reduces it (G floats) before the non-targets.
        needs_norms: the target depends on the embedding norms [G] (AdaFace, MagFace).
        norm_gradient: the target and `norm_penalty` carry a gradient to the norms (MagFace).
        subcenters: centres per class (Sub-center ArcFace's k); the class cosine is the max
            over them. 1 for every other margin.
        formula_temporaries: block-sized tensors that `nontarget_logits` or `nontarget_grad`
            (a non-linear margin's) holds at once besides its input and result; under the
            CUDA block policy a block is the whole [G, C] buffer, so the memory planner
            (`fr_trainer.plan`) counts them.
    """

    normalized: bool = True
    has_bias: bool = False
    linear_nontarget: bool = True
    needs_global_target: bool = False
    needs_norms: bool = False
    norm_gradient: bool = False
    subcenters: int = 1
    formula_temporaries: int = 1

    def __init__(self, scale: float, gradient: str = "exact") -> None:
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient={gradient!r} is not one of {GRADIENT_MODES}")
        if not scale > 0:
            raise ValueError(f"the scale must be positive, got {scale}")
        self.scale = float(scale)
        self.gradient = gradient

    # ---- the formula: what a margin defines ------------------------------------------
    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Target logits [N] from target cosines [N] (and norms [N] when `needs_norms`),
        row-wise and differentiable; default: no margin, `scale * cos`."""
        return self.scale * cos_t

    # ---- derived by the base class ----------------------------------------------------
    def target_terms(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logit [N], dlogit/dcos [N], dlogit/dnorm [N] or None) under the gradient mode.

        The derivatives are autograd's on the [N] vectors (see the module docstring)."""
        if type(self).target_exact is not Margin.target_exact:  # a hand-written derivative
            logit, d_cos = self.target_exact(cos_t, norms)
            d_norm = None
        else:
            logit, d_cos, d_norm = self._autograd_target(cos_t, norms)
        if self.gradient == "straight_through":
            d_cos, d_norm = torch.full_like(cos_t, self.scale), None
        return logit, d_cos, d_norm

    def target(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits and d(logit)/d(cos), both [N], from target cosines [N]."""
        logit, d_cos, _ = self.target_terms(cos_t, norms)
        return logit, d_cos

    def target_exact(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits [N] and their exact derivative [N] (autograd of `target_value`
        unless a subclass writes it by hand)."""
        logit, d_cos, _ = self._autograd_target(cos_t, norms)
        return logit, d_cos

    def _autograd_target(self, cos_t: torch.Tensor, norms: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        want_norm = self.norm_gradient and norms is not None
        with torch.enable_grad():
            cos = cos_t.detach().clone().requires_grad_(True)
            a = None if norms is None else norms.detach().clone().requires_grad_(want_norm)
            logit = self.target_value(cos, a) if self.needs_norms else self.target_value(cos)
            inputs = (cos, a) if want_norm else (cos,)
            grads = (torch.autograd.grad(logit.sum(), inputs, allow_unused=True) if logit.requires_grad
                     else (None,) * len(inputs))
        d_cos = torch.zeros_like(cos_t) if grads[0] is None else grads[0]
        d_norm = None
        if want_norm:
            d_norm = torch.zeros_like(norms) if grads[1] is None else grads[1]
        return logit.detach(), d_cos, d_norm

    # ---- norm-aware margins ---------------------------------------------------------------
    def norm_penalty(self, norms: torch.Tensor) -> torch.Tensor | None:
        """A per-row loss term [N] of the norms added to the loss (mean over the batch);
        None (the default) for none. Differentiable when `norm_gradient`."""
        return None

    def norm_penalty_terms(self, norms: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(`norm_penalty(norms)` [N] detached, its derivative [N] by autograd when
        `norm_gradient`), or (None, None) without a penalty."""
        with torch.enable_grad():
            a = norms.detach().clone().requires_grad_(self.norm_gradient)
            penalty = self.norm_penalty(a)
            if penalty is None:
                return None, None
            derivative = None
            if self.norm_gradient and penalty.requires_grad:
                (derivative,) = torch.autograd.grad(penalty.sum(), (a,))
        return penalty.detach(), derivative

    def update_norm_state(self, norms: torch.Tensor) -> None:
        """Called once per forward with the norms of the global batch when `needs_norms`
        (AdaFace's running statistics); no-op by default."""

    # ---- non-target logits ---------------------------------------------------------------
    def nontarget_rows(self, target_cos: torch.Tensor | None) -> torch.Tensor | None:
        """What the non-target formula reads of each row [N] (a threshold, say), from the
        target cosines [N] when `needs_global_target` (None otherwise): the head computes it
        once per step for the whole batch and passes row slices of it to `nontarget_logits`
        and `nontarget_grad` as `rows`, which then never redo per-row work block by block.
        By default the target cosines themselves. Carries no gradient."""
        return target_cos

    def nontarget_logits(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Logits of a block of cosines [N, c]; may work in place on `cos`. `rows` [N]: the
        block's rows of `nontarget_rows(target_cos)`."""
        return cos.mul_(self.scale)

    def nontarget_grad(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | float:
        """d(logit)/d(cos) for a block of non-target cosines [N, c] (or a scalar); `rows` as
        for `nontarget_logits`. A new tensor or a number, never a view of `cos`: the bf16
        head takes it first and then writes the logits over the same cosines."""
        return self.scale

    def update_state(self, target_cos: torch.Tensor) -> None:
        """Called once per forward with the global target cosines when
        `needs_global_target` (CurricularFace's running t); no-op by default."""

    def extra_repr(self) -> str:
        return f"s={self.scale}, gradient={self.gradient!r}"
