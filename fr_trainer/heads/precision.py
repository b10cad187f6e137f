"""The head's precision policy: in which dtype its GEMMs and logit buffer run.

The centres (and their optimizer state) stay in their own dtype, fp32 under mixed
precision ("master" weights); `compute_dtype` is the dtype of the 16-bit copies the
three GEMMs read and of the [G, C_local] logit buffer. Row maxima, sums of exponentials,
log-sum-exp, target logits and the gradients handed back stay fp32
(`fr_trainer.heads.margin_softmax`).

The logit buffer: fp16 logits keep enough precision (10-bit mantissa: at s = 64 a logit
is off by at most 0.03), so an fp16 head keeps them in fp16; bf16's 8-bit mantissa puts
bf16 *logits* of a well-classified batch off by up to 0.25 and the loss by about 1%. So a
bf16 head with a normalised margin and no bias (eager) keeps the bf16 *cosines* the GEMM
wrote (rounded as they come out of any bf16 GEMM) and builds the logits from them only in
fp32 row-block scratch (`uses_bf16_cosines`: one bf16 buffer, half an fp32 one); the
others (the plain softmax with a bias, the compiled passes) keep an fp32 logit buffer
unless `logits_dtype=bfloat16` is asked for (half the memory, for shards whose logits
bound memory).

`head.dtype = "auto"` follows the backbone's autocast: bf16 autocast runs the head in bf16,
fp16 autocast in fp16 (as arcface_torch's fp16 head does), anything else in the centres'
own dtype.
"""

from __future__ import annotations

import torch

HEAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", *HEAD_DTYPES)


def resolve_head_dtype(name: str, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """The compute dtype for `head.dtype = name` (None: the centres' own dtype)."""
    if name not in CHOICES:
        raise ValueError(f"head dtype {name!r} is not one of {', '.join(CHOICES)}")
    if name == "auto":
        return autocast_dtype if autocast_dtype in (torch.float16, torch.bfloat16) else None
    return HEAD_DTYPES[name]


def check_compute_dtype(compute_dtype: torch.dtype | None, weight_dtype: torch.dtype) -> torch.dtype | None:
    """None or a dtype no wider than the centres'; 16-bit compute needs fp32 centres."""
    if compute_dtype is None or compute_dtype == weight_dtype:
        return None
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"compute_dtype must be torch.float32, bfloat16 or float16, got {compute_dtype}")
    if weight_dtype == torch.float64:
        raise ValueError(f"compute_dtype={compute_dtype} with float64 centres: keep float64 exact or use "
                         "float32 centres for mixed precision")
    return compute_dtype


def default_logits_dtype(compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """fp16 logits for an fp16 head, fp32 for a bf16 one, else the centres' dtype (None)."""
    if compute_dtype == torch.bfloat16:
        return torch.float32
    return compute_dtype
