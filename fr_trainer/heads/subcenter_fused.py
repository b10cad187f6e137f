"""The Sub-center ArcFace loss as one autograd function (the head's default for k > 1).

Same loss and gradients as the plain autograd path (`fr_trainer.heads.subcenter`), without
its materialised normalised centres, its [G, C_local k] cosine graph and its [G, C_local]
`where` copies. With the centres flattened to [C_local k, D] rows:

forward: one GEMM `x^ W^T` into a (pooled) [G, C_local k] buffer, scaled in place to the
    cosines by 1/||w_r||; the class cosine is their max over each class's k sub-centres
    ([G, C_local]); non-target cosines above the inter-class filtering threshold count as 0;
    the margin's target logit (its value, and its derivative as the slope of a straight
    line through the cosine: `Margin.target`) goes in at the owned targets; the shards are
    joined in log space as in the fused head (all-reduce MAX of the row maxima, SUM of
    [sum-exp, target logit]).
backward: H = dL/dcos [G, C_local] in place of the logits; each entry goes to the
    sub-centre(s) that attained the max (shared evenly on a tie, as autograd's `amax`
    does), overwriting the cosine buffer one row block at a time; then the two GEMMs of a
    linear layer on the flattened rows, and the normalisations' radial parts (the centres'
    as one [C_local k] vector of sum_i H_ir cos_ir, gathered during the routing).

Peak memory: the [G, C_local k] cosine buffer and the [G, C_local] logits, plus the
centres' gradient.

Mixed precision (`compute_dtype` bf16 or fp16 over fp32 centres): the GEMMs read a 16-bit
copy of the normalised centres w^ (made once per step), so the forward GEMM writes the
sub-centre cosines themselves into a 16-bit [G, C_local k] buffer (half the fp32 one); their
class maxima are taken in 16 bits (exact: a max picks one of its inputs) and widened into
the fp32 logits. The targets stay fp32 throughout: each row's k target cosines are fp32 dots,
their max gives the margin's target logit, and its gradient goes to the fp32 arg-max
sub-centre(s) outside the 16-bit numbers. The 16-bit buffer carries only the non-target
probabilities p (at most 1, so fp16 cannot overflow under any loss scale): routed to their
sub-centres and multiplied by coef s in fp32 after the GEMMs. The plain path
(`fr_trainer.heads.subcenter`) has no 16-bit mode; the tests hold this one to the fp64
reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fr_trainer.distributed.collectives import all_reduce_
from fr_trainer.heads import bf16_exponentials, buffer_pool
from fr_trainer.heads.device_policy import BlockPolicy, policy_for
from fr_trainer.heads.margin_softmax import NORM_EPS, _masked, _put_targets_, _sum_exp_rows, _Targets, exp_floor
from fr_trainer.margins.base import Margin


class SubcenterSoftmaxCrossEntropy(torch.autograd.Function):
    """Inputs: x [G, D] gathered embeddings; weight [C_local, k, D]; targets [G] (local
    column or -1); margin (s cos non-targets); process group; threshold (inter-class
    filtering, 0: off); policy (a `BlockPolicy`, None: the device's); compute_dtype
    (bf16 / fp16 GEMMs over fp32 centres; None: the centres' dtype). Returns the loss."""

    @staticmethod
    def forward(ctx, x, weight, targets, margin: Margin, group, threshold: float = 0.0,
                policy: BlockPolicy | None = None, compute_dtype: torch.dtype | None = None):
        policy = policy or policy_for(weight.device)
        num_rows, (num_classes, k, dim) = x.shape[0], weight.shape
        x, w = x.detach(), weight.detach().reshape(num_classes * k, dim)
        mixed = compute_dtype is not None and compute_dtype != w.dtype
        x_norm = torch.linalg.vector_norm(x, dim=1).clamp_min(NORM_EPS)
        xh = x / x_norm[:, None]
        inv_norm = torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS).reciprocal()
        tgt = _Targets(targets)
        rows = torch.arange(num_rows, device=x.device)
        take = _taker(policy, w.device)
        if mixed:  # 16-bit cosines of normalised copies; their class maxima widened to fp32
            w_c = bf16_exponentials.normalized_copy_(take((num_classes * k, dim), compute_dtype), w, inv_norm,
                                                     policy)
            cos_k = torch.mm(xh.to(compute_dtype), w_c.t(), out=take((num_rows, num_classes * k), compute_dtype))
            narrow = _max_over_subcentres(cos_k.view(num_rows, num_classes, k),
                                          take((num_rows, num_classes), compute_dtype))
            cos = take((num_rows, num_classes), w.dtype).copy_(narrow)
            _give(policy, narrow)
            target_k = _target_subcentre_cosines(xh, w, inv_norm, tgt.cols, k)  # [G, k] fp32
            cos_t = _masked(tgt.owned, target_k.amax(dim=1))
        else:
            w_c = target_k = None
            cos_k = torch.mm(xh, w.t(), out=take((num_rows, num_classes * k), w.dtype)).mul_(inv_norm)
            cos = _max_over_subcentres(cos_k.view(num_rows, num_classes, k), take((num_rows, num_classes), w.dtype))
            cos_t = _masked(tgt.owned, cos[rows, tgt.cols])
        filtered = None
        if threshold > 0:
            is_target = torch.zeros_like(cos, dtype=torch.bool)
            is_target[rows, tgt.cols] = tgt.owned
            filtered = (cos > threshold) & ~is_target
        z_t, dz_t = margin.target(cos_t)
        logits = cos.mul_(margin.scale)  # cos is recomputed from cos_k in backward
        if filtered is not None:
            logits.masked_fill_(filtered, 0.0)
        _put_targets_(logits, tgt.owned, tgt.cols, z_t)
        row_max = all_reduce_(logits.amax(dim=1), dist.ReduceOp.MAX, group)
        sum_exp = _sum_exp_rows(logits, row_max, policy)
        joined = all_reduce_(torch.stack([sum_exp, _masked(tgt.owned, z_t)]), dist.ReduceOp.SUM, group)
        log_sum_exp = row_max + torch.log(joined[0])
        ctx.tensors = (xh, x_norm, w, inv_norm, cos_k, logits, log_sum_exp, z_t, dz_t, filtered)
        ctx.mixed = (w_c, target_k) if mixed else None
        ctx.tgt, ctx.margin, ctx.policy, ctx.shape = tgt, margin, policy, weight.shape
        return (log_sum_exp - joined[1]).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.tensors is None:
            raise RuntimeError("the sub-centre head's backward runs once per forward (it overwrites its buffers); "
                               "run the forward again instead of backward(retain_graph=True) twice")
        xh, x_norm, w, inv_norm, cos_k, logits, log_sum_exp, z_t, dz_t, filtered = ctx.tensors
        ctx.tensors = None
        tgt, margin, policy = ctx.tgt, ctx.margin, ctx.policy
        num_rows, num_classes = logits.shape
        k = cos_k.shape[1] // num_classes
        coef = grad_loss / num_rows
        if ctx.mixed is not None:
            grad_xh, grad_w = _mixed_backward(ctx, xh, w, inv_norm, cos_k, logits, log_sum_exp, z_t, dz_t,
                                              filtered, coef)
            grad_x = (grad_xh - xh * (xh * grad_xh).sum(1, keepdim=True)) / x_norm[:, None]
            return grad_x, grad_w.view(ctx.shape), None, None, None, None, None, None
        # H = dL/dcos: s coef p on non-targets, 0 where filtered, coef (p_t - 1) dz_t at targets
        h = logits.sub_(log_sum_exp[:, None]).clamp_min_(exp_floor(logits.dtype)).exp_().mul_(coef * margin.scale)
        if filtered is not None:
            h.masked_fill_(filtered, 0.0)
        p_t = torch.exp(z_t - log_sum_exp)
        _put_targets_(h, tgt.owned, tgt.cols, _masked(tgt.owned, coef * (p_t - 1.0) * dz_t))
        radial = _route_to_subcenters_(cos_k, h, k, policy)  # cos_k now holds dL/dcos_r
        if policy.reuse_buffers:
            buffer_pool.give(h)
        cos_k.mul_(inv_norm)  # the chain through 1/||w_r||
        grad_xh = torch.mm(cos_k, w)
        # sum_i dL/dcos_ir x^_i / ||w_r|| minus the radial part, onto pages of an earlier
        # gradient nobody holds (as in the one-centre head)
        grad_w = buffer_pool.take_outgoing_if(policy.reuse_buffers, tuple(w.shape), w.dtype, w.device)
        torch.mul(w, (radial * inv_norm.square()).neg_()[:, None], out=grad_w)
        grad_w.addmm_(cos_k.t(), xh)
        if policy.reuse_buffers:
            buffer_pool.give(cos_k)
        grad_x = (grad_xh - xh * (xh * grad_xh).sum(1, keepdim=True)) / x_norm[:, None]
        return grad_x, grad_w.view(ctx.shape), None, None, None, None, None, None


def _taker(policy: BlockPolicy, device: torch.device):
    """take(shape, dtype): a tensor from the buffer pool under a policy that reuses buffers."""
    return lambda shape, dtype: buffer_pool.take_if(policy.reuse_buffers, tuple(shape), dtype, device)


def _give(policy: BlockPolicy, tensor: torch.Tensor | None) -> None:
    if policy.reuse_buffers:
        buffer_pool.give(tensor)


def _target_subcentre_cosines(xh: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, cols: torch.Tensor,
                              k: int) -> torch.Tensor:
    """[G, k] fp32 cosines of each row with the k sub-centres of its target column `cols`
    (rows whose target is elsewhere get column 0's: masked by the caller)."""
    num_classes, dim = w.shape[0] // k, w.shape[1]
    centres = w.view(num_classes, k, dim).index_select(0, cols)  # [G, k, D]
    return torch.bmm(centres, xh[:, :, None]).squeeze(2) * inv_norm.view(num_classes, k).index_select(0, cols)


def _mixed_backward(ctx, xh: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, cos_k: torch.Tensor,
                    logits: torch.Tensor, log_sum_exp: torch.Tensor, z_t: torch.Tensor, dz_t: torch.Tensor,
                    filtered: torch.Tensor | None, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx^ [G, D] and dL/dw [C_local k, D] of the 16-bit forward (module docstring): the
    non-target probabilities routed in the 16-bit cosine buffer through the two 16-bit GEMMs,
    times coef s in fp32; the targets' terms in fp32 on their arg-max sub-centres."""
    w_c, target_k = ctx.mixed
    ctx.mixed = None
    tgt, margin, policy = ctx.tgt, ctx.margin, ctx.policy
    take = _taker(policy, w.device)
    k = target_k.shape[1]
    p = logits.sub_(log_sum_exp[:, None]).clamp_min_(exp_floor(logits.dtype)).exp_()
    if filtered is not None:
        p.masked_fill_(filtered, 0.0)
    _put_targets_(p, tgt.owned, tgt.cols, torch.zeros_like(z_t))  # the targets' terms come in fp32 below
    radial = _route_to_subcenters_(cos_k, p, k, policy)  # cos_k now holds the routed p, radial sum_i p_ir cos_ir
    _give(policy, p)
    factor = coef * margin.scale
    grad_xh = torch.mm(cos_k, w_c).to(xh.dtype).mul_(factor)
    grad_w = buffer_pool.take_outgoing_if(policy.reuse_buffers, tuple(w.shape), w.dtype, w.device)
    column_factor = factor * inv_norm
    radial.mul_(column_factor * inv_norm)
    _projected_centre_grad_(grad_w, cos_k, xh.to(cos_k.dtype), w, column_factor, radial, policy, take)
    _give(policy, cos_k)
    _give(policy, w_c)
    # the targets: dL/dcos_t on the arg-max sub-centre(s) of the fp32 target cosines (split on ties)
    g_t = _masked(tgt.owned, coef * (torch.exp(z_t - log_sum_exp) - 1.0) * dz_t)
    at_max = (target_k == target_k.amax(dim=1, keepdim=True)).to(xh.dtype)
    share = at_max * (g_t / at_max.sum(1))[:, None]  # [G, k]
    rows = (tgt.cols[:, None] * k + torch.arange(k, device=xh.device)).flatten()
    inv_t = inv_norm.index_select(0, rows).view(-1, k)
    w_hat_t = w.index_select(0, rows).view(-1, k, w.shape[1]) * inv_t[..., None]
    grad_xh += torch.bmm(share[:, None, :], w_hat_t).squeeze(1)
    terms = (xh[:, None, :] - target_k[..., None] * w_hat_t).mul_((share * inv_t)[..., None])
    grad_w.index_add_(0, rows, terms.view(-1, w.shape[1]))
    return grad_xh, grad_w


def _projected_centre_grad_(grad_w: torch.Tensor, routed: torch.Tensor, xh_c: torch.Tensor, w: torch.Tensor,
                            column_factor: torch.Tensor, radial: torch.Tensor, policy: BlockPolicy, take) -> None:
    """grad_w [R, D] (fp32) = column_factor_r (routed^T x^)_r - radial_r w_r, the 16-bit GEMM
    a column chunk at a time, widened and finished while the chunk is in cache."""
    chunks = policy.mm_blocks(routed.shape[1])
    part = take((chunks[0][1], xh_c.shape[1]), xh_c.dtype)
    for a, b in chunks:
        torch.mm(routed[:, a:b].t(), xh_c, out=part[: b - a])
        for c, d in policy.row_blocks(b - a, xh_c.shape[1]):
            rows = grad_w[a + c:a + d].copy_(part[c:d])
            rows.mul_(column_factor[a + c:a + d, None]).addcmul_(w[a + c:a + d], radial[a + c:a + d, None], value=-1.0)
    _give(policy, part)


def _max_over_subcentres(cos_k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [N, C] = max over the last dimension of cos_k [N, C, k], as k - 1 elementwise
    maxima of its slices (a CPU reduction over an inner dimension of 3 is slower)."""
    out.copy_(cos_k[..., 0])
    for j in range(1, cos_k.shape[-1]):
        torch.maximum(out, cos_k[..., j], out=out)
    return out


def _route_to_subcenters_(cos_k: torch.Tensor, h: torch.Tensor, k: int, policy: BlockPolicy) -> torch.Tensor:
    """In place, one row block at a time: cos_k [G, C k] (the sub-centre cosines) ->
    dL/dcos_r, the class gradient h [G, C] given to the sub-centres that attain the class's
    max (split evenly on ties). Returns the radial coefficients sum_i dL/dcos_ir cos_ir [C k].

    Written for a CPU's kernels: the scratch is allocated once, the maxima are taken and
    compared slice by slice and as a dense copy (a comparison against a broadcast [.., C, 1] max runs 4x slower), the
    indicator is a float tensor (boolean masks and `where` cost several float passes), and
    the ties are counted by adding the k slices (a reduction over an inner dimension of 3
    is slower still). A 16-bit cos_k (mixed precision) is widened a row block at a time
    into scratch of h's dtype, and the routed values are written back rounded."""
    num_rows, num_classes = h.shape
    radial = h.new_zeros(cos_k.shape[1])
    blocks = policy.row_blocks(num_rows, cos_k.shape[1])
    routed_rows = h.new_empty(blocks[0][1], num_classes, k)
    spare_rows = torch.empty_like(routed_rows)
    share_rows = h.new_empty(blocks[0][1], num_classes, 1)
    wide_rows = None if cos_k.dtype == h.dtype else torch.empty_like(routed_rows)  # 16-bit cosines, widened
    for start, end in blocks:
        block = cos_k[start:end].view(end - start, num_classes, k)
        routed, spare, share = routed_rows[: end - start], spare_rows[: end - start], share_rows[: end - start]
        if wide_rows is not None:
            block = wide_rows[: end - start].copy_(block)
        _max_over_subcentres(block, share[..., 0])
        torch.eq(block, spare.copy_(share.expand_as(block)), out=routed)  # 1 at the maxima
        torch.add(routed[..., 0:1], routed[..., 1:2], out=share) if k > 1 else share.copy_(routed)
        for j in range(2, k):
            share.add_(routed[..., j:j + 1])
        torch.div(h[start:end, :, None], share, out=share)  # the class gradient over its maxima
        routed.mul_(share)
        if end - start == 1:
            radial.addcmul_(routed.view(-1), block.view(-1))
        else:
            radial += torch.mul(routed, block, out=spare).sum(0).view(-1)
        cos_k[start:end].view(end - start, num_classes, k).copy_(routed)
    return radial
