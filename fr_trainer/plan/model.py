"""The memory and communication model of the sharded head, as a pure function.

`plan_head(...) -> HeadPlan` counts, for the rank that owns the most classes, the bytes of
every tensor `PartialFC` (fr_trainer/heads/partial_fc.py, margin_softmax.py) and the
row-sparse SGD / AdamW of fr_trainer/train/optim.py allocate in one training step, and
the collectives the head issues. It mirrors the implementation, not an idealised head:

Persistent (alive all step):
    weights          the shard [C_local, D] (+ a bias [C_local] for the plain softmax)
    optimizer_state  SGD momentum: 1 x weights; AdamW: 2 x weights + an int64 step per row
Phase 1, forward + backward (peak inside the backward's block loop):
    logits           one [G, C_used] buffer (one block), two [G, chunk] blocks when
                     chunked (the next is built while the previous is alive). Non-linear
                     margins (normalised, no bias: all registered ones) keep only their
                     cosines and rebuild their logits a row block at a time in scratch
                     (`uses_cosine_rows`), so they hold as many; one that kept its logits
                     too would hold NONLINEAR_BUFFERS
    weight_grad      dense [C_used, D], or the sampled rows [S, D] + their int64 indices
    features         the gathered embeddings' normalised copy, its gradient and the
                     normalisation temporaries: 5 x [G, D] (3 for the un-normalised softmax)
    workspace        sampled-weight copy [S, D] (sample_rate < 1), the elementwise scratch
                     (a ~1 MB row block per live temporary on a CPU; on a GPU, backend
                     nccl, whose passes each run over the whole buffer, a [G, cols] block
                     per temporary: one for a linear margin, 1 + the margin's
                     `formula_temporaries` for a non-linear one), per-centre vectors
                     (norms, radial coefficients, factors)
On a CPU (backend gloo) the head gives its logit buffers back to its buffer pool after the
backward and takes them again in the next step, so they stay allocated through phases 2
and 3 (`pooled`).
Phase 2, optimizer step: the gradient + the optimizer's temporaries (SGD: none when dense,
    in place; for sparse rows the decayed gradient, gathered weights and momentum and the
    Nesterov direction; AdamW: the
    denominator and three update terms, plus gathered rows and moments when sparse)
Phase 3 (optional, `clip_grad=True`): the trainer's global-norm clipping, which upcasts the
    head gradient to fp64 one block of `SQUARE_SUM_BLOCK` elements at a time (8 bytes each).

    peak = weights + optimizer_state + max(phase 1, phase 2, phase 3)

With `compute_dtype="bf16"` (bf16 GEMMs on fp32 centres) the logits, the workspace and the
pool are the bf16 head's (`fr_trainer/plan/mixed.py`).

G = batch_per_rank * world_size; C_local = ceil(classes / world_size) (rank 0 owns the
remainder); C_used = C_local, or S = max(ceil(sample_rate * C_local), min(G, C_local)) with
sampling (every positive is kept; the worst case is the whole batch on one shard).

Per-rank logits are G * C_local = batch_per_rank * classes elements whatever the world
size: adding GPUs does not shrink them; `chunk_size` or `sample_rate` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fr_trainer.heads.device_policy import CPU_BLOCK_ELEMENTS as BLOCK_ELEMENTS
from fr_trainer.heads.device_policy import CPU_PIECE_ROWS, CUDA_PIECE_ROWS
from fr_trainer.plan.mixed import bf16_terms
from fr_trainer.train.grads import SQUARE_SUM_BLOCK

DTYPE_BYTES = {"fp32": 4, "fp64": 8}  # the centres' dtype (PartialFC rejects 16-bit centres)
OPTIMIZERS = ("sgd", "adamw")
INT64 = 8


@dataclass(frozen=True)
class MarginTraits:
    """What the head's memory depends on in a margin (class attributes of `Margin`)."""

    normalized: bool = True
    has_bias: bool = False
    linear_nontarget: bool = True
    needs_global_target: bool = False
    formula_temporaries: int = 1

    @classmethod
    def of(cls, margin: str) -> MarginTraits:
        import fr_trainer.margins  # noqa: F401  (registers every margin)
        from fr_trainer.margins.registry import MARGINS  # raises on unknown names, listing them

        kind = MARGINS.get(margin)
        return cls(bool(kind.normalized), bool(kind.has_bias), bool(kind.linear_nontarget),
                   bool(kind.needs_global_target), int(kind.formula_temporaries))

    @property
    def scratch_blocks(self) -> int:
        """Scratch blocks an elementwise pass holds at its peak: one (the exponentials of a
        linear margin), or the logits rebuilt in scratch plus the formula's temporaries."""
        return 1 if self.linear_nontarget else 1 + self.formula_temporaries


@dataclass(frozen=True)
class Collective:
    """One collective of a training step: `payload` bytes in the result on each rank;
    `traffic` bytes each rank sends (= receives) with ring algorithms."""

    name: str
    op: str
    payload: int
    traffic: int


@dataclass(frozen=True)
class HeadPlan:
    """Per-GPU bytes of the head for the rank owning the most classes (see module doc)."""

    classes: int
    embedding_size: int
    world_size: int
    batch_per_rank: int
    sample_rate: float
    dtype: str
    optimizer: str
    margin: str
    chunk_size: int | None
    classes_per_rank: int
    classes_used: int
    weights: int
    optimizer_state: int
    logits: int
    weight_grad: int
    features: int
    workspace: int
    optimizer_temp: int
    clip_temp: int
    collectives: tuple[Collective, ...] = field(default=())
    gemm_flops: int = 0
    pooled: int = 0  # CPU: the logit buffers the head's buffer pool keeps for the next step
    compute_dtype: str | None = None  # "bf16": 16-bit GEMMs (`PartialFC(compute_dtype=)`)
    fused_update: bool = False  # the centres stepped a piece at a time in the backward

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    @property
    def persistent(self) -> int:
        return self.weights + self.optimizer_state

    @property
    def forward_backward(self) -> int:
        return self.logits + self.weight_grad + self.features + self.workspace

    @property
    def optimizer_step(self) -> int:
        return self.weight_grad + self.optimizer_temp + self.pooled

    @property
    def clipping(self) -> int:
        return self.weight_grad + self.clip_temp + self.pooled

    @property
    def peak(self) -> int:
        return self.persistent + max(self.forward_backward, self.optimizer_step, self.clipping)

    @property
    def peak_phase(self) -> str:
        phases = {"forward+backward": self.forward_backward, "optimizer step": self.optimizer_step,
                  "clipping": self.clipping}
        return max(phases, key=phases.get)

    @property
    def collective_payload(self) -> int:
        return sum(c.payload for c in self.collectives)

    @property
    def collective_traffic(self) -> int:
        return sum(c.traffic for c in self.collectives)


def _check(classes: int, embedding_size: int, world_size: int, batch_per_rank: int,
           sample_rate: float, dtype: str, optimizer: str, chunk_size: int | None) -> None:
    if classes < 1 or embedding_size < 1 or batch_per_rank < 1:
        raise ValueError(f"classes, embedding_size and batch_per_rank must be positive, got "
                         f"{classes}, {embedding_size}, {batch_per_rank}")
    if world_size < 1 or world_size > classes:
        raise ValueError(f"world_size={world_size} must lie in [1, classes={classes}] "
                         "(every rank owns at least one class); use fewer GPUs")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}: it is the centres' dtype, "
                         "fp32 or fp64 (a bf16 run keeps fp32 centres); for 16-bit GEMMs use "
                         "dtype='fp32' with compute_dtype='bf16' (--compute-dtype bf16)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {list(OPTIMIZERS)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of classes or None, got {chunk_size}")


def _ring(op: str, payload: int, world_size: int) -> int:
    """Bytes each rank sends with ring algorithms; `payload` is the result size per rank
    (all-gather, all-reduce) or the input size (reduce-scatter)."""
    share = (world_size - 1) / world_size
    return round((2 if op == "all_reduce" else 1) * share * payload)


def head_collectives(world_size: int, batch_per_rank: int, embedding_size: int, item: int,
                     traits: MarginTraits, backend: str = "nccl") -> tuple[Collective, ...]:
    """The collectives of one head step (forward and backward) and their sizes."""
    if world_size == 1:
        return ()
    g = batch_per_rank * world_size
    rows = [
        ("input check report", "all_gather", world_size * 9 * INT64),
        ("labels", "all_gather", g * INT64),
        ("embeddings", "all_gather", g * embedding_size * item),
        ("row max", "all_reduce", g * item),
        ("sum-exp + target logit", "all_reduce", 2 * g * item),
    ]
    if traits.needs_global_target:
        rows.append(("target cosines", "all_reduce", g * item))
    grad_op = "reduce_scatter" if backend == "nccl" else "all_reduce"
    rows.append(("embedding gradient", grad_op, g * embedding_size * item))
    return tuple(Collective(name, op, size, _ring(op, size, world_size)) for name, op, size in rows)


# Live [G, cols] buffers of a non-linear margin that is not normalised or has a bias (none
# is registered) at its peak, in its backward: the cosines and the logits rebuilt from
# them, which become the gradient in place. A normalised one without bias keeps only the
# cosines: its logits live in a row-block scratch and the gradient is written over the
# cosines. The margin's formula runs in row blocks of the device policy, so its own
# temporaries are ~1 MB.
NONLINEAR_BUFFERS = 2


def _logit_bytes(g: int, used: int, chunk_size: int | None, traits: MarginTraits, item: int) -> tuple[int, int]:
    """(bytes of the live logit-sized buffers, columns of one block).

    One [G, cols] buffer (two while the chunked backward builds the next block), for linear
    non-target margins and for the non-linear ones on cosine rows (SV, MV, Curricular,
    Circle). A non-linear one that is not normalised or has a bias would hold the cosines
    and the logits rebuilt from them (`NONLINEAR_BUFFERS`), plus the previous block's
    when chunked.
    """
    cols = used if not chunk_size else min(chunk_size, used)
    chunked = cols < used
    if traits.linear_nontarget or (traits.normalized and not traits.has_bias):
        per_element = (2 if chunked else 1) * item
    else:
        per_element = (NONLINEAR_BUFFERS + (2 if chunked else 0)) * item
    return per_element * g * cols, cols


def _scratch_bytes(g: int, cols: int, item: int, whole_buffer: bool) -> int:
    """One scratch block of an elementwise pass over [G, cols]: a ~1 MB row block under the
    CPU policy, the whole [G, cols] under the CUDA one (`fr_trainer/heads/device_policy.py`)."""
    rows = g if whole_buffer else min(g, max(1, BLOCK_ELEMENTS // max(1, cols)))
    return rows * cols * item


def _optimizer_terms(optimizer: str, rows: int, dim: int, item: int, sparse: bool, momentum: bool,
                     weight_decay: bool, nesterov: bool) -> int:
    """Temporary bytes of one optimizer step over `rows` gradient rows (train/optim.py)."""
    row = rows * dim * item
    if optimizer == "sgd":
        if not sparse:
            return 0  # dense SGD updates the weights and momentum in place
        # sparse rows: decayed gradient rows, gathered weight rows, gathered momentum rows
        # and the Nesterov direction
        count = int(weight_decay) + 1
        if momentum:
            count += 1 + int(nesterov)
        return count * row
    # AdamW dense (multi-tensor, or a fused chunk): the denominator and the change; sparse
    # rows: four live update terms, and it gathers the weights, m and v
    return (2 if not sparse else 7) * row + 2 * rows * INT64


def plan_head(classes: int, embedding_size: int = 512, world_size: int = 8, batch_per_rank: int = 128,
              sample_rate: float = 1.0, dtype: str = "fp32", optimizer: str = "sgd",
              margin: str = "arcface", chunk_size: int | None = None, momentum: bool = True,
              weight_decay: bool = True, nesterov: bool = False, clip_grad: bool = False,
              backend: str = "nccl", compute_dtype: str | None = None, fused_update: bool = False) -> HeadPlan:
    """Bytes per GPU of the head's tensors in one training step (see the module docstring).

    Args mirror `PartialFC` and the trainer's optimizer settings; `dtype` is the head's
    parameter dtype (fp32 or fp64; a bf16 run keeps fp32 centres); `clip_grad` adds the trainer's global-norm
    clipping; `backend` decides the backward collective (nccl: reduce-scatter) and the
    block policy (nccl: a GPU's whole-buffer passes); `compute_dtype="bf16"`: the head's
    GEMMs in bf16 on fp32 centres (`fr_trainer/plan/mixed.py`); `fused_update`: the centres
    stepped a piece at a time inside the backward (`head.fused_update`), so the centres'
    gradient is one piece's rows (`BlockPolicy.piece_rows` classes) and the optimizer's
    temporaries a piece's.
    """
    if compute_dtype not in (None, "bf16"):
        raise ValueError(f"compute_dtype {compute_dtype!r} is not modelled; use None (the centres' dtype) or 'bf16'")
    _check(classes, embedding_size, world_size, batch_per_rank, sample_rate, dtype, optimizer, chunk_size)
    traits = MarginTraits.of(margin)
    item, d = DTYPE_BYTES[dtype], embedding_size
    g = batch_per_rank * world_size
    local = math.ceil(classes / world_size)
    sparse = sample_rate < 1.0  # the head samples (index_select copy, sparse gradient)
    used = min(local, max(math.ceil(sample_rate * local), min(g, local))) if sparse else local

    weights = local * d * item + (local * item if traits.has_bias else 0)
    if optimizer == "sgd":
        state = local * d * item if momentum else 0
    else:
        state = 2 * local * d * item + local * INT64
    logits, cols = _logit_bytes(g, used, chunk_size, traits, item)
    if fused_update and (sparse or clip_grad):
        raise ValueError("fused_update needs sample_rate 1 and no clipping over the head "
                         "(fr_trainer/train/fused_update.py); drop --clip-grad or --fused-update")
    whole_buffer = backend == "nccl"  # a GPU head: each pass is one op over the whole buffer
    piece = min(cols, CUDA_PIECE_ROWS if whole_buffer else CPU_PIECE_ROWS)  # (rows of a fused update's piece)
    grad_rows = (piece if fused_update else used) * d * item + (used * item if traits.has_bias else 0)
    weight_grad = grad_rows + (used * INT64 if sparse else 0)
    features = (5 if traits.normalized else 3) * g * d * item
    vectors = 6 * used * item
    workspace = traits.scratch_blocks * _scratch_bytes(g, cols, item, whole_buffer) + vectors
    pooled = logits if backend == "gloo" else 0  # gloo: a CPU head, whose policy reuses buffers
    if compute_dtype == "bf16":
        if dtype != "fp32" or not traits.normalized or traits.has_bias:
            raise ValueError(f"compute_dtype='bf16' is modelled for fp32 centres and a normalised margin "
                             f"without bias, not dtype={dtype!r} with margin={margin!r}")
        mixed = bf16_terms(g, used, cols, d, cols < used, traits.scratch_blocks, traits.linear_nontarget,
                           weight_grad, whole_buffer, BLOCK_ELEMENTS)
        logits, pooled, workspace = mixed.logits, mixed.pooled, mixed.workspace + vectors
    if sparse:
        workspace += used * d * item + 2 * used * INT64  # index_select copy, sampled indices
    optimizer_temp = _optimizer_terms(optimizer, piece if fused_update else used, d, item, sparse, momentum,
                                      weight_decay, nesterov)
    if fused_update:  # (the chunk's update runs inside the backward, beside its buffers)
        workspace, optimizer_temp = workspace + optimizer_temp, 0
    clip_temp = min(used * d, SQUARE_SUM_BLOCK) * 8 if clip_grad else 0
    gemms = 3 + (1 if cols < used else 0)
    return HeadPlan(
        classes=classes, embedding_size=d, world_size=world_size, batch_per_rank=batch_per_rank,
        sample_rate=sample_rate, dtype=dtype, optimizer=optimizer, margin=margin,
        chunk_size=chunk_size, classes_per_rank=local, classes_used=used, weights=weights,
        optimizer_state=state, logits=logits, weight_grad=weight_grad, features=features,
        workspace=workspace, optimizer_temp=optimizer_temp, clip_temp=clip_temp,
        collectives=head_collectives(world_size, batch_per_rank, d, item, traits, backend),
        gemm_flops=gemms * 2 * g * used * d,
        pooled=pooled, compute_dtype=compute_dtype, fused_update=fused_update,
    )


def gpus_needed(classes: int, memory_budget_bytes: int, max_gpus: int = 1 << 20, **kwargs) -> HeadPlan:
    """The plan with the fewest GPUs whose head peak fits `memory_budget_bytes` per GPU.

    `kwargs` go to `plan_head` (embedding_size, batch_per_rank, sample_rate, ...). Raises
    ValueError, naming the part that does not shrink with more GPUs and the fix, when no
    world size up to `max_gpus` fits.
    """
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_budget_bytes} bytes; "
                         "is --reserve larger than --gpu-memory?")
    kwargs.pop("world_size", None)

    def fits(world: int) -> bool:
        return plan_head(classes, world_size=world, **kwargs).peak <= memory_budget_bytes

    limit = min(max_gpus, classes)
    # The peak falls with the world size until the fixed part (logits ~ B * classes per
    # rank, features ~ G * D) dominates; find the first fitting power of two, then bisect.
    high = 1
    while high < limit and not fits(high):
        high = min(limit, high * 2)
    if not fits(high):
        best = plan_head(classes, world_size=high, **kwargs)
        raise ValueError(
            f"{classes} classes do not fit {memory_budget_bytes / 1e9:.2f} GB per GPU on up to "
            f"{high} GPUs: at {high} GPUs the head needs {best.peak / 1e9:.2f} GB, of which the "
            f"logits take {best.logits / 1e9:.2f} GB and their elementwise scratch "
            f"{best.workspace / 1e9:.2f} GB (batch_per_rank x classes x dtype each, the same "
            "at any world size); set a chunk size (--chunk-size 65536) or a sample rate "
            "(--sample-rate 0.1), or a smaller batch per GPU")
    low = high // 2  # does not fit (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return plan_head(classes, world_size=high, **kwargs)


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '512MB', '1.5TB', '1000' (bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value < 0:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB, 80GiB, 512MB")
    return int(value * units[unit])


def parse_count(text: str) -> int:
    """'10M' -> 10_000_000, '100M', '2.5k', '1e6', '93431'."""
    s = text.strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(s[-1:], 1)
    body = s[:-1] if scale != 1 else s
    try:
        value = float(body) * scale
    except ValueError:
        raise ValueError(f"cannot read a count from {text!r}; write e.g. 10M, 100M, 93431") from None
    if value < 1 or value != int(value):
        raise ValueError(f"count {text!r} must be a positive whole number")
    return int(value)
