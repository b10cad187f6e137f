"""The sharded margin-softmax cross-entropy as one autograd function.

Every rank holds the gathered embeddings `x` [G, D] and its own class centres `w`
[C_local, D]. The forward pass computes the rank's block of logits, joins the shards in
log space with two all-reduces (MAX of the row maxima; SUM of [sum-exp, target logit]),
and returns the mean over the global batch of `logsumexp(z_i) - z_{i, y_i}`, the same
scalar on every rank. No probability is ever clamped and then logged.

Backward: dL/dz = (softmax - onehot) / G, chained by hand through the margin (its exact
or straight-through derivative), the column scaling by 1/||w_j|| and the normalisation of
x and w. Only the three GEMMs of a linear layer run over the big shapes: `x^ @ W^T`,
`H @ W` and `H^T @ x^`. The rest is a few elementwise passes over the one [G, C_local]
logit buffer (cache-sized row blocks on a CPU, one op per pass on CUDA: the device's
`BlockPolicy`, `fr_trainer.heads.device_policy`; or fused by torch.compile with
`compiled`, `fr_trainer.heads.fused`), which is overwritten in place by the gradient H. The normalisation of the
centres needs, per centre j, the radial coefficient sum_i dL/dcos_ij * cos_ij; for margins
whose non-target logits are `s cos` it comes out of the same pass (cos = z / s), so no
O(C D) row-dot is ever computed.

`exp` arguments are floored at log(tiny) + 0.5 of the dtype (about -86.8 in fp32):
CPU `exp` takes a path some 30 times slower for results near the subnormal range, and the
floor changes a probability of at most 2e-38, i.e. the loss by less than C * 2e-38.

Without `chunk_size` the forward keeps what the backward needs in its one buffer: the
logits of a margin whose non-target logits are `s cos`, or the cosines of any other margin
(its logits are rebuilt from them in backward, an elementwise pass, not a GEMM). With
`chunk_size` the logits are built block by block (forward) and rebuilt block by block
(backward), so the [G, C_local] buffer is never allocated: peak logit memory is one
[G, chunk] block, at the price of a fourth GEMM over all blocks but the last, which the
forward keeps in the same way (the backward starts with it; the ragged remainder of the
classes is the first block, so the kept one is a whole chunk).

The centres' gradient, which autograd hands on to `weight.grad`, is written on the pages of
an earlier one nobody holds any more under a policy that reuses buffers
(`buffer_pool.take_outgoing`), its radial part first and the GEMM accumulated onto it.

With `index` (Partial-FC sampling) only the rows `w[index]` take part; their gradient is
returned as a sparse COO tensor, so the optimizer can leave every other centre, and its
state, untouched.

Mixed precision (`compute_dtype` bf16 or fp16, fp32 master centres): the three GEMMs run
on 16-bit copies of x^ and w. The [G, C_local] logit buffer (then the gradient H) is in
`logits_dtype`: 16-bit halves its memory; fp32 (fed by the 16-bit GEMM in column chunks)
keeps the logits' precision, which bf16's 8-bit mantissa does not at s = 64. With bf16
GEMMs and a normalised margin without bias (eager) the buffer is neither: the GEMMs run on
normalised centres, so the buffer holds the bf16 cosines the GEMM wrote, and the logits
exist only in fp32 row-block scratch (`uses_bf16_cosines`). The forward writes each
row's exponentials exp(z_ij - m_i) back over them, times dz_ij/dcos_ij for a margin
whose non-target logits are not `s cos` (a derivative of the cosine alone, known before
the shards are joined): the softmax's gradient is then a row factor times the stored
block, and the backward makes no pass over the buffer (`fr_trainer.heads.bf16_exponentials`).
Everything
that decides the loss's accuracy stays fp32: the norms, the target cosines (row dots of
the fp32 operands) and target logits, the row maxima, the sums of exponentials
(exponentials are taken on fp32 scratch blocks), the log-sum-exp, the radial
coefficients, and the gradients handed back to x and w.

Host syncs: none. The targets this rank owns are a mask over the G rows (never a list of
row numbers, which `nonzero` would have to size on the host), and every target-only step
is a gather / scatter / index_add over all G rows with the other rows masked out.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fr_trainer.distributed.collectives import all_reduce_
from fr_trainer.heads import bf16_exponentials, buffer_pool
from fr_trainer.heads.device_policy import CPU_BLOCK_ELEMENTS, CPU_MM_COLUMNS, BlockPolicy, policy_for
from fr_trainer.heads.fused import compiled_passes
from fr_trainer.heads.target_rows import add_target_rows_
from fr_trainer.margins.base import Margin

NORM_EPS = 1e-12  # floor of ||x|| and ||w|| (an all-zero vector has no direction)
BLOCK_ELEMENTS = CPU_BLOCK_ELEMENTS  # the CPU policy's row block (see device_policy)
MM_COLUMNS = CPU_MM_COLUMNS  # the CPU policy's 16-bit GEMM column chunk


def exp_floor(dtype: torch.dtype) -> float:
    """Smallest argument passed to exp: log of the smallest normal number, plus 0.5."""
    return math.log(torch.finfo(dtype).tiny) + 0.5


def uses_bf16_cosines(compute_dtype: torch.dtype, weight_dtype: torch.dtype, margin: Margin,
                      compiled: bool, has_bias: bool) -> bool:
    """Whether the GEMMs run on a normalised bf16 copy of the centres, so the forward GEMM
    writes the cosines themselves in bf16, and the backward takes the bf16 epilogue of
    `fr_trainer.heads.bf16_exponentials`: bf16 GEMMs on fp32 centres, eager, for a normalised
    margin without bias."""
    return (compute_dtype == torch.bfloat16 and weight_dtype == torch.float32 and margin.normalized
            and not has_bias and not compiled)


def uses_cosine_rows(compute_dtype: torch.dtype, weight_dtype: torch.dtype, margin: Margin, compiled: bool,
                     has_bias: bool) -> bool:
    """Whether a non-linear margin in the centres' own dtype keeps only its cosines: eager,
    normalised, no bias. Its logits then exist only in row-block scratch (forward: maxima
    and sums of exponentials; backward: dL/dcos written back over the cosines), one
    [G, C] buffer instead of a cosine and a logit buffer."""
    return (compute_dtype == weight_dtype and not margin.linear_nontarget and margin.normalized
            and not has_bias and not compiled)


def _column_blocks(num_cols: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """The column blocks [start, end) of `chunk_size` centres (one block without), the ragged
    remainder first: the forward keeps its last block for the backward, so that one is whole."""
    step = num_cols if not chunk_size else max(1, chunk_size)
    ragged = num_cols % step
    starts = ([0] if ragged else []) + list(range(ragged, num_cols, step))
    ends = starts[1:] + [num_cols]
    return list(zip(starts, ends, strict=True))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit logits, else the logits' own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sum_exp_rows(logits: torch.Tensor, row_max: torch.Tensor, policy: BlockPolicy) -> torch.Tensor:
    """sum_j exp(z_ij - m_i) [G] without modifying `logits` [G, c] (fp32 for 16-bit logits)."""
    dtype = _accumulation_dtype(logits.dtype)
    floor = exp_floor(dtype)
    out = row_max.new_empty(logits.shape[0])
    blocks = policy.row_blocks(*logits.shape)
    scratch = logits.new_empty(blocks[0][1], logits.shape[1], dtype=dtype)
    for start, end in blocks:
        block = scratch[: end - start]
        torch.sub(logits[start:end], row_max[start:end, None], out=block)
        block.clamp_min_(floor).exp_()
        torch.sum(block, dim=1, out=out[start:end])
    return out


def _linear_softmax_grad_(logits: torch.Tensor, log_sum_exp: torch.Tensor, column_factor: torch.Tensor,
                          want_radial: bool, policy: BlockPolicy) -> torch.Tensor | None:
    """In place: logits z [G, c] -> softmax(z) * column_factor [c].

    Returns sum_i softmax_ij * z_ij [c] when `want_radial` (else None). For 16-bit logits
    the probabilities and the radial sums are fp32; only the result is stored in 16 bits.
    """
    dtype = _accumulation_dtype(logits.dtype)
    mixed = dtype != logits.dtype
    floor = exp_floor(dtype)
    radial = log_sum_exp.new_zeros(logits.shape[1]) if want_radial else None
    blocks = policy.row_blocks(*logits.shape)
    scratch = logits.new_empty(blocks[0][1], logits.shape[1], dtype=dtype)
    products = logits.new_empty(blocks[0][1], logits.shape[1], dtype=dtype) if mixed and want_radial else None
    ones = log_sum_exp.new_ones(blocks[0][1])
    for start, end in blocks:
        z, p = logits[start:end], scratch[: end - start]
        torch.sub(z, log_sum_exp[start:end, None], out=p)
        p.clamp_min_(floor).exp_()
        if radial is not None:
            if products is None:
                z.mul_(p)
                radial.addmv_(z.t(), ones[: end - start])
            else:
                pz = products[: end - start]
                torch.mul(p, z, out=pz)
                radial.addmv_(pz.t(), ones[: end - start])
        torch.mul(p, column_factor, out=z)
    return radial


def _mixed_gemms_(ops: _Operands, h: torch.Tensor, factor: torch.Tensor | None, start: int, end: int,
                  grad_xh: torch.Tensor, rows: _CentreGradRows, radial_part: torch.Tensor | None,
                  cols: torch.Tensor, target_rows: torch.Tensor, target_xh: torch.Tensor) -> None:
    """grad_xh += (h f) @ w + target_xh and, a piece at a time, the centres' gradient rows
    [start, end) = (h f)^T @ x^ - radial_part * w plus the targets' rows `target_rows` [G, D]
    at their block columns `cols`, with 16-bit GEMMs, one column chunk at a time. A piece
    is handed on (and, fused, w's rows move) only after grad_xh has read them all. bf16 has fp32's range,
    so h already holds H (`factor` None: the column factor went into the fp32 pass that made
    it) and is only converted; fp16 would overflow at large loss scales, so h holds H / f and
    f scales the centres' copy and the fp32 results instead."""
    dtype = ops.compute_dtype
    w_c = ops.centres_c(start, end) if factor is None else None
    pieces = rows.pieces(start, end)
    for p, q in pieces:
        out = rows.rows(p, q)
        for a, b in ops.policy.mm_blocks(q - p):
            ca, cb = p - start + a, p - start + b  # (the chunk's columns in the block)
            centres = slice(p + a, p + b)
            h_c = torch.empty(h.shape[0], b - a, dtype=dtype, device=h.device).copy_(h[:, ca:cb])
            if factor is None:
                grad_xh.add_(torch.mm(h_c, w_c[ca:cb]))
                out[a:b].copy_(torch.mm(h_c.t(), ops.xh_c))
            else:
                grad_xh.add_(torch.mm(h_c, (ops.w[centres] * factor[ca:cb, None]).to(dtype)))
                torch.mul(torch.mm(h_c.t(), ops.xh_c), factor[ca:cb, None], out=out[a:b])
            if radial_part is not None:
                out[a:b].addcmul_(ops.w[centres], radial_part[ca:cb, None], value=-1.0)
        add_target_rows_(out, p - start, q - start, (p, q) == (start, end), cols, target_rows)
        if (p, q) == pieces[-1]:
            grad_xh.add_(target_xh)
        rows.done(p, q)


def _exact_target_terms_(sum_exp: torch.Tensor, logits: torch.Tensor, row_max: torch.Tensor,
                         z_t: torch.Tensor, inside: torch.Tensor, cols: torch.Tensor) -> None:
    """Replace, in `sum_exp`, the target terms taken from the 16-bit logit buffer by the
    exact ones (a well-classified row's loss is mostly its target term: rounding its
    logit to 16 bits would dominate the loss's error). `inside` [G]: the rows whose
    target is in this block, at column `cols` [G]."""
    stored = logits.gather(1, cols[:, None]).squeeze(1).to(z_t.dtype)
    change = torch.exp(z_t - row_max) - torch.exp(stored - row_max)
    sum_exp.add_(torch.where(inside, change, torch.zeros_like(change)))


def _put_targets_(buffer: torch.Tensor, inside: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[i, cols[i]] = values[i] for the rows `inside` [G] (bool); the other rows keep
    what they hold at cols[i]. A gather, a where and an index_put over G elements: no sync."""
    rows = torch.arange(buffer.shape[0], device=buffer.device)
    kept = buffer[rows, cols]
    # index_put_, not scatter_: CPU scatter_ into a 16-bit buffer converts all of it (30 ms
    # at [256, 50,000]); both are one kernel on CUDA
    buffer.index_put_((rows, cols), torch.where(inside, values.to(buffer.dtype), kept))


def _shifted_linear_logits(cos: torch.Tensor, out: torch.Tensor, scale: float, inside: torch.Tensor,
                           cols: torch.Tensor, z_t: torch.Tensor, reference: torch.Tensor | None,
                           mixed_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z - ref [G, c] in fp32 `out`, ref [G]) for a margin whose non-target logits are
    `scale cos`, from the 16-bit cosines `cos` in one pass that widens, scales and shifts
    (eager whole-buffer passes, as on a GPU: each pass reads and writes the buffer; on CUDA
    this one replaces a conversion, a scaling, a row maximum over fp32 and a subtraction;
    on a CPU, where mixed-dtype arithmetic widens through a temporary, the conversion
    stays a pass of its own: `mixed_kernel` False). ref:
    `reference`, or an upper bound of each row's largest logit taken on the 16-bit cosines,
    scale max_j cos_ij, raised to the target's logit where that is larger (any bound is a
    valid shift: the sums of exponentials and the probabilities do not depend on it, and
    this one is within scale (cos_t - the margin's target cosine) of the maximum). The
    targets' entries are z_t - ref."""
    if reference is None:
        bound = cos.amax(dim=1).to(z_t.dtype) * scale
        reference = torch.where(inside, torch.maximum(bound, z_t), bound)
    z = out[: cos.shape[0]]
    if mixed_kernel:  # (CUDA: mixed dtypes in one kernel)
        torch.add(-reference[:, None], cos, alpha=scale, out=z)
    else:  # (the CPU would widen `cos` into a temporary the size of `out` first)
        torch.add(-reference[:, None], z.copy_(cos), alpha=scale, out=z)
    _put_targets_(z, inside, cols, z_t - reference)
    return z, reference


def _masked(inside: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` [G] where `inside`, 0 elsewhere (a where, so inf/nan outside cannot leak)."""
    return torch.where(inside, values, torch.zeros_like(values))


class _Targets:
    """The targets this rank owns, as a mask over the G rows of the batch (`owned`) and
    each row's column among the centres in use (`cols`, 0 where not owned). Sync-free:
    no list of owned rows is ever sized on the host."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.owned = targets >= 0
        self.cols = targets.clamp_min(0)

    def in_block(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows whose target lies in [start, end) [G] bool, its column relative to `start`
        [G], 0 for the other rows)."""
        inside = self.owned & (self.cols >= start) & (self.cols < end)
        return inside, torch.where(inside, self.cols - start, torch.zeros_like(self.cols))


class _DotsToLogits:
    """How a block's dots [G, c] (x^ . w_j; the cosines themselves under `uses_bf16_cosines`)
    become its logits: scaled by `factor` (s / ||w_j||, or s; the bias when not normalised)
    and given the targets' fp32 logits, a row block at a time, in place (`scale_`) or
    widened from a bf16 block into fp32 scratch (`widen`)."""

    def __init__(self, factor: torch.Tensor | float, normalized: bool, inside: torch.Tensor, cols: torch.Tensor,
                 z_t: torch.Tensor) -> None:
        self.factor, self.normalized = factor, normalized
        self.inside, self.cols, self.z_t = inside, cols, z_t

    def scale_(self, z: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """In place: raw dots z of the rows [start, end) -> their logits."""
        z.mul_(self.factor) if self.normalized else z.add_(self.factor)
        _put_targets_(z, self.inside[start:end], self.cols[start:end], self.z_t[start:end])
        return z

    def widen(self, raw: torch.Tensor, start: int, end: int, scratch: torch.Tensor) -> torch.Tensor:
        """The fp32 logits of rows [start, end) of `raw`, in `scratch[: end - start]`."""
        # (a plain conversion first: CPU mixed-dtype arithmetic is slow)
        return self.scale_(scratch[: end - start].copy_(raw[start:end]), start, end)


class _Operands:
    """Normalised embeddings, the centres in use, their norms and the margin; `xh_c` and
    `w_c` are the GEMM operands in the compute dtype (the same tensors when it is the
    centres' own dtype)."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 margin: Margin, compute_dtype: torch.dtype | None = None,
                 logits_dtype: torch.dtype | None = None, policy: BlockPolicy | None = None,
                 compiled: bool = False, chunk_rows: int | None = None) -> None:
        self.margin, self.w, self.b = margin, w, b
        self.policy = policy or policy_for(w.device)
        self.passes = compiled_passes() if compiled else None
        self.compute_dtype = compute_dtype or w.dtype
        self.logits_dtype = logits_dtype or self.compute_dtype
        # 16-bit embeddings (an autocast backbone's) are widened first: their norms and the
        # target cosines are fp32 numbers, and CPU mixed-dtype kernels are slow
        x = x.to(torch.promote_types(x.dtype, w.dtype))
        if margin.normalized:
            self.x_norm = torch.linalg.vector_norm(x, dim=1).clamp_min(NORM_EPS)
            self.xh = x / self.x_norm[:, None]
        else:
            self.x_norm = self.inv_w_norm = None
            self.xh = x
        self.xh_c = self.xh.to(self.compute_dtype)
        self.cosines16 = uses_bf16_cosines(self.compute_dtype, w.dtype, margin, compiled, b is not None)
        self.cosine_rows = uses_cosine_rows(self.compute_dtype, w.dtype, margin, compiled, b is not None)
        if margin.normalized and not self.cosines16:  # (the bf16 cosines' copy takes them in its pass)
            self.inv_w_norm = torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS).reciprocal()
        # chunked with 16-bit GEMMs: the 16-bit copy is made one column block at a time (the
        # memory chunk_size bounds; a whole copy is half the fp32 centres), again in backward
        # for the blocks it rebuilds; with the bf16 cosines the norms come with the forward's
        # copies (`inv_w_norm` is complete once the forward has gone over every block)
        self.chunk_rows = chunk_rows if self.compute_dtype != w.dtype else None
        self._chunk: torch.Tensor | None = None
        self._chunk_range: tuple[int, int] | None = None
        self._forward_done = False
        if self.chunk_rows is not None:
            self.pooled_w_c, self.w_c = False, None
            if self.cosines16:
                self.inv_w_norm = w.new_empty(w.shape[0])
        else:
            self.pooled_w_c = self.policy.reuse_buffers and self.compute_dtype != w.dtype
            self.w_c = self.centres_for_gemms(self.take(w.shape, self.compute_dtype) if self.pooled_w_c else None)
        self.b_c = None if b is None else b.to(self.logits_dtype)
        chunked16 = self.chunk_rows is not None and self.cosines16  # (its norms are taken later; unused here)
        self.inv_w_norm_c = None if self.inv_w_norm is None or chunked16 else self.inv_w_norm.to(self.logits_dtype)

    def centres_for_gemms(self, out: torch.Tensor | None) -> torch.Tensor:
        """The centres in the GEMMs' dtype, in `out` or a new tensor; with the bf16 cosines,
        normalised, and their inverse norms (`inv_w_norm`) taken in the same pass."""
        if self.compute_dtype == self.w.dtype:
            return self.w
        if out is None:
            out = torch.empty(self.w.shape, dtype=self.compute_dtype, device=self.w.device)
        if self.cosines16:
            self.inv_w_norm = bf16_exponentials.normalized_copy_(out, self.w, NORM_EPS, self.policy)
            return out
        return out.copy_(self.w)

    def centres_c(self, start: int, end: int) -> torch.Tensor:
        """The centres [start, end) in the GEMMs' dtype (normalised with the bf16 cosines): a
        slice of the whole copy, or, chunked, the block converted into the chunk buffer
        (kept while the same block is asked for again)."""
        if self.chunk_rows is None:
            return self.w_c[start:end]
        if self._chunk is None:
            self._chunk = self.take((self.chunk_rows, self.w.shape[1]), self.compute_dtype)
        out = self._chunk[: end - start]
        if self._chunk_range != (start, end):
            rows = self.w[start:end]
            if not self.cosines16:
                out.copy_(rows)
            elif not self._forward_done:
                self.inv_w_norm[start:end] = bf16_exponentials.normalized_copy_(out, rows, NORM_EPS, self.policy)
            else:  # (backward: the forward took the norms)
                bf16_exponentials.scaled_copy_(out, rows, self.inv_w_norm[start:end], self.policy)
            self._chunk_range = (start, end)
        return out

    def forward_done(self) -> None:
        """The forward has converted every block (the norms are complete)."""
        self._forward_done = True

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new [shape] tensor, from the buffer pool under a policy that reuses buffers."""
        return buffer_pool.take_if(self.policy.reuse_buffers, tuple(shape), dtype, self.w.device)

    def take_outgoing(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new [shape] tensor that autograd hands on (a gradient), on pages of an earlier
        one nobody holds any more under a policy that reuses buffers."""
        return buffer_pool.take_outgoing_if(self.policy.reuse_buffers, tuple(shape), dtype, self.w.device)

    def give(self, tensor: torch.Tensor | None) -> None:
        """Done with a tensor from `take` (or `block_cosines`)."""
        buffer_pool.give_if(self.policy.reuse_buffers, tensor)

    def release(self) -> None:
        """Backward is done: the 16-bit copy of the centres (or the chunk buffer) goes back
        to the pool."""
        if self.pooled_w_c:
            self.give(self.w_c)
            self.w_c, self.pooled_w_c = None, False
        if self._chunk is not None:
            self.give(self._chunk)
            self._chunk, self._chunk_range = None, None

    def reacquire(self) -> None:
        """A second backward of the same forward (`retain_graph=True`) after `release`:
        the 16-bit copy again, outside the pool (chunked: made again block by block)."""
        if self.w_c is None and self.chunk_rows is None:
            self.w_c = self.centres_for_gemms(None)

    def target_cosines(self, tgt: _Targets, num_rows: int) -> torch.Tensor:
        """cos (raw logit if not normalised) of each row with its class; 0 where not owned."""
        w_t = self.w.index_select(0, tgt.cols)
        values = (self.xh * w_t).sum(1)
        if self.margin.normalized and self.cosines16 and self.chunk_rows is not None:  # (norms not taken yet)
            values = values / torch.linalg.vector_norm(w_t, dim=1).clamp_min(NORM_EPS)
        elif self.margin.normalized:
            values = values * self.inv_w_norm.index_select(0, tgt.cols)
        else:
            values = values + self.b.index_select(0, tgt.cols)
        return _masked(tgt.owned, values)

    def raw_block(self, start: int, end: int) -> torch.Tensor:
        """x^ . w_j [G, end - start] of the centres [start, end), in the logits' dtype (with
        the bf16 cosines: the cosines themselves, in bf16)."""
        dtype = self.compute_dtype if self.cosines16 else self.logits_dtype
        block = self.take((self.xh_c.shape[0], end - start), dtype)
        if dtype == self.compute_dtype:
            torch.mm(self.xh_c, self.centres_c(start, end).t(), out=block)
        else:  # a 16-bit GEMM into a wider buffer, a column chunk at a time
            w_c = self.centres_c(start, end)
            for a, b in self.policy.mm_blocks(end - start):
                block[:, a:b] = torch.mm(self.xh_c, w_c[a:b].t())
        return block

    def block_cosines(self, start: int, end: int, scale: float = 1.0) -> torch.Tensor:
        """`scale * cos` [G, end - start] (raw logits if not normalised): a GEMM + one pass."""
        block = self.raw_block(start, end)
        if self.cosines16:  # the GEMM gave the cosines
            return block if scale == 1.0 else block.mul_(scale)
        if self.margin.normalized:
            block.mul_(self.inv_w_norm_c[start:end] * scale)
        else:
            block.add_(self.b_c[start:end])
        return block

    def linear_block_stats(self, start: int, end: int, tgt: _Targets,
                           z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A margin whose non-target logits are `s cos`, eager, without the bf16 cosines: the
        block's logits [G, c] with the targets in place, their row maxima [G] and sums of
        exponentials [G] (fp32 for 16-bit logits). After the GEMM, one pass over the buffer:
        each row block is scaled, gets its targets, and gives its maxima and sum-exp while
        in cache (the same numbers as `block_cosines`, `amax` and `_sum_exp_rows` one after
        the other)."""
        logits = self.raw_block(start, end)
        rows = self.dots_to_logits(start, end, tgt, z_t)
        floor = exp_floor(_accumulation_dtype(logits.dtype))
        row_max, sum_exp = z_t.new_empty(logits.shape[0]), z_t.new_empty(logits.shape[0])
        blocks = self.policy.row_blocks(*logits.shape)
        scratch = logits.new_empty(blocks[0][1], logits.shape[1], dtype=_accumulation_dtype(logits.dtype))
        for a, b in blocks:
            z, p = rows.scale_(logits[a:b], a, b), scratch[: b - a]
            row_max[a:b] = z.amax(dim=1)
            torch.sub(z, row_max[a:b, None], out=p)
            p.clamp_min_(floor).exp_()
            torch.sum(p, dim=1, out=sum_exp[a:b])
        return logits, row_max, sum_exp

    def exponential_block_stats(self, start: int, end: int, tgt: _Targets, z_t: torch.Tensor,
                                rows: torch.Tensor | None, keep: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bf16 cosines (`uses_bf16_cosines`): the block's GEMM into bf16, then one pass
        a row block at a time in fp32 scratch giving the row maxima m_i [G] and the sums of
        exponentials [G] of its logits; when it is `keep`-t for backward, the exponentials
        exp(z_ij - m_i) (times dz_ij/dcos_ij for a non-linear margin, `_exponential_rows`)
        written back over the block in bf16. Returns (block, maxima, sums)."""
        block = self.raw_block(start, end)
        row_max, sum_exp = z_t.new_empty(block.shape[0]), z_t.new_empty(block.shape[0])
        self._exponential_rows(block, start, end, tgt, z_t, rows, None, keep, row_max, sum_exp)
        return block, row_max, sum_exp

    def _exponential_rows(self, block: torch.Tensor, start: int, end: int, tgt: _Targets, z_t: torch.Tensor,
                          rows: torch.Tensor | None, relative_to: torch.Tensor | None, write: bool,
                          row_max: torch.Tensor | None = None, sum_exp: torch.Tensor | None = None) -> None:
        """Over the bf16 cosines `block` [G, c] of the centres [start, end), a row block at a
        time in fp32 scratch: the logits (targets in place), then exp(z_ij - ref_i) with ref
        `relative_to` [G], or (None) the row maxima, written into `row_max`, and their sums
        into `sum_exp` (when given); with `write`, those exponentials, times the margin's
        dz/dcos where it is not the constant s (taken from the cosines before the logits
        replace them), go back over the block in bf16."""
        margin, linear = self.margin, self.margin.linear_nontarget
        to_logits = self.dots_to_logits(start, end, tgt, z_t)
        inside, cols = to_logits.inside, to_logits.cols
        floor = exp_floor(torch.float32)
        blocks = self.policy.row_blocks(*block.shape)
        scratch = block.new_empty(blocks[0][1], block.shape[1], dtype=torch.float32)
        whole = self.policy.row_block_elements is None  # (one pass over the whole block: a GPU)
        for a, b in blocks:
            slope = None
            if linear and whole:  # (z comes shifted: z - ref)
                z, reference = _shifted_linear_logits(block, scratch, margin.scale, inside, cols, z_t, relative_to,
                                                      block.device.type == "cuda")
            else:
                if linear:
                    z = to_logits.widen(block, a, b, scratch)
                else:
                    c, r = scratch[: b - a].copy_(block[a:b]), None if rows is None else rows[a:b]
                    slope = margin.nontarget_grad(c, r) if write else None  # (a new tensor: c becomes z)
                    z = margin.nontarget_logits(c, r)
                    _put_targets_(z, inside[a:b], cols[a:b], z_t[a:b])
                reference = relative_to[a:b] if relative_to is not None else z.amax(dim=1)
                z = z.sub_(reference[:, None])
            if row_max is not None:
                row_max[a:b] = reference
            z = z.clamp_min_(floor).exp_()
            if sum_exp is not None:
                torch.sum(z, dim=1, out=sum_exp[a:b])
            if write:
                block[a:b].copy_(z if slope is None else z.mul_(slope))

    def nonlinear_block_stats(self, start: int, end: int, tgt: _Targets, z_t: torch.Tensor,
                              rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A non-linear margin with `cosine_rows`: the block's cosines [G, c] (in the centres'
        dtype), and the row maxima and sums of exponentials [G] of its logits, taken a row
        block at a time in scratch (the logits are never stored)."""
        cos = self.block_cosines(start, end)
        inside, cols = tgt.in_block(start, end)
        floor = exp_floor(z_t.dtype)
        row_max, sum_exp = z_t.new_empty(cos.shape[0]), z_t.new_empty(cos.shape[0])
        blocks = self.policy.row_blocks(*cos.shape)
        scratch = cos.new_empty(blocks[0][1], cos.shape[1], dtype=z_t.dtype)
        for a, b in blocks:
            r = None if rows is None else rows[a:b]
            z = self.margin.nontarget_logits(scratch[: b - a].copy_(cos[a:b]), r)
            _put_targets_(z, inside[a:b], cols[a:b], z_t[a:b])
            row_max[a:b] = z.amax(dim=1)
            z = z.sub_(row_max[a:b, None]).clamp_min_(floor).exp_()
            torch.sum(z, dim=1, out=sum_exp[a:b])
        return cos, row_max, sum_exp

    def exponentials_of_block(self, start: int, end: int, tgt: _Targets, z_t: torch.Tensor,
                              rows: torch.Tensor | None, relative_to: torch.Tensor) -> torch.Tensor:
        """Backward of a block not kept (chunked, or a second backward): its GEMM again, and
        exp(z_ij - relative_to_i) (times dz/dcos, as in the forward) written over it in bf16,
        the same numbers as the forward's for the same `relative_to` (its maxima: a block it
        kept; the log-sum-exp: the probabilities themselves)."""
        block = self.raw_block(start, end)
        self._exponential_rows(block, start, end, tgt, z_t, rows, relative_to, True)
        return block

    def dots_to_logits(self, start: int, end: int, tgt: _Targets, z_t: torch.Tensor) -> _DotsToLogits:
        """How the logits of the centres [start, end) come out of their raw dots x^ . w_j."""
        normalized = self.margin.normalized
        if self.cosines16:  # the GEMM gave the cosines
            factor = self.margin.scale
        else:
            factor = self.inv_w_norm_c[start:end] * self.margin.scale if normalized else self.b_c[start:end]
        return _DotsToLogits(factor, normalized, *tgt.in_block(start, end), z_t)

    def block_logits(self, start: int, end: int, tgt: _Targets, z_t: torch.Tensor,
                     rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the centres [start, end) with the target logits in place, and (for
        margins with non-linear non-target logits) the cosines they came from."""
        if self.margin.linear_nontarget:
            logits = self.block_cosines(start, end, self.margin.scale)
            _put_targets_(logits, *tgt.in_block(start, end), z_t)
            return logits, None
        cos = self.block_cosines(start, end)
        return self.logits_of_cosines(cos, start, end, tgt, z_t, rows), cos

    def logits_of_cosines(self, cos: torch.Tensor, start: int, end: int, tgt: _Targets, z_t: torch.Tensor,
                          rows: torch.Tensor | None) -> torch.Tensor:
        """A margin with non-linear non-target logits: its logits [G, c] of a block of
        cosines (which it does not modify), with the target logits in place."""
        if self.passes is not None:
            logits = self.passes.nontarget_logits(self.margin, cos, rows)
        else:
            logits = _nontarget_logits(self.margin, cos, rows, self.policy, self.take(cos.shape, cos.dtype))
        _put_targets_(logits, *tgt.in_block(start, end), z_t)
        return logits

    def sum_exp_rows(self, logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
        if self.passes is not None:
            return self.passes.sum_exp_rows(logits, row_max, exp_floor(_accumulation_dtype(logits.dtype)))
        return _sum_exp_rows(logits, row_max, self.policy)


def _nontarget_logits(margin: Margin, cos: torch.Tensor, rows: torch.Tensor | None,
                      policy: BlockPolicy, logits: torch.Tensor) -> torch.Tensor:
    """The margin's non-target logits of a block of cosines, written into `logits` (a
    buffer of cos's shape and dtype), one row block of the policy at a time (on a CPU the
    formula's temporaries then stay in cache and on malloc's heap); 16-bit cosines are
    computed in fp32."""
    dtype = _accumulation_dtype(cos.dtype)
    for start, end in policy.row_blocks(*cos.shape):
        r = None if rows is None else rows[start:end]
        out = logits[start:end]
        if dtype == cos.dtype:
            done = margin.nontarget_logits(out.copy_(cos[start:end]), r)
        else:
            done = margin.nontarget_logits(cos[start:end].to(dtype), r)
        if done is not out:
            out.copy_(done)
    return logits


class MarginSoftmaxCrossEntropy(torch.autograd.Function):
    """Sharded margin-softmax cross-entropy (see the module docstring).

    Inputs: x [G, D] gathered embeddings; weight [C_local, D]; bias [C_local] or None;
    index [S] sorted rows of `weight` in use (sampling) or None; targets [G] long, the
    column of each row's class among the rows in use, -1 where another rank owns it;
    margin; process group; chunk_size (None: one block, logits kept for backward);
    compute_dtype of the GEMMs and the logit buffer (None: the centres' dtype);
    logits_dtype; policy (a `BlockPolicy`; None: the centres' device's); compiled (run
    the elementwise passes compiled, `fr_trainer.heads.fused`); row_update (None, or
    `row_update(start, end, grad_rows)`, called in backward with each piece's finished rows
    of the centres' gradient instead of returning the whole gradient: see `_CentreGradRows`).
    Returns the scalar loss.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, index, targets, margin, group, chunk_size, compute_dtype=None,
                logits_dtype=None, policy=None, compiled=False, row_update=None):
        policy = policy or policy_for(weight.device)
        w = weight if index is None else _selected_rows(weight.detach(), index, policy)
        b = None if bias is None else (bias if index is None else bias.index_select(0, index))
        num_rows, num_cols = x.shape[0], w.shape[0]
        blocks = _column_blocks(num_cols, chunk_size)
        chunk_rows = max(end - start for start, end in blocks) if len(blocks) > 1 else None
        ops = _Operands(x.detach(), w.detach(), None if b is None else b.detach(), margin, compute_dtype,
                        logits_dtype, policy, compiled, chunk_rows)
        tgt = _Targets(targets)

        cos_t = ops.target_cosines(tgt, num_rows)
        target_cos = None
        if margin.needs_global_target:
            target_cos = all_reduce_(cos_t.clone(), dist.ReduceOp.SUM, group)
            margin.update_state(target_cos)
        norm_terms = _NormTerms(margin, ops.x_norm) if margin.needs_norms else None
        z_t, dz_t, dz_dnorm = margin.target_terms(cos_t if target_cos is None else target_cos,
                                                  None if norm_terms is None else norm_terms.norms)
        rows = margin.nontarget_rows(target_cos)  # (per-row terms of the non-target formula, once)

        # the last block keeps what backward needs instead of a fourth GEMM over it: the
        # logits of a linear margin, or the cosines of a non-linear one (its logits are
        # rebuilt from them); chunked, the backward rebuilds only the blocks before it
        maxima, sums, kept = [], [], None
        for start, end in blocks:
            keep = end == num_cols
            logits = cos = None
            if ops.cosines16:  # (the block becomes its exponentials when kept)
                logits, block_max, block_sum = ops.exponential_block_stats(start, end, tgt, z_t, rows, keep)
            elif margin.linear_nontarget and ops.passes is None:
                logits, block_max, block_sum = ops.linear_block_stats(start, end, tgt, z_t)
            elif ops.cosine_rows:  # (the logits live only in cached row blocks)
                cos, block_max, block_sum = ops.nonlinear_block_stats(start, end, tgt, z_t, rows)
            else:
                logits, cos = ops.block_logits(start, end, tgt, z_t, rows)
                block_max = logits.amax(dim=1).to(z_t.dtype)
                block_sum = ops.sum_exp_rows(logits, block_max)
            maxima.append(block_max)
            sums.append(block_sum)
            if logits is not None and not ops.cosines16 and logits.dtype != z_t.dtype:  # (targets: fp32 logits)
                _exact_target_terms_(sums[-1], logits, maxima[-1], z_t, *tgt.in_block(start, end))
            kept = (logits if cos is None else cos) if keep else None
            if kept is not logits:
                ops.give(logits)
            if kept is not cos:
                ops.give(cos)
        ops.forward_done()
        block_max = torch.stack(maxima)
        local_max = block_max.amax(dim=0)
        row_max = all_reduce_(local_max.clone(), dist.ReduceOp.MAX, group)
        sum_exp = (torch.stack(sums) * torch.exp(block_max - row_max)).sum(0)
        z_owned = _masked(tgt.owned, z_t)
        joined = all_reduce_(torch.stack([sum_exp, z_owned]), dist.ReduceOp.SUM, group)
        log_sum_exp = row_max + torch.log(joined[0])
        loss = (log_sum_exp - joined[1]).mean()
        if norm_terms is not None:
            loss = loss + norm_terms.penalty_mean
            norm_terms.dz_dnorm = dz_dnorm

        ctx.ops, ctx.tgt, ctx.blocks, ctx.kept = ops, tgt, blocks, kept
        ctx.index, ctx.weight_shape, ctx.has_bias = index, weight.shape, bias is not None
        ctx.cos_t, ctx.z_t, ctx.dz_t, ctx.target_cos, ctx.rows = cos_t, z_t, dz_t, target_cos, rows
        ctx.log_sum_exp = log_sum_exp
        ctx.kept_block = blocks[-1]
        ctx.kept_max = maxima[-1]  # the maxima the kept block's exponentials are relative to
        ctx.norm_terms = norm_terms
        ctx.row_update = row_update
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ops, tgt, margin = ctx.ops, ctx.tgt, ctx.ops.margin
        ops.reacquire()
        coef = grad_loss / ops.xh.shape[0]
        normalized = margin.normalized
        grad_xh = torch.zeros_like(ops.xh)
        rows = _CentreGradRows(ops, ctx.blocks, ctx.row_update)
        grad_b = ops.w.new_empty(ops.w.shape[0]) if ctx.has_bias else None
        radial = ops.w.new_zeros(ops.w.shape[0]) if normalized else None
        for start, end in reversed(ctx.blocks):  # the kept block first
            if ops.cosines16:
                _exponentials_block_grad_(ops, tgt, ctx, coef, start, end, grad_xh, rows)
                continue
            if ops.cosine_rows:  # H over the kept (or recomputed) cosines, the logits rebuilt per row block
                cos = ctx.kept if ctx.kept is not None else ops.block_cosines(start, end)
                ctx.kept = None
                h = _cosine_rows_grad_(ops, cos, tgt, ctx, coef, start, end, radial[start:end])
                _fp32_gemms_(ops, h, start, end, radial, grad_xh, rows)
                ops.give(h)
                continue
            if ctx.kept is not None and margin.linear_nontarget:
                logits, cos = ctx.kept, None
                ctx.kept = None
            elif ctx.kept is not None:
                cos, ctx.kept = ctx.kept, None
                logits = ops.logits_of_cosines(cos, start, end, tgt, ctx.z_t, ctx.rows)
            else:
                logits, cos = ops.block_logits(start, end, tgt, ctx.z_t, ctx.rows)
            mixed = ops.compute_dtype != grad_xh.dtype
            deferred = mixed and ops.compute_dtype == torch.float16  # (see _mixed_gemms_)
            h, inside, cols, h_t, factor = _block_grad_(ops, logits, cos, start, end, tgt, ctx, coef, radial,
                                                        deferred)
            # the block's radial coefficients are complete: the centres' gradient is
            # sum_i H_ij x^_i minus its radial part w_j * radial_j / ||w_j||^2
            if not mixed:
                _fp32_gemms_(ops, h, start, end, radial, grad_xh, rows)
                if grad_b is not None:
                    torch.sum(h, dim=0, out=grad_b[start:end])
            else:  # 16-bit GEMMs of H / f without the targets; f and the targets in fp32
                _put_targets_(h, inside, cols, torch.zeros_like(h_t))
                radial_part = None if radial is None else radial[start:end] * ops.inv_w_norm[start:end].square()
                # h_t is 0 on the rows whose target is elsewhere: adding their terms is a no-op
                target_xh = h_t[:, None] * ops.w[start:end].index_select(0, cols)  # (before a fused update moves w)
                _mixed_gemms_(ops, h, factor, start, end, grad_xh, rows, radial_part, cols, h_t[:, None] * ops.xh,
                              target_xh)
                if grad_b is not None:
                    torch.sum(h, dim=0, dtype=grad_b.dtype, out=grad_b[start:end])
                    if factor is not None:
                        grad_b[start:end].mul_(factor)
                    grad_b[start:end].index_add_(0, cols, h_t)
            ops.give(h)
            ops.give(cos)
        ops.release()
        grad_w = rows.finish()
        grad_x = grad_xh
        if normalized:
            xh = ops.xh
            grad_x = (grad_xh - xh * (xh * grad_xh).sum(1, keepdim=True)) / ops.x_norm[:, None]
            if ctx.norm_terms is not None and margin.norm_gradient:  # dL/d||x|| along x / ||x||
                grad_x.addcmul_(xh, ctx.norm_terms.grad_norms(ctx, coef)[:, None])
        grad_weight, grad_bias = grad_w, grad_b  # (grad_w None: updated a piece at a time)
        if ctx.index is not None:
            grad_weight = _sparse_rows(ctx.index, grad_w, ctx.weight_shape)
            if grad_b is not None:
                grad_bias = _sparse_rows(ctx.index, grad_b, ctx.weight_shape[:1])
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, None


class _CentreGradRows:
    """Where the backward writes the rows of the centres' gradient, a piece of rows at a time
    (`pieces(start, end)`, `rows(a, b)`, then `done(a, b)` once they are final): the rows of one
    [C, D] tensor that becomes `weight.grad` (a block is one piece), or, with `row_update`
    (the fused update: `PartialFC.update_in_backward`), one piece-sized buffer handed to
    `row_update(a, b, rows)` as soon as the piece is done, so the whole gradient never exists
    (pieces of `BlockPolicy.piece_rows` classes, cut from each block's start)."""

    def __init__(self, ops: _Operands, blocks: list[tuple[int, int]], row_update) -> None:
        self.ops, self.row_update = ops, row_update
        if row_update is None:
            self.grad = ops.take_outgoing(ops.w.shape, ops.w.dtype)  # what becomes weight.grad
        else:
            most = min(max(end - start for start, end in blocks), ops.policy.piece_rows)
            self.grad = ops.take((most,) + tuple(ops.w.shape[1:]), ops.w.dtype)

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(start, end)] if self.row_update is None else self.ops.policy.pieces(start, end)

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.grad[a:b] if self.row_update is None else self.grad[: b - a]

    def done(self, a: int, b: int) -> None:
        if self.row_update is not None:
            self.row_update(a, b, self.grad[: b - a])

    def finish(self) -> torch.Tensor | None:
        """The whole gradient, or None once the pieces have been handed on."""
        if self.row_update is None:
            return self.grad
        self.ops.give(self.grad)
        return None


def _fp32_gemms_(ops: _Operands, h: torch.Tensor, start: int, end: int, radial: torch.Tensor | None,
                 grad_xh: torch.Tensor, rows: _CentreGradRows) -> None:
    """The two backward GEMMs of H [G, c] in the centres' dtype for the centres [start, end):
    into grad_xh, and, a piece at a time, the centres' gradient rows = H^T x^ minus the radial
    part w_j radial_j / ||w_j||^2 (an accumulating GEMM onto the radial part: one [c, D] pass
    fewer)."""
    grad_xh.addmm_(h, ops.w[start:end])
    minus_radial = None if radial is None else (radial[start:end] * ops.inv_w_norm[start:end].square()).neg_()
    for a, b in rows.pieces(start, end):
        out, h_piece = rows.rows(a, b), h[:, a - start:b - start]
        if minus_radial is None:
            torch.mm(h_piece.t(), ops.xh, out=out)
        else:
            torch.mul(ops.w[a:b], minus_radial[a - start:b - start, None], out=out)
            out.addmm_(h_piece.t(), ops.xh)
        rows.done(a, b)


def _cosine_rows_grad_(ops: _Operands, cos: torch.Tensor, tgt: _Targets, ctx, coef: torch.Tensor, start: int,
                       end: int, radial: torch.Tensor) -> torch.Tensor:
    """`cosine_rows`: the cosines [G, c] of the centres [start, end) turned in place, a row
    block at a time, into H = dL/dcos / ||w_j|| (the logits rebuilt in scratch, the targets'
    dL/dcos put in), adding sum_i dL/dcos_ij cos_ij into `radial` [c]. Returns H."""
    margin = ops.margin
    inside, cols = tgt.in_block(start, end)
    g_t = _target_grad(torch.exp(ctx.z_t - ctx.log_sum_exp), ctx, inside, coef)
    inv_norm = ops.inv_w_norm[start:end]
    floor = exp_floor(cos.dtype)
    blocks = ops.policy.row_blocks(*cos.shape)
    scratch = cos.new_empty(blocks[0][1], cos.shape[1])
    for a, b in blocks:
        c = cos[a:b]
        r = None if ctx.rows is None else ctx.rows[a:b]
        probs = margin.nontarget_logits(scratch[: b - a].copy_(c), r)
        probs = probs.sub_(ctx.log_sum_exp[a:b, None]).clamp_min_(floor).exp_()
        probs.mul_(margin.nontarget_grad(c, r)).mul_(coef)
        _put_targets_(probs, inside[a:b], cols[a:b], g_t[a:b])
        radial += c.mul_(probs).sum(0)  # (the cosines are done with: their rows take dL/dcos cos, then H)
        torch.mul(probs, inv_norm, out=c)
    return cos


def _target_grad(p_t: torch.Tensor, ctx, inside: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """dL/dcos at the targets of the rows `inside` [G] (0 on the other rows), from the
    targets' probabilities p_t [G]."""
    return _masked(inside, (p_t - 1.0) * coef * ctx.dz_t)


def _exponentials_block_grad_(ops: _Operands, tgt: _Targets, ctx, coef: torch.Tensor, start: int, end: int,
                              grad_xh: torch.Tensor, rows: _CentreGradRows) -> None:
    """The bf16 exponentials' backward of the centres [start, end): add into `grad_xh`,
    write this block's rows of the centres' gradient through `rows`, from exponentials e_ij = exp(z_ij - ref_i) (times
    dz_ij/dcos_ij for a non-linear margin), p = e r with r = exp(ref - lse): the kept ones
    (ref: the forward's maxima), or recomputed the same way (a second backward), or, for
    the blocks before the kept one (chunked), the probabilities themselves (ref = lse, r =
    1). dL/dcos off the targets is then coef r_i e_ij (times s for a linear margin, whose
    dz/dcos = s stays out of the block): a row factor."""
    reference = ctx.kept_max if (start, end) == ctx.kept_block else ctx.log_sum_exp
    if ctx.kept is not None:
        e, ctx.kept = ctx.kept, None
    else:
        e = ops.exponentials_of_block(start, end, tgt, ctx.z_t, ctx.rows, reference)
    row_factor = coef * torch.exp(reference - ctx.log_sum_exp)
    if ops.margin.linear_nontarget:
        row_factor = row_factor * ops.margin.scale
    _bf16_epilogue_(ops, tgt, ctx, coef, start, end, e, row_factor, grad_xh, rows)


def _bf16_epilogue_(ops: _Operands, tgt: _Targets, ctx, coef: torch.Tensor, start: int, end: int,
                    block: torch.Tensor, row_factor: torch.Tensor, grad_xh: torch.Tensor,
                    rows: _CentreGradRows) -> None:
    """The bf16 block [G, c] of dL/dcos / row_factor, its targets zeroed (their terms are
    added in fp32), through `bf16_exponentials.backward_`; the block goes back to the pool."""
    inside, cols = tgt.in_block(start, end)
    _put_targets_(block, inside, cols, torch.zeros_like(row_factor))
    g_t = _target_grad(torch.exp(ctx.z_t - ctx.log_sum_exp), ctx, inside, coef)
    bf16_exponentials.backward_(block, row_factor, g_t, cols, ops.xh, ops.w[start:end], ops.centres_c(start, end),
                                ops.inv_w_norm[start:end], grad_xh, rows, start, ops.policy, ops.take, ops.give)
    ops.give(block)


def _block_grad_(ops: _Operands, logits: torch.Tensor, cos: torch.Tensor | None, start: int,
                 end: int, tgt: _Targets, ctx, coef: torch.Tensor,
                 radial: torch.Tensor | None, deferred: bool = False) -> tuple:
    """Turn a block of logits [G, c] in place into H = dL/d(x^ . w_j) (that is dL/dcos
    divided by ||w_j||; dL/dz for the plain softmax), adding the block's radial
    coefficients sum_i dL/dcos_ij cos_ij into `radial[start:end]`. Returns (H, the
    block's target-row mask [G], their columns [G], H at the targets in full precision
    (0 on the other rows), None).

    `deferred` (fp16 GEMMs; bf16 has fp32's range and needs none): the buffer keeps
    H / f_j with a column factor f [c] that is returned last instead of None: the 1/G of
    the mean, the loss scale of a GradScaler, the logit scale and 1/||w_j|| stay out of
    the 16-bit numbers (which then stay within a few units, so fp16 cannot overflow at
    any loss scale) and are applied in fp32."""
    margin = ops.margin
    inside, cols = tgt.in_block(start, end)
    cos_t = ctx.cos_t if ctx.target_cos is None else ctx.target_cos
    p_t = torch.exp(ctx.z_t - ctx.log_sum_exp)
    g_t = _target_grad(p_t, ctx, inside, coef)
    inv_norm = ops.inv_w_norm[start:end] if margin.normalized else None
    deferred_factor = None
    if margin.linear_nontarget:
        factor = coef * margin.scale
        factor = factor * inv_norm if inv_norm is not None else factor.expand(end - start)
        if deferred:
            deferred_factor, factor = factor, torch.ones_like(factor)
        if ops.passes is not None:
            block_radial = ops.passes.linear_softmax_grad(logits, ctx.log_sum_exp, factor, radial is not None,
                                                          exp_floor(_accumulation_dtype(logits.dtype)))
        else:
            block_radial = _linear_softmax_grad_(logits, ctx.log_sum_exp, factor, radial is not None, ops.policy)
        if radial is not None:
            # the pass counted dL/dcos * cos = coef * p * z everywhere; fix the targets
            block_radial.mul_(coef)
            block_radial.index_add_(0, cols, _masked(inside, g_t * cos_t - coef * p_t * ctx.z_t))
            radial[start:end] += block_radial
    else:
        _nonlinear_grad_(logits, cos, inside, cols, g_t, ctx, coef, margin, inv_norm,
                         None if radial is None else radial[start:end], deferred, ops)
        if deferred:
            deferred_factor = coef * inv_norm if inv_norm is not None else coef.expand(end - start)
    values = g_t * inv_norm[cols] if inv_norm is not None else g_t
    if not deferred:  # (the deferred caller adds the targets exactly itself)
        _put_targets_(logits, inside, cols, values)
    return logits, inside, cols, values, deferred_factor


def _nonlinear_grad_(logits: torch.Tensor, cos: torch.Tensor, inside: torch.Tensor, cols: torch.Tensor,
                     g_t: torch.Tensor, ctx, coef: torch.Tensor, margin: Margin,
                     inv_norm: torch.Tensor | None, radial: torch.Tensor | None, deferred: bool,
                     ops: _Operands) -> None:
    """In place, for margins whose non-target logits are not `s cos`: logits -> dL/dcos
    (times 1/||w_j|| when normalised), adding sum_i dL/dcos_ij cos_ij into `radial`.
    `inside` [G] marks the rows whose target is in this block, at column `cols` [G].
    16-bit blocks are processed in fp32 row blocks (the policy's)."""
    lse = ctx.log_sum_exp
    floor = exp_floor(_accumulation_dtype(logits.dtype))
    if ops.passes is not None:
        ops.passes.nonlinear_grad(margin, logits, cos, inside, cols, g_t, lse, ctx.rows, coef,
                                  inv_norm, radial, deferred, floor)
        return
    for start, end in ops.policy.row_blocks(*logits.shape):  # (temporaries in cache, as above)
        block, c = logits[start:end], cos[start:end]
        rows_in, cols_in, g_in = inside[start:end], cols[start:end], g_t[start:end]
        r = None if ctx.rows is None else ctx.rows[start:end]
        probs = block.to(lse.dtype).sub_(lse[start:end, None]).clamp_min_(floor).exp_()
        probs.mul_(margin.nontarget_grad(c.to(lse.dtype), r))
        if deferred:  # without the column factor coef / ||w_j||; targets added by the caller
            _put_targets_(probs, rows_in, cols_in, torch.zeros_like(g_in))
            if radial is not None:
                radial += coef * (probs * c).sum(0)
                c_t = c.gather(1, cols_in[:, None]).squeeze(1).to(g_in.dtype)
                radial.index_add_(0, cols_in, _masked(rows_in, g_in * c_t))
            if probs is not block:
                block.copy_(probs)
            continue
        probs.mul_(coef)
        _put_targets_(probs, rows_in, cols_in, g_in)
        if radial is not None:
            radial += (probs * c).sum(0)
            if inv_norm is not None:
                probs.mul_(inv_norm)
        if probs is not block:  # 16-bit logits: store the fp32 result
            block.copy_(probs)


class _NormTerms:
    """The per-row embedding norms [G] a norm-aware margin (`needs_norms`) sees, its state
    update, its norm penalty (mean over the global batch: every rank holds the gathered
    embeddings, so it is the same on every rank) and, with `norm_gradient`, dL/d||x_i||."""

    def __init__(self, margin: Margin, x_norm: torch.Tensor) -> None:
        self.norms = x_norm
        margin.update_norm_state(x_norm)
        penalty, self.d_penalty = margin.norm_penalty_terms(x_norm)
        self.penalty_mean = penalty.mean() if penalty is not None else 0.0
        self.dz_dnorm: torch.Tensor | None = None

    def grad_norms(self, ctx, coef: torch.Tensor) -> torch.Tensor:
        """dL/d||x_i|| [G], on the rows whose label this rank owns (zero elsewhere): the
        all-gather's backward sums the ranks, and each row's label has one owner."""
        owned = ctx.tgt.owned
        out = torch.zeros_like(self.norms)
        if self.dz_dnorm is not None:
            p_t = torch.exp(ctx.z_t - ctx.log_sum_exp)
            out.add_(_masked(owned, (p_t - 1.0) * self.dz_dnorm))
        if self.d_penalty is not None:
            out.add_(_masked(owned, self.d_penalty))
        return out.mul_(coef)


def _selected_rows(weight: torch.Tensor, index: torch.Tensor, policy: BlockPolicy) -> torch.Tensor:
    """weight[index] (the sampled centres), on the pages of an earlier step's selection that
    nothing holds any more under a policy that reuses buffers (a fresh 10 MB gather costs 2.6x
    one into mapped pages)."""
    out = buffer_pool.take_outgoing_if(policy.reuse_buffers, (index.shape[0], *weight.shape[1:]), weight.dtype,
                                       weight.device)
    return torch.index_select(weight, 0, index, out=out)


def _sparse_rows(index: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A coalesced sparse COO tensor of `shape` holding `rows` at the sorted `index`."""
    return torch.sparse_coo_tensor(index[None], rows, shape, is_coalesced=True, check_invariants=False)
