"""A plain single-process dense reference of the margin-softmax heads, written as simply
as possible with autograd (no sharding, no fusion), for the equivalence tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_target_logit(name: str, cos_t: torch.Tensor, kw: dict, num_classes: int) -> torch.Tensor:
    """The target logit of LOSSES.md's table, straight from the formula."""
    if name == "normface":
        return kw.get("s", 30.0) * cos_t
    if name == "coco":
        alpha = kw.get("alpha", 0.5 * math.log(num_classes - 1) + 3.0)
        return alpha * cos_t
    if name == "cosface":
        return kw.get("s", 64.0) * (cos_t - kw.get("m", 0.35))
    if name == "arcface":
        s, m = kw.get("s", 64.0), kw.get("m", 0.5)
        shifted = torch.cos(torch.acos(cos_t) + m)
        if kw.get("easy_margin", False):
            return s * torch.where(cos_t > 0, shifted, cos_t)
        fallback = cos_t - math.sin(math.pi - m) * m
        return s * torch.where(cos_t > math.cos(math.pi - m), shifted, fallback)
    if name == "combined":
        s, m1, m2, m3 = kw.get("s", 64.0), kw.get("m1", 1.0), kw.get("m2", 0.3), kw.get("m3", 0.2)
        return s * (torch.cos(m1 * torch.acos(cos_t) + m2) - m3)
    raise KeyError(name)


def reference_scale(name: str, kw: dict, num_classes: int) -> float:
    if name == "coco":
        return kw.get("alpha", 0.5 * math.log(num_classes - 1) + 3.0)
    return {"normface": 30.0, "softmax": 1.0}.get(name, kw.get("s", 64.0)) if "s" not in kw else kw["s"]


def reference_loss(name: str, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   kw: dict | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the batch of the margin head `name` with all K classes."""
    kw = kw or {}
    num_classes = weight.shape[0]
    if name == "softmax":
        return F.cross_entropy(x @ weight.t() + bias, labels)
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    cos_t = cos.gather(1, labels[:, None]).squeeze(1)
    logits = reference_scale(name, kw, num_classes) * cos
    target = reference_target_logit(name, cos_t, kw, num_classes)
    logits = logits.scatter(1, labels[:, None], target[:, None])
    return F.cross_entropy(logits, labels)
