"""Norm-aware margins: adaface and magface (docs/losses.md). Both read the per-row norms
of the gathered fp32 embeddings [G] that the head passes (`needs_norms`); every rank holds
the whole gathered batch, so their batch statistics are the same on every rank without a
collective. Pure functions of local tensors."""

from __future__ import annotations

import math

import torch

from fr_trainer.margins._angular import arcface_value, safe_acos
from fr_trainer.margins.base import Margin
from fr_trainer.margins.registry import register_margin


@register_margin("adaface")
class AdaFace(Margin):
    """AdaFace (Kim et al., CVPR 2022): a margin adapted to the feature-norm quality proxy.

    norm_hat_i = clip(h (a_i - mu) / (sigma + eps), -1, 1), with a_i = clip(||x_i||, 0.001, 100)
    detached and mu, sigma running (EMA, factor t_alpha) mean and std of a over the global
    batch, buffers `batch_mean` (starts at 20) and `batch_std` (starts at 100), updated once
    per forward in training mode *before* use (left alone in eval mode). Target

        z_y = s (cos(clip(theta_y + g_angle, eps, pi - eps)) - g_add),
        g_angle = -m norm_hat,   g_add = m norm_hat + m,

    with theta_y = acos(clip(cos_y, -1 + eps, 1 - eps)), eps = 1e-3; others s cos_j.
    Defaults s = 64, m = 0.4, h = 0.333, t_alpha = 0.01. norm_hat carries no gradient (the
    paper detaches the norms); the target's derivative in cos is exact (autograd).
    The unbiased std of the batch (0 for a batch of one row).
    """

    needs_norms = True
    eps = 1e-3
    norm_clip = (0.001, 100.0)

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"adaface t_alpha must lie in (0, 1], got t_alpha={t_alpha}")
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def _safe_norms(self, norms: torch.Tensor) -> torch.Tensor:
        return norms.detach().clamp(*self.norm_clip)

    def update_norm_state(self, norms: torch.Tensor) -> None:
        if not self.training:
            return
        with torch.no_grad():
            safe = self._safe_norms(norms)
            std = safe.std() if safe.numel() > 1 else safe.new_zeros(())
            for buffer, value in ((self.batch_mean, safe.mean()), (self.batch_std, std)):
                buffer.copy_(self.t_alpha * value.to(buffer.dtype) + (1.0 - self.t_alpha) * buffer)

    def norm_hat(self, norms: torch.Tensor) -> torch.Tensor:
        """The quality proxy [N] in [-1, 1] (no gradient)."""
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        return ((self._safe_norms(norms) - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        if norms is None:
            raise ValueError("adaface needs the embedding norms (needs_norms); call it through the head")
        norm_hat = self.norm_hat(norms)
        theta = safe_acos(cos_t.clamp(-1.0 + self.eps, 1.0 - self.eps))
        theta = (theta - self.m * norm_hat).clamp(self.eps, math.pi - self.eps)
        return self.scale * (torch.cos(theta) - (self.m * norm_hat + self.m))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}, "
                f"batch_mean={float(self.batch_mean):.6g}, batch_std={float(self.batch_std):.6g}")


@register_margin("magface")
class MagFace(Margin):
    """MagFace (Meng et al., CVPR 2021): a magnitude-aware ArcFace margin and a regulariser.

    a_i = clip(||x_i||, l_a, u_a), m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m; target
    z_y = s cos(theta_y + m(a)) with ArcFace's th/mm fall-back at m(a); others s cos_j; and the
    loss adds lambda_g mean_G g(a), g(a) = 1/a + a / u_a^2 (mean over the global batch).
    Defaults l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35, s = 64.
    Gradient: exact in cos and in a (`norm_gradient`): the target's dependence on m(a) and
    lambda_g g'(a) reach the embeddings along x / ||x|| (zero outside [l_a, u_a], where a is
    clipped). `gradient="straight_through"`: dz/dcos = s and no gradient through m(a); the
    regulariser's gradient is kept.
    """

    needs_norms = True
    norm_gradient = True

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0, gradient: str = "exact") -> None:
        super().__init__(scale=s, gradient=gradient)
        if not 0.0 < l_a < u_a:
            raise ValueError(f"magface needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if lambda_g < 0:
            raise ValueError(f"magface lambda_g must be >= 0, got lambda_g={lambda_g}")
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def clipped(self, norms: torch.Tensor) -> torch.Tensor:
        return norms.clamp(self.l_a, self.u_a)

    def margin_of(self, norms: torch.Tensor) -> torch.Tensor:
        """m(a) [N] (differentiable in the norms)."""
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return slope * (self.clipped(norms) - self.l_a) + self.l_m

    def target_value(self, cos_t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        if norms is None:
            raise ValueError("magface needs the embedding norms (needs_norms); call it through the head")
        return self.scale * arcface_value(cos_t, self.margin_of(norms))

    def norm_penalty(self, norms: torch.Tensor) -> torch.Tensor:
        a = self.clipped(norms)
        return self.lambda_g * (1.0 / a + a / self.u_a ** 2)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
                f"u_m={self.u_m}, lambda_g={self.lambda_g}")
