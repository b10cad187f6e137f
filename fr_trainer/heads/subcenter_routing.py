"""Routing a sub-centre head's class gradient to the sub-centres that attain each class's
max, in whole-buffer ops: for a device policy without row blocks (CUDA), where an
elementwise op is one kernel launch and the row-blocked routings' full-size fp32 scratch
(`fr_trainer.heads.subcenter_fused`, `fr_trainer.heads.subcenter_mixed`) would be the
largest temporaries of the step.

The comparison is kept as a boolean [G, C k] (1 byte an element), the class's share per
maximum and the radial products are [G, C] tensors of the gradient's dtype, one at a time,
and the routed values are written over the cosines by one multiply (mixed-dtype into a
16-bit buffer). Ties split the gradient evenly, as autograd's `amax` does.
"""

from __future__ import annotations

import torch


def route_whole_(cos_k: torch.Tensor, h: torch.Tensor, k: int, subcentre_major: bool) -> torch.Tensor:
    """In place: cos_k [G, C k] (the sub-centre cosines, any float dtype) -> the class
    gradient h [G, C] given to the sub-centres that attain the class's max (split evenly on
    ties). `subcentre_major`: column j C + c is class c's j-th sub-centre (else c k + j).
    Returns sum_i routed_ir cos_ir [C k] in h's dtype, in cos_k's column order."""
    num_rows, num_classes = h.shape
    slot_dim = 1 if subcentre_major else 2
    slots = cos_k.view(num_rows, k, num_classes) if subcentre_major else cos_k.view(num_rows, num_classes, k)
    top = slots.amax(dim=slot_dim, keepdim=True)
    at_max = slots == top
    share = h.unsqueeze(slot_dim) / at_max.sum(dim=slot_dim, keepdim=True, dtype=h.dtype)  # per maximum
    weighted = (share * top).squeeze(slot_dim)  # share_i cos_ir wherever r attains the max
    del top  # (at most three [G, C] temporaries live at once)
    radial = torch.stack([torch.where(at_max.select(slot_dim, j), weighted, 0.0).sum(0) for j in range(k)],
                         dim=0 if subcentre_major else 1)
    torch.mul(at_max, share, out=slots)
    return radial.view(-1)
