"""Plain dense single-process references for the margins of issue 5 (SV/MV, sphereface,
circle, curricularface), written straight from LOSSES.md with autograd: a full [G, K]
cosine matrix, masks and self-paced weights computed on detached copies, no fusion.
Below them, naive loop references of the regularizers (one anchor / pair / triplet at a
time, torch scalars so that autograd gives reference gradients)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULTS = {
    "sv_softmax": {"s": 32.0, "t": 1.2},
    "sv_cosface": {"s": 32.0, "m": 0.35, "t": 1.2},
    "sv_arcface": {"s": 32.0, "m": 0.5, "t": 1.2, "easy_margin": False},
    "mv_softmax": {"s": 32.0, "m": 0.35, "t": 1.12, "target": "cosface", "easy_margin": False},
    "sphereface": {"s": 64.0, "m": 4.0},
    "circle": {"gamma": 256.0, "m": 0.25},
    "curricularface": {"s": 64.0, "m": 0.5},
}


def arc_target(cos_t: torch.Tensor, m: float, easy_margin: bool) -> torch.Tensor:
    """cos(theta + m) with ArcFace's fall-back (th/mm, or plain cos with easy_margin)."""
    shifted = torch.cos(torch.acos(cos_t) + m)
    if easy_margin:
        return torch.where(cos_t > 0, shifted, cos_t)
    return torch.where(cos_t > math.cos(math.pi - m), shifted, cos_t - math.sin(math.pi - m) * m)


def sv_target(name: str, cos_t: torch.Tensor, kw: dict) -> torch.Tensor:
    """f(m, theta_y), unscaled."""
    if name == "sv_softmax":
        return cos_t
    if name == "sv_cosface" or (name == "mv_softmax" and kw["target"] == "cosface"):
        return cos_t - kw["m"]
    return arc_target(cos_t, kw["m"], kw["easy_margin"])


def psi(theta: torch.Tensor, m: float) -> torch.Tensor:
    k = torch.floor(m * theta.detach() / math.pi)
    return (-1.0) ** k * torch.cos(m * theta) - 2.0 * k


def extra_logits(name: str, cos: torch.Tensor, labels: torch.Tensor, kw: dict,
                 t_prev: float = 0.0) -> tuple[torch.Tensor, float]:
    """Logits [G, K] of margin `name` from cosines [G, K]; returns (logits, curricular t)."""
    kw = {**DEFAULTS[name], **kw}
    straight_through = kw.pop("gradient", "exact") == "straight_through"
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    cos_t = cos.gather(1, labels[:, None]).squeeze(1)
    t_new = t_prev
    if name in ("sv_softmax", "sv_cosface", "sv_arcface", "mv_softmax"):
        s, t = kw["s"], kw["t"]
        f = sv_target(name, cos_t, kw)
        support = (cos.detach() > f.detach()[:, None])
        others = torch.where(support, s * (t * cos + t - 1.0), s * cos)
        target = s * f
    elif name == "sphereface":
        others = kw["s"] * cos
        target = kw["s"] * psi(torch.acos(cos_t), kw["m"])
    elif name == "circle":
        gamma, m = kw["gamma"], kw["m"]
        a_n = (cos.detach() + m).clamp_min(0.0)
        others = gamma * a_n * (cos - m)
        a_p = (1.0 + m - cos_t.detach()).clamp_min(0.0)
        target = gamma * a_p * (cos_t - (1.0 - m))
    elif name == "curricularface":
        s, m = kw["s"], kw["m"]
        t_new = 0.99 * t_prev + 0.01 * float(cos_t.detach().mean())
        boundary = torch.cos(torch.acos(cos_t.detach()) + m)
        hard = cos.detach() > boundary[:, None]
        others = torch.where(hard, s * cos * (t_new + cos), s * cos)
        target = s * arc_target(cos_t, m, False)
    else:
        raise KeyError(name)
    if straight_through:  # the margin's value, the gradient of `scale * cos_y`
        scale = kw["gamma"] if name == "circle" else kw["s"]
        target = target.detach() + scale * (cos_t - cos_t.detach())
    logits = torch.where(onehot, target[:, None].expand_as(cos), others)
    return logits, t_new


def extra_reference_loss(name: str, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         kw: dict | None = None, t_prev: float = 0.0) -> tuple[torch.Tensor, float]:
    """(mean CE over the batch of margin `name` over all K classes, curricular t after it)."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    logits, t_new = extra_logits(name, cos, labels, kw or {}, t_prev)
    return F.cross_entropy(logits, labels), t_new


# ---- regularizers: naive loops ------------------------------------------------------


def naive_center(x: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, lam: float) -> torch.Tensor:
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        total = total + 0.5 * lam * ((x[i] - centres[int(y[i])]) ** 2).sum()
    return total / x.shape[0]


def naive_center_update(x: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, alpha: float) -> torch.Tensor:
    out = centres.clone()
    for j in range(centres.shape[0]):
        members = [i for i in range(x.shape[0]) if int(y[i]) == j]
        delta = sum((centres[j] - x[i] for i in members), torch.zeros_like(centres[j]))
        out[j] = centres[j] - alpha * delta / (1 + len(members))
    return out


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def naive_circle(x: torch.Tensor, y: torch.Tensor, gamma: float, m: float) -> torch.Tensor:
    losses = []
    for a in range(x.shape[0]):
        zp, zn = [], []
        for j in range(x.shape[0]):
            if j == a:
                continue
            s = (_unit(x[a]) * _unit(x[j])).sum()
            if int(y[j]) == int(y[a]):
                a_p = max(0.0, 1.0 + m - float(s.detach()))
                zp.append(-gamma * a_p * (s - (1.0 - m)))
            else:
                a_n = max(0.0, float(s.detach()) + m)
                zn.append(gamma * a_n * (s - m))
        if zp and zn:
            inner = torch.logsumexp(torch.stack(zn), 0) + torch.logsumexp(torch.stack(zp), 0)
            losses.append(torch.nn.functional.softplus(inner))
    return torch.stack(losses).mean() if losses else x.sum() * 0.0


def _d(u: torch.Tensor, v: torch.Tensor, normalize: bool) -> torch.Tensor:
    if normalize:
        u, v = _unit(u), _unit(v)
    return ((u - v) ** 2).sum()


def naive_triplet(x: torch.Tensor, y: torch.Tensor, margin: float, mining: str,
                  normalize: bool = True) -> torch.Tensor:
    losses = []
    n = x.shape[0]
    for a in range(n):
        positives = [p for p in range(n) if p != a and int(y[p]) == int(y[a])]
        negatives = [q for q in range(n) if int(y[q]) != int(y[a])]
        if not negatives:
            continue
        d_n = [_d(x[a], x[q], normalize) for q in negatives]
        if mining == "batch_hard":
            if not positives:
                continue
            d_p = max((_d(x[a], x[p], normalize) for p in positives), key=lambda t: float(t.detach()))
            losses.append(torch.clamp(d_p - min(d_n, key=lambda t: float(t.detach())) + margin, min=0.0))
            continue
        for p in positives:
            d_ap = _d(x[a], x[p], normalize)
            band = [d for d in d_n if float(d_ap.detach()) < float(d.detach()) < float(d_ap.detach()) + margin]
            chosen = min(band, key=lambda t: float(t.detach())) if band else min(d_n, key=lambda t: float(t.detach()))
            losses.append(torch.clamp(d_ap - chosen + margin, min=0.0))
    return torch.stack(losses).mean() if losses else x.sum() * 0.0
