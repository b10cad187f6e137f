"""The head's elementwise passes as whole-buffer functions for `torch.compile`.

`PartialFC(compiled=True)` runs these instead of the eager row-blocked passes of
`fr_trainer.heads.margin_softmax`: inductor fuses each one into a single loop (a kernel on
CUDA) with no scratch buffer, where eager code makes one pass per operation. Each function
computes exactly what its eager twin computes (same dtypes: fp32 arithmetic for 16-bit
logits; the same exp floor), so the two paths agree to rounding:

- `sum_exp_rows`: sum_j exp(z_ij - m_i) (forward);
- `nontarget_logits`: the margin's non-target logits of a block of cosines (forward, and
  backward when the logits are rebuilt);
- `linear_softmax_grad`: z -> softmax(z) * f_j in place, with sum_i softmax_ij z_ij;
- `nonlinear_grad`: z -> dL/dcos (times 1/||w_j||) in place for margins whose non-target
  logits are not `s cos`, with the radial sums, the targets written inside the same loop.

Compiled once per process with dynamic shapes (class counts, chunk sizes and sampled sizes
vary); the margin is traced through, so a margin's non-target formula fuses with the pass.
"""

from __future__ import annotations

import functools

import torch

from fr_trainer.margins.base import Margin


def sum_exp_rows(logits: torch.Tensor, row_max: torch.Tensor, floor: float) -> torch.Tensor:
    """sum_j exp(max(z_ij - m_i, floor)) [G] in row_max's dtype; `logits` untouched."""
    return (logits.to(row_max.dtype) - row_max[:, None]).clamp_min(floor).exp().sum(1)


def nontarget_logits(margin: Margin, cos: torch.Tensor, rows: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """The margin's logits of cosines `cos` [G, c], computed in `dtype`, stored in cos's."""
    return margin.nontarget_logits(cos.to(dtype).clone(), rows).to(cos.dtype)


def linear_softmax_grad(logits: torch.Tensor, log_sum_exp: torch.Tensor, factor: torch.Tensor,
                        want_radial: bool, floor: float) -> torch.Tensor | None:
    """In place: logits -> softmax * factor [c]; returns sum_i softmax_ij z_ij when asked."""
    z = logits.to(log_sum_exp.dtype)
    p = (z - log_sum_exp[:, None]).clamp_min(floor).exp()
    radial = (p * z).sum(0) if want_radial else None
    logits.copy_(p * factor)
    return radial


def nonlinear_grad(margin: Margin, logits: torch.Tensor, cos: torch.Tensor, inside: torch.Tensor,
                   cols: torch.Tensor, g_t: torch.Tensor, log_sum_exp: torch.Tensor,
                   rows: torch.Tensor | None, coef: torch.Tensor, inv_norm: torch.Tensor | None,
                   radial: torch.Tensor | None, deferred: bool, floor: float) -> None:
    """In place: logits -> dL/dcos of a non-linear margin (see margin_softmax._nonlinear_grad_);
    the targets (row i, column cols[i] where inside[i]) take g_t, or 0 when `deferred`."""
    c = cos.to(log_sum_exp.dtype)
    probs = (logits.to(log_sum_exp.dtype) - log_sum_exp[:, None]).clamp_min(floor).exp()
    probs = probs * margin.nontarget_grad(c, rows)
    columns = torch.arange(logits.shape[1], device=logits.device)
    is_target = inside[:, None] & (columns[None, :] == cols[:, None])
    if deferred:  # the column factor coef / ||w_j|| stays out; the caller adds the targets
        if radial is not None:
            radial.add_((torch.where(is_target, g_t[:, None], coef * probs) * c).sum(0))
        logits.copy_(torch.where(is_target, torch.zeros_like(probs), probs))
        return
    probs = torch.where(is_target, g_t[:, None], probs * coef)
    if radial is not None:
        radial.add_((probs * c).sum(0))
        if inv_norm is not None:
            probs = probs * inv_norm
    logits.copy_(probs)


class CompiledPasses:
    """The four passes, each wrapped by `torch.compile` (inductor, dynamic shapes)."""

    def __init__(self) -> None:
        compile_ = functools.partial(torch.compile, dynamic=True)
        self._sum_exp_rows = compile_(sum_exp_rows)
        self._nontarget_logits = compile_(nontarget_logits)
        self.linear_softmax_grad = compile_(linear_softmax_grad)
        self.nonlinear_grad = compile_(nonlinear_grad)

    def sum_exp_rows(self, logits: torch.Tensor, row_max: torch.Tensor, floor: float) -> torch.Tensor:
        return self._sum_exp_rows(logits, row_max, floor)

    def nontarget_logits(self, margin: Margin, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        dtype = torch.float32 if cos.dtype in (torch.float16, torch.bfloat16) else cos.dtype
        return self._nontarget_logits(margin, cos, rows, dtype)


@functools.cache
def compiled_passes() -> CompiledPasses:
    """The process's compiled passes (compiled lazily, on first use of each)."""
    return CompiledPasses()
