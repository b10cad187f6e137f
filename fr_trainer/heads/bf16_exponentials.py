"""The bf16 head's backward from its kept exponentials (`fr_trainer.heads.margin_softmax`,
`uses_bf16_cosines`).

With bf16 GEMMs over normalised centres w^ (a bf16 copy made once per step), the forward's
GEMM gives the cosines x^ . w^ directly, and its row-blocked pass (fp32 scratch: scaled
logits, target logits, row maxima m_i, exponentials, their sums) writes the exponentials
e_ij = exp(z_ij - m_i) back over the bf16 block it read. Once the shards are joined,
p_ij = e_ij r_i with r_i = exp(m_i - lse_i), so the non-target part of dL/dcos is
coef s r_i e_ij: a row factor times the stored block. A margin whose non-target logits
are not `s cos` (SV-X, MV, CurricularFace, Circle) has dz_ij/dcos_ij = s_ij instead of s,
a function of the cosine and of per-row terms known before the shards are joined, so its
forward stores e_ij s_ij and the row factor is coef r_i (below, read s E as that block).
The backward then needs no pass over
the [G, C] buffer at all (only its G target entries are zeroed): the row factor goes into
the [G, D] operand and the column factors into the [C, D] result,

    dL/dx^_i = coef s r_i (E @ w^)_i + g_i w^_(t_i)
    U_j      = coef s (E^T (r . x^))_j + sum_(i: t_i = j) g_i x^_i        (dL/dcos . x^)
    dL/dw_j  = (U_j - (U_j . w^_j) w^_j) / ||w_j||

with g_i = dL/dcos at row i's target (fp32). The radial coefficient U_j . w^_j is a row-dot
of the centres' gradient block while it is in cache, a column chunk at a time. Precision:
e is rounded to bf16 (relative 2^-9), as H would be for a bf16 GEMM; everything summed
(row maxima, sums of exponentials, the radial dots, the targets' terms) stays fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fr_trainer.heads.device_policy import BlockPolicy
from fr_trainer.heads.target_rows import add_target_rows_


def normalized_copy_(out: torch.Tensor, w: torch.Tensor, eps: float, policy: BlockPolicy) -> torch.Tensor:
    """out (bf16) = w / ||w|| row-wise; returns 1 / ||w|| [C] (w's dtype; norms clamped at
    `eps`). CPU: one read of w, a row block at a time, its norms and its scaled fp32 copy
    taken while it is in cache, then a plain conversion (CPU mixed-dtype arithmetic is
    slow; the norms as a pass of their own cost a second read of w, ~4 ms at 50,000 x 512);
    other devices: the norms, then one mixed-dtype multiply."""
    inv_norm = w.new_empty(w.shape[0])
    if policy.row_block_elements is None:
        torch.linalg.vector_norm(w, dim=1, out=inv_norm)
        inv_norm.clamp_min_(eps).reciprocal_()
        scaled_copy_(out, w, inv_norm, policy)
        return inv_norm
    blocks = policy.row_blocks(*w.shape)
    scratch = w.new_empty(blocks[0][1], w.shape[1])
    for start, end in blocks:
        rows, inv = w[start:end], inv_norm[start:end]
        torch.linalg.vector_norm(rows, dim=1, out=inv)
        inv.clamp_min_(eps).reciprocal_()
        out[start:end].copy_(torch.mul(rows, inv[:, None], out=scratch[: end - start]))
    return inv_norm


def scaled_copy_(out: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, policy: BlockPolicy) -> None:
    """out (16-bit) = w * inv_norm[:, None] with norms already taken (a chunked head's
    backward, converting again a block the forward converted); CPU: a row block at a time
    through fp32 scratch, as `normalized_copy_`."""
    if policy.row_block_elements is None:
        torch.mul(w, inv_norm[:, None], out=out)
        return
    blocks = policy.row_blocks(*w.shape)
    scratch = w.new_empty(blocks[0][1], w.shape[1])
    for start, end in blocks:
        out[start:end].copy_(torch.mul(w[start:end], inv_norm[start:end, None], out=scratch[: end - start]))


def backward_(e: torch.Tensor, row_factor: torch.Tensor, g_t: torch.Tensor, cols: torch.Tensor,
              xh: torch.Tensor, w: torch.Tensor, w_c: torch.Tensor, inv_norm: torch.Tensor,
              grad_xh: torch.Tensor, rows, start: int, policy: BlockPolicy,
              take: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
              give: Callable[[torch.Tensor], None]) -> None:
    """Add this block's part of dL/dx^ into `grad_xh` [G, D] and write dL/dw of the block's
    c centres (rows [start, start + c) of the shard) a piece at a time through `rows`
    (`pieces`, `rows`, `done`: `margin_softmax._CentreGradRows`; see the module docstring).

    e [G, c] bf16: the exponentials, 0 at the targets; row_factor [G]: coef s r_i; g_t [G]:
    dL/dcos at the targets in this block (0 on the other rows), at columns `cols` [G];
    xh [G, D] fp32; w [c, D] fp32 centres, w_c their normalised bf16 copy, inv_norm [c];
    take / give: the policy's buffers."""
    w_hat_t = w.index_select(0, cols) * inv_norm.index_select(0, cols)[:, None]  # w^ at each row's target
    grad_xh.addcmul_(torch.mm(e, w_c).to(grad_xh.dtype), row_factor[:, None])
    grad_xh.addcmul_(w_hat_t, g_t[:, None])
    scaled_x = (xh * row_factor[:, None]).to(w_c.dtype)
    # the targets' terms, projected the same way (the projection is linear in U)
    target_u = xh * g_t[:, None]
    radial = (target_u * w_hat_t).sum(1)
    target_rows = (target_u - radial[:, None] * w_hat_t) * inv_norm.index_select(0, cols)[:, None]
    end = start + e.shape[1]
    pieces = rows.pieces(start, end)
    part = take((policy.mm_blocks(pieces[0][1] - pieces[0][0])[0][1], xh.shape[1]), w_c.dtype)
    sub_blocks = policy.row_blocks(part.shape[0], xh.shape[1])
    products = w.new_empty(sub_blocks[0][1], xh.shape[1])
    for p, q in pieces:
        out, first = rows.rows(p, q), p - start
        for a, b in policy.mm_blocks(q - p):
            torch.mm(e[:, first + a:first + b].t(), scaled_x, out=part[: b - a])
            for c, d in policy.row_blocks(b - a, xh.shape[1]):  # (each row block in cache)
                u = out[a + c:a + d].copy_(part[c:d])
                lo, hi = first + a + c, first + a + d
                _project_(u, w[lo:hi], inv_norm[lo:hi], products[: d - c])
        add_target_rows_(out, first, q - start, (p, q) == (start, end), cols, target_rows)
        rows.done(p, q)
    give(part)


def _project_(u: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor, products: torch.Tensor) -> None:
    """In place: u_j -> (u_j - (u_j . w^_j) w^_j) / ||w_j||, with w^_j = w_j / ||w_j||
    (`products`: scratch of u's shape; a row-dot into it, not `vecdot`'s fresh temporary)."""
    radial = torch.mul(u, w, out=products).sum(1).mul_(inv_norm.pow(3))
    u.mul_(inv_norm[:, None]).addcmul_(w, radial[:, None], value=-1.0)
