"""Sub-center ArcFace with 16-bit GEMMs over fp32 centres: the pieces of
`fr_trainer.heads.subcenter_fused` that run when its `compute_dtype` is bf16 or fp16.

Layout. The GEMMs read a 16-bit copy of the normalised centres made once per step, and that
copy is written *sub-centre-major*: row j C + c holds w^_(c, j) (class c's j-th sub-centre,
over its norm), where the centres themselves are [C, k, D]. The cosine buffer [G, k C] then
holds k contiguous [G, C] blocks, one per sub-centre slot, so the max over a class's
sub-centres and the routing of its gradient are elementwise passes over contiguous rows of
C numbers (a class-major [G, C, k] buffer needs strided or inner-dimension-3 passes, 2-4x
slower on a CPU). The centres' gradient is written back into the [C, k, D] layout.

Precision. The cosines are rounded to 16 bits by the GEMM; their class max is exact (a max
picks one of its inputs) and widened into the fp32 logits. Each row's k target cosines are
fp32 dots; their max gives the margin's target logit, and the target's gradient goes to the
fp32 arg-max sub-centre(s) in fp32. The 16-bit buffer carries only the non-target
probabilities p <= 1 (fp16 cannot overflow under any loss scale); coef s and 1/||w|| are
applied in fp32 after the GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fr_trainer.heads import buffer_pool
from fr_trainer.heads.device_policy import BlockPolicy
from fr_trainer.heads.margin_softmax import _masked, _put_targets_, _Targets, exp_floor
from fr_trainer.heads.subcenter_routing import route_whole_

Take = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def taker(policy: BlockPolicy, device: torch.device) -> Take:
    """take(shape, dtype): a tensor from the buffer pool under a policy that reuses buffers."""
    return lambda shape, dtype: buffer_pool.take_if(policy.reuse_buffers, tuple(shape), dtype, device)


def subcentre_major_copy(w: torch.Tensor, inv_norm: torch.Tensor, k: int, dtype: torch.dtype,
                         policy: BlockPolicy, take: Take) -> torch.Tensor:
    """[k C, D] in `dtype`: row j C + c = w_(c, j) / ||w_(c, j)|| (w [C k, D] class-major).
    CPU: the centres are read in order, a block of classes at a time into fp32 scratch, and
    written to the k slots (reading every k-th row of w runs ~2x slower); other devices: one
    mixed-dtype multiply."""
    num_classes, dim = w.shape[0] // k, w.shape[1]
    out = take((w.shape[0], dim), dtype)
    centres, inv, slots = w.view(num_classes, k, dim), inv_norm.view(num_classes, k, 1), out.view(k, num_classes, dim)
    if policy.row_block_elements is None:
        torch.mul(centres.transpose(0, 1), inv.transpose(0, 1), out=slots)
        return out
    blocks = policy.row_blocks(num_classes, k * dim)
    scratch = w.new_empty(blocks[0][1], k, dim)
    for start, end in blocks:
        rows = torch.mul(centres[start:end], inv[start:end], out=scratch[: end - start])
        slots[:, start:end].copy_(rows.transpose(0, 1))
    return out


def cosines(xh: torch.Tensor, w_c: torch.Tensor, k: int, policy: BlockPolicy,
            take: Take) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 16-bit sub-centre cosines [G, k C] sub-centre-major, their class maxima [G, C]
    widened to xh's dtype)."""
    num_rows, num_classes = xh.shape[0], w_c.shape[0] // k
    cos_k = torch.mm(xh.to(w_c.dtype), w_c.t(), out=take((num_rows, w_c.shape[0]), w_c.dtype))
    slots = cos_k.view(num_rows, k, num_classes)
    wide = take((num_rows, num_classes), xh.dtype)
    blocks = policy.row_blocks(num_rows, num_classes)
    narrow_rows = w_c.new_empty(blocks[0][1], num_classes)  # (a row block's 16-bit maxima)
    for start, end in blocks:
        narrow = narrow_rows[: end - start].copy_(slots[start:end, 0])
        for j in range(1, k):
            torch.maximum(narrow, slots[start:end, j], out=narrow)
        wide[start:end].copy_(narrow)
    return cos_k, wide


def target_subcentre_cosines(xh: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, cols: torch.Tensor,
                             k: int) -> torch.Tensor:
    """[G, k] cosines (xh's dtype) of each row with the k sub-centres of its target column
    `cols` (rows whose target is elsewhere get column 0's: masked by the caller)."""
    num_classes, dim = w.shape[0] // k, w.shape[1]
    centres = w.view(num_classes, k, dim).index_select(0, cols)  # [G, k, D]
    return torch.bmm(centres, xh[:, :, None]).squeeze(2) * inv_norm.view(num_classes, k).index_select(0, cols)


def backward(xh: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, w_c: torch.Tensor, cos_k: torch.Tensor,
             target_k: torch.Tensor, logits: torch.Tensor, log_sum_exp: torch.Tensor, z_t: torch.Tensor,
             dz_t: torch.Tensor, filtered: torch.Tensor | None, tgt: _Targets, scale: float, coef: torch.Tensor,
             policy: BlockPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx^ [G, D], dL/dw [C k, D] class-major) of the 16-bit forward. `logits` [G, C]
    (overwritten) and `cos_k` (overwritten, then pooled) are the forward's; w_c its copy."""
    take, k = taker(policy, w.device), target_k.shape[1]
    p = logits.sub_(log_sum_exp[:, None]).clamp_min_(exp_floor(logits.dtype)).exp_()
    if filtered is not None:
        p.masked_fill_(filtered, 0.0)
    _put_targets_(p, tgt.owned, tgt.cols, torch.zeros_like(z_t))  # the targets' terms come in fp32 below
    radial = _route_(cos_k, p, k, policy)  # cos_k: the routed p; radial: sum_i p_ir cos_ir, [k C]
    buffer_pool.give_if(policy.reuse_buffers, p)
    factor = coef * scale
    grad_xh = torch.mm(cos_k, w_c).to(xh.dtype).mul_(factor)
    buffer_pool.give_if(policy.reuse_buffers, w_c)
    grad_w = buffer_pool.take_outgoing_if(policy.reuse_buffers, tuple(w.shape), w.dtype, w.device)
    column_factor = factor * inv_norm  # class-major, as the centres
    radial = radial.view(k, -1).t().reshape(-1).mul_(column_factor * inv_norm)
    _projected_centre_grad_(grad_w, cos_k, xh.to(cos_k.dtype), w, column_factor, radial, k, policy, take)
    buffer_pool.give_if(policy.reuse_buffers, cos_k)
    _add_target_terms_(grad_xh, grad_w, xh, w, inv_norm, target_k, tgt,
                       _masked(tgt.owned, coef * (torch.exp(z_t - log_sum_exp) - 1.0) * dz_t))
    return grad_xh, grad_w


def _add_target_terms_(grad_xh: torch.Tensor, grad_w: torch.Tensor, xh: torch.Tensor, w: torch.Tensor,
                       inv_norm: torch.Tensor, target_k: torch.Tensor, tgt: _Targets, g_t: torch.Tensor) -> None:
    """dL/dcos_t = g_t [G] on the arg-max sub-centre(s) of the fp32 target cosines (split
    evenly on a tie), into dL/dx^ and dL/dw = g (x^ - cos w^) / ||w||."""
    k = target_k.shape[1]
    at_max = (target_k == target_k.amax(dim=1, keepdim=True)).to(xh.dtype)
    share = at_max * (g_t / at_max.sum(1))[:, None]  # [G, k]
    rows = (tgt.cols[:, None] * k + torch.arange(k, device=xh.device)).flatten()
    inv_t = inv_norm.index_select(0, rows).view(-1, k)
    w_hat_t = w.index_select(0, rows).view(-1, k, w.shape[1]) * inv_t[..., None]
    grad_xh += torch.bmm(share[:, None, :], w_hat_t).squeeze(1)
    terms = (xh[:, None, :] - target_k[..., None] * w_hat_t).mul_((share * inv_t)[..., None])
    grad_w.index_add_(0, rows, terms.view(-1, w.shape[1]))


def _route_(cos_k: torch.Tensor, p: torch.Tensor, k: int, policy: BlockPolicy) -> torch.Tensor:
    """In place, one row block at a time: the 16-bit cosines cos_k [G, k C] (sub-centre-major)
    -> the class probabilities p [G, C] given to the sub-centres that attain the class's max
    (split evenly on ties), rounded to cos_k's dtype. Returns sum_i routed_ir cos_ir [k C]
    (fp32, sub-centre-major). Each block is widened into fp32 scratch [n, k, C] whose k slots
    are contiguous rows: the max, the indicator (a float comparison against the max broadcast
    over the slots), its count over the slots, the share and the radial products are passes
    over contiguous memory. A policy without row blocks (CUDA) takes `route_whole_`, whose
    temporaries are a boolean [G, k C] and [G, C]s instead of two fp32 [G, k C]
    (`fr_trainer.heads.subcenter_routing`)."""
    num_rows, num_classes = p.shape
    if policy.row_block_elements is None:
        return route_whole_(cos_k, p, k, subcentre_major=True)
    radial = p.new_zeros(k, num_classes)
    blocks = policy.row_blocks(num_rows, cos_k.shape[1])
    wide_rows = p.new_empty(blocks[0][1], k, num_classes)
    routed_rows = torch.empty_like(wide_rows)
    top_rows = p.new_empty(blocks[0][1], 1, num_classes)
    count_rows = torch.empty_like(top_rows)
    for start, end in blocks:
        n = end - start
        values, routed, top, count = wide_rows[:n], routed_rows[:n], top_rows[:n], count_rows[:n]
        values.copy_(cos_k[start:end].view(n, k, num_classes))
        torch.amax(values, dim=1, keepdim=True, out=top)
        torch.eq(values, top, out=routed)  # 1 at the maxima
        torch.sum(routed, dim=1, keepdim=True, out=count)
        torch.div(p[start:end, None, :], count, out=count)  # the class's share per maximum
        routed.mul_(count)
        if n == 1:
            radial.view(-1).addcmul_(routed.view(-1), values.view(-1))
        else:
            radial += values.mul_(routed).sum(0)
        cos_k[start:end].view(n, k, num_classes).copy_(routed)
    return radial.view(-1)


def _projected_centre_grad_(grad_w: torch.Tensor, routed: torch.Tensor, xh_c: torch.Tensor, w: torch.Tensor,
                            column_factor: torch.Tensor, radial: torch.Tensor, k: int, policy: BlockPolicy,
                            take: Take) -> None:
    """grad_w [C k, D] class-major (fp32) = column_factor_r U_r - radial_r w_r (both class-major
    [C k]), U = routed^T x^ from `routed` [G, k C] sub-centre-major: the k 16-bit GEMMs of a
    chunk of classes, then each block of classes widened from the k slots and finished in
    order while in cache."""
    num_classes, dim = routed.shape[1] // k, xh_c.shape[1]
    step = num_classes if policy.mm_columns is None else max(1, policy.mm_columns // k)  # k step rows a chunk
    chunks = [(a, min(a + step, num_classes)) for a in range(0, num_classes, step)]
    part = take((k, chunks[0][1] - chunks[0][0], dim), xh_c.dtype)
    grads, centres = grad_w.view(num_classes, k, dim), w.view(num_classes, k, dim)
    factors, radials = column_factor.view(num_classes, k, 1), radial.view(num_classes, k, 1)
    for a, b in chunks:
        for j in range(k):
            torch.mm(routed[:, j * num_classes + a:j * num_classes + b].t(), xh_c, out=part[j, : b - a])
        for c, d in policy.row_blocks(b - a, k * dim):
            rows = grads[a + c:a + d].copy_(part[:, c:d].transpose(0, 1))
            rows.mul_(factors[a + c:a + d]).addcmul_(centres[a + c:a + d], radials[a + c:a + d], value=-1.0)
    buffer_pool.give_if(policy.reuse_buffers, part)
