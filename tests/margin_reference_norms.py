"""Plain dense single-process references (autograd on the full [G, K] matrix, no sharding,
no fusion) for issue 11's additions: inter-class filtering, adaface, magface and
subcenter_arcface, written from docs/losses.md."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from head_reference import reference_scale, reference_target_logit
from margin_reference_extra import DEFAULTS, extra_logits

ADAFACE = {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01}
MAGFACE = {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0}
ADAFACE_EPS = 1e-3


def filtered_cosines(cos: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """Non-target cosines above `threshold` replaced by a constant 0 (no gradient)."""
    if threshold <= 0:
        return cos
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    dirty = (cos.detach() > threshold) & ~onehot
    return torch.where(dirty, torch.zeros_like(cos), cos)


def _arc(cos_t: torch.Tensor, m) -> torch.Tensor:
    """cos(theta + m) with the th/mm fall-back, m a float or per row."""
    m = torch.as_tensor(m, dtype=cos_t.dtype)
    shifted = torch.cos(torch.acos(cos_t) + m)
    return torch.where(cos_t > torch.cos(math.pi - m), shifted, cos_t - torch.sin(math.pi - m) * m)


def adaface_step(norms: torch.Tensor, state: dict, kw: dict) -> tuple[torch.Tensor, dict]:
    """(norm_hat [G], the new running mean / std) from the batch norms."""
    kw = {**ADAFACE, **kw}
    safe = norms.detach().clamp(0.001, 100.0)
    mean = kw["t_alpha"] * safe.mean() + (1 - kw["t_alpha"]) * state.get("mean", 20.0)
    std = kw["t_alpha"] * safe.std() + (1 - kw["t_alpha"]) * state.get("std", 100.0)
    norm_hat = ((safe - mean) / (std + ADAFACE_EPS) * kw["h"]).clamp(-1.0, 1.0)
    return norm_hat, {"mean": mean, "std": std}


def norm_target(name: str, cos_t: torch.Tensor, norms: torch.Tensor, kw: dict, state: dict
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(target logit [G], extra loss (scalar), new state) of adaface / magface."""
    if name == "adaface":
        kw = {**ADAFACE, **kw}
        norm_hat, state = adaface_step(norms, state, kw)
        c = cos_t.clamp(-1 + ADAFACE_EPS, 1 - ADAFACE_EPS)
        theta = (torch.acos(c) - kw["m"] * norm_hat).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
        return kw["s"] * (torch.cos(theta) - (kw["m"] * norm_hat + kw["m"])), cos_t.new_zeros(()), state
    kw = {**MAGFACE, **kw}
    a = norms.clamp(kw["l_a"], kw["u_a"])
    m = (kw["u_m"] - kw["l_m"]) / (kw["u_a"] - kw["l_a"]) * (a - kw["l_a"]) + kw["l_m"]
    g = 1.0 / a + a / kw["u_a"] ** 2
    target = kw["s"] * _arc(cos_t, m)
    if kw.get("gradient") == "straight_through":  # the margin's value, the gradient of s cos_y
        target = target.detach() + kw["s"] * (cos_t - cos_t.detach())
    return target, kw["lambda_g"] * g.mean(), state


def reference_loss(name: str, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, kw: dict,
                   threshold: float = 0.0, state: dict | None = None) -> tuple[torch.Tensor, dict]:
    """(mean loss over the batch, margin state after the step). `weight` is [K, D], or
    [K, k, D] for subcenter_arcface (class cosine = max over its k sub-centres)."""
    state = dict(state or {})
    xh = F.normalize(x, dim=1)
    if name == "subcenter_arcface":
        cos = torch.einsum("gd,ckd->gck", xh, F.normalize(weight, dim=2)).amax(dim=2)
    else:
        cos = xh @ F.normalize(weight, dim=1).t()
    cos = filtered_cosines(cos, labels, threshold)
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    cos_t = cos.gather(1, labels[:, None]).squeeze(1)
    extra = x.new_zeros(())
    if name in DEFAULTS:
        logits, t = extra_logits(name, cos, labels, kw, state.get("t", 0.0))
        state["t"] = t
        return F.cross_entropy(logits, labels), state
    if name in ("adaface", "magface"):
        target, extra, state = norm_target(name, cos_t, x.norm(dim=1), kw, state)
        scale = kw.get("s", 64.0)
    elif name == "subcenter_arcface":
        scale = kw.get("s", 64.0)
        target = scale * _arc(cos_t, kw.get("m", 0.5))
        if kw.get("gradient") == "straight_through":
            target = target.detach() + scale * (cos_t - cos_t.detach())
    else:
        scale = reference_scale(name, kw, cos.shape[1])
        target = reference_target_logit(name, cos_t, kw, cos.shape[1])
    logits = torch.where(onehot, target[:, None].expand_as(cos), scale * cos)
    return F.cross_entropy(logits, labels) + extra, state
