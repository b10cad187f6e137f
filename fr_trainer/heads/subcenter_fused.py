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
centres' gradient. fp32 or fp64; with a 16-bit `compute_dtype` over fp32 centres the GEMMs
and the cosine buffer are 16-bit (`fr_trainer.heads.subcenter_mixed`: a sub-centre-major
copy of the normalised centres, the targets in fp32). The plain path has no 16-bit mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fr_trainer.distributed.collectives import all_reduce_
from fr_trainer.heads import buffer_pool, subcenter_mixed
from fr_trainer.heads.device_policy import BlockPolicy, policy_for
from fr_trainer.heads.margin_softmax import NORM_EPS, _masked, _put_targets_, _sum_exp_rows, _Targets, exp_floor
from fr_trainer.heads.subcenter_routing import route_whole_
from fr_trainer.margins.base import Margin


class SubcenterSoftmaxCrossEntropy(torch.autograd.Function):
    """Inputs: x [G, D] gathered embeddings; weight [C_local, k, D]; targets [G] (local
    column or -1); margin (s cos non-targets); process group; threshold (inter-class
    filtering, 0: off); policy (a `BlockPolicy`, None: the device's); compute_dtype (bf16 /
    fp16 GEMMs over fp32 centres; None: the centres' dtype). Returns the loss."""

    @staticmethod
    def forward(ctx, x, weight, targets, margin: Margin, group, threshold: float = 0.0,
                policy: BlockPolicy | None = None, compute_dtype: torch.dtype | None = None):
        policy = policy or policy_for(weight.device)
        num_rows, (num_classes, k, dim) = x.shape[0], weight.shape
        x, w = x.detach(), weight.detach().reshape(num_classes * k, dim)
        x_norm = torch.linalg.vector_norm(x, dim=1).clamp_min(NORM_EPS)
        xh = x / x_norm[:, None]
        inv_norm = torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS).reciprocal()
        tgt = _Targets(targets)
        rows = torch.arange(num_rows, device=x.device)
        ctx.mixed = None
        if compute_dtype is not None and compute_dtype != w.dtype:
            take = subcenter_mixed.taker(policy, w.device)
            w_c = subcenter_mixed.subcentre_major_copy(w, inv_norm, k, compute_dtype, policy, take)
            cos_k, cos = subcenter_mixed.cosines(xh, w_c, k, policy, take)
            target_k = subcenter_mixed.target_subcentre_cosines(xh, w, inv_norm, tgt.cols, k)
            cos_t = _masked(tgt.owned, target_k.amax(dim=1))
            ctx.mixed = (w_c, target_k)
        else:
            buffer = buffer_pool.take_if(policy.reuse_buffers, (num_rows, num_classes * k), w.dtype, w.device)
            cos_k = torch.mm(xh, w.t(), out=buffer).mul_(inv_norm)
            cos = buffer_pool.take_if(policy.reuse_buffers, (num_rows, num_classes), w.dtype, w.device)
            _max_over_subcentres(cos_k.view(num_rows, num_classes, k), cos)
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
            (w_c, target_k), ctx.mixed = ctx.mixed, None
            grad_xh, grad_w = subcenter_mixed.backward(xh, w, inv_norm, w_c, cos_k, target_k, logits, log_sum_exp,
                                                       z_t, dz_t, filtered, tgt, margin.scale, coef, policy)
        else:
            grad_xh, grad_w = _backward(xh, w, inv_norm, cos_k, logits, log_sum_exp, z_t, dz_t, filtered, tgt,
                                        margin.scale, coef, policy, k)
        grad_x = (grad_xh - xh * (xh * grad_xh).sum(1, keepdim=True)) / x_norm[:, None]
        return grad_x, grad_w.view(ctx.shape), None, None, None, None, None, None


def _backward(xh: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, cos_k: torch.Tensor,
              logits: torch.Tensor, log_sum_exp: torch.Tensor, z_t: torch.Tensor, dz_t: torch.Tensor,
              filtered: torch.Tensor | None, tgt: _Targets, scale: float, coef: torch.Tensor, policy: BlockPolicy,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx^ [G, D], dL/dw [C k, D]) of the forward in the centres' dtype; `logits` and
    `cos_k` are overwritten, then pooled."""
    # H = dL/dcos: s coef p on non-targets, 0 where filtered, coef (p_t - 1) dz_t at targets
    h = logits.sub_(log_sum_exp[:, None]).clamp_min_(exp_floor(logits.dtype)).exp_().mul_(coef * scale)
    if filtered is not None:
        h.masked_fill_(filtered, 0.0)
    p_t = torch.exp(z_t - log_sum_exp)
    _put_targets_(h, tgt.owned, tgt.cols, _masked(tgt.owned, coef * (p_t - 1.0) * dz_t))
    radial = _route_to_subcenters_(cos_k, h, k, policy)  # cos_k now holds dL/dcos_r
    buffer_pool.give_if(policy.reuse_buffers, h)
    cos_k.mul_(inv_norm)  # the chain through 1/||w_r||
    grad_xh = torch.mm(cos_k, w)
    # sum_i dL/dcos_ir x^_i / ||w_r|| minus the radial part, onto pages of an earlier
    # gradient nobody holds (as in the one-centre head)
    grad_w = buffer_pool.take_outgoing_if(policy.reuse_buffers, tuple(w.shape), w.dtype, w.device)
    torch.mul(w, (radial * inv_norm.square()).neg_()[:, None], out=grad_w)
    grad_w.addmm_(cos_k.t(), xh)
    buffer_pool.give_if(policy.reuse_buffers, cos_k)
    return grad_xh, grad_w


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
    is slower still)."""
    num_rows, num_classes = h.shape
    if policy.row_block_elements is None:  # (CUDA: whole-buffer ops, no full-size fp32 scratch)
        return route_whole_(cos_k, h, k, subcentre_major=False)
    radial = cos_k.new_zeros(cos_k.shape[1])
    blocks = policy.row_blocks(num_rows, cos_k.shape[1])
    routed_rows = cos_k.new_empty(blocks[0][1], num_classes, k)
    spare_rows = torch.empty_like(routed_rows)
    share_rows = cos_k.new_empty(blocks[0][1], num_classes, 1)
    for start, end in blocks:
        block = cos_k[start:end].view(end - start, num_classes, k)
        routed, spare, share = routed_rows[: end - start], spare_rows[: end - start], share_rows[: end - start]
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
        block.copy_(routed)
    return radial
