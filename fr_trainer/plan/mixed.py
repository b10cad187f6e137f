"""The bf16 head's own buffers, for the memory plan (`fr_trainer.plan.model`).

With `PartialFC(compute_dtype=torch.bfloat16)` and a normalised margin without bias (every
registered margin but the plain softmax) the head runs its GEMMs on a bf16 copy of the
normalised centres (chunked: of one chunk at a time) and keeps one bf16 [G, cols] buffer: the GEMM's cosines, then their
exponentials (`fr_trainer/heads/bf16_exponentials.py`). Its fp32 work happens in scratch:

- forward: each pass's fp32 scratch block (the logits, and for a non-linear margin its
  derivative and the formula's temporaries) while the gradient does not exist yet;
- backward: the fp32 centres' gradient, and per 16-bit GEMM column chunk a bf16 result
  [chunk, D] and an fp32 row block of products for the radial dots.

Under the CPU policy blocks and chunks are cache-sized; under the CUDA one (a GPU, backend
nccl) each is whole: the [G, cols] scratch, and [cols, D] in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from fr_trainer.heads.device_policy import CPU_MM_COLUMNS

BF16, FP32 = 2, 4


@dataclass(frozen=True)
class MixedTerms:
    logits: int  # the bf16 [G, cols] buffers
    workspace: int  # the bf16 centres (a chunk's, chunked) + max(forward scratch - gradient, backward chunk temps)
    pooled: int  # CPU: what the buffer pool keeps between steps


def bf16_terms(g: int, used: int, cols: int, dim: int, chunked: bool, scratch_blocks: int, linear: bool,
               weight_grad: int, whole_buffer: bool, block_elements: int) -> MixedTerms:
    """The bf16 head's logits, workspace (without the per-centre vectors and the sampled
    copy) and pooled bytes; `scratch_blocks` as the fp32 plan counts them, plus the
    derivative a non-linear margin keeps beside its logits."""
    logits = (2 if chunked else 1) * g * cols * BF16
    centres = (cols if chunked else used) * dim * BF16  # chunked: the copy is made a chunk at a time
    rows = g if whole_buffer else min(g, max(1, block_elements // max(1, cols)))
    forward = rows * cols * FP32 * (scratch_blocks + (0 if linear else 1))
    chunk = cols if whole_buffer else min(CPU_MM_COLUMNS, cols)
    product_rows = chunk if whole_buffer else min(chunk, max(1, block_elements // dim))
    backward = chunk * dim * BF16 + product_rows * dim * FP32
    # the forward's scratch lives beside one bf16 block (the second of a chunked head is the
    # backward's), before the gradient exists
    workspace = centres + max(forward - weight_grad - (g * cols * BF16 if chunked else 0), backward)
    pooled = 0 if whole_buffer else logits + centres + chunk * dim * BF16
    return MixedTerms(logits, workspace, pooled)
