"""`PartialFC`: the model-parallel classification head.

Class centres are sharded across the ranks of `process_group` (`ClassShard`); each step
the embeddings and labels of the global batch are all-gathered, every rank scores the
batch against its own centres, and `MarginSoftmaxCrossEntropy` joins the shards into the
exact softmax cross-entropy of the whole batch over all classes (or, with
`sample_rate < 1`, over the positives plus sampled negatives).

Gradient contract: the loss is the same scalar on every rank, and the gradients are the
exact gradients of it w.r.t. the local embeddings and the local shard (no world-size
factor). A data-parallel backbone whose gradients DDP averages over ranks must therefore
be scaled by the world size; the trainer does that in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed import ProcessGroup

from fr_trainer.distributed.collectives import all_gather_tensor, all_gather_with_grad, rank_and_world_size
from fr_trainer.distributed.shard import ClassShard
from fr_trainer.heads.device_policy import BlockPolicy, policy_for, resolve_policy
from fr_trainer.heads.filtering import InterclassFiltered, check_threshold
from fr_trainer.heads.init import init_centres
from fr_trainer.heads.margin_softmax import MarginSoftmaxCrossEntropy
from fr_trainer.heads.precision import check_compute_dtype, default_logits_dtype
from fr_trainer.heads.sampling import num_sampled, present_classes, sample_present, sampling_seed
from fr_trainer.heads.subcenter import check_subcenter_margin
from fr_trainer.heads.subcenter_fused import SubcenterSoftmaxCrossEntropy
from fr_trainer.heads.validation import check_inputs
from fr_trainer.margins import Margin, create_margin

RowUpdate = Callable[[int, int, torch.Tensor], None]  # (start, end, the rows' gradient [end - start, D])


def saved_generator_device(state: dict) -> str:
    """The device type a head's saved sampling stream came from. Checkpoints before the
    key was written hold a CPU generator's state (5,056 bytes; a CUDA one's is 16)."""
    saved = state.get("sampling_device")
    if saved is not None:
        return str(saved)
    return "cpu" if state["sampling_rng"].numel() == torch.Generator().get_state().numel() else "cuda"


class PartialFC(nn.Module):
    """Sharded margin-softmax head.

    Args:
        num_classes: K, the number of identities of the whole job.
        embedding_size: D.
        margin: a registered name (see `fr_trainer.margins.list_margins()`) or a `Margin`.
        sample_rate: fraction of this shard's centres used per step (positives always).
        process_group: the group the centres are sharded over; None = the default group
            when one is initialised, else a single-process head.
        chunk_size: build the logits in blocks of this many classes (bounded memory,
            one more GEMM); None builds them at once.
        seed: fixes the initial centres (independently of the world size) and, with the
            rank, the negative sampling; None takes `torch.initial_seed()`.
        init_std: standard deviation of the initial centres.
        compute_dtype: dtype of the GEMMs and the logit buffer (torch.bfloat16 or
            torch.float16 for mixed precision over fp32 centres; None: the centres' dtype).
            See `fr_trainer.heads.precision`.
        logits_dtype: dtype of the [G, C_local] logit buffer under a 16-bit compute_dtype
            where the head keeps logits (None: fp16 for fp16, fp32 for bf16; torch.bfloat16
            halves the buffer). An eager bf16 head with a normalised margin and no bias
            keeps the GEMM's bf16 cosines instead (`fr_trainer.heads.precision`), and the
            sub-centre head its 16-bit sub-centre cosines.
        block_policy: how the elementwise passes are cut ("cpu": cache-sized row blocks;
            "cuda": one op per pass; a `BlockPolicy`); None: the centres' device's, see
            `fr_trainer.heads.device_policy` (which also reads $FR_HEAD_BLOCK_POLICY).
        compiled: run the elementwise passes (margin, softmax, softmax gradient) through
            `torch.compile` (`fr_trainer.heads.fused`); False keeps them eager.
        device: where the centres are created (drawn on the host one block at a time, so
            a 10M-class shard is never held in host memory); None: the CPU.
        interclass_filtering_threshold: non-target cosines above it count as 0 (no logit
            mass, no gradient: likely the same identity under another label); 0 = off.
            See `fr_trainer.heads.filtering`.
        **margin_kwargs: the margin's keywords (s, m, m1, m2, m3, alpha, easy_margin, ...).

    The centres `weight` are [C_local, D], or [C_local, k, D] for a sub-centre margin
    (`subcenter_arcface`; `fr_trainer.heads.subcenter`), k sub-centres per class on its shard.
    Norm-aware margins (adaface, magface) get the norms of the gathered embeddings from the
    fused head (`Margin.needs_norms`).

    Call: `head(local_embeddings [B, D] float, local_labels [B] int64) -> loss` (scalar,
    mean over the global batch, identical on every rank).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: str | Margin = "arcface",
                 sample_rate: float = 1.0, process_group: ProcessGroup | None = None,
                 chunk_size: int | None = None, seed: int | None = None, init_std: float = 0.01,
                 compute_dtype: torch.dtype | None = None, logits_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, interclass_filtering_threshold: float = 0.0,
                 block_policy: str | BlockPolicy | None = None, compiled: bool = False,
                 **margin_kwargs) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of classes or None, got {chunk_size}")
        rank, world_size = rank_and_world_size(process_group)
        self.shard = ClassShard(num_classes, world_size, rank)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.process_group = process_group
        if isinstance(margin, Margin):
            if margin_kwargs:
                raise ValueError(f"margin keywords {sorted(margin_kwargs)} given with a margin object; "
                                 "set them on the object instead")
            self.margin = margin
        else:
            self.margin = create_margin(margin, num_classes=num_classes, **margin_kwargs)
        if device is not None:
            self.margin.to(device)  # its buffers (CurricularFace's t, AdaFace's norm EMA) beside the centres
        self.interclass_filtering_threshold = check_threshold(interclass_filtering_threshold, self.margin)
        self.sample_rate = float(sample_rate)
        self.num_sample = num_sampled(self.shard.num_local, self.sample_rate)
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        self.logits_dtype = logits_dtype
        self.block_policy = None if block_policy is None else resolve_policy(block_policy)
        self.compiled = bool(compiled)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.weight = nn.Parameter(self._initial_centres(init_std, device))
        self.bias = (nn.Parameter(torch.zeros(self.shard.num_local, device=device))
                     if self.margin.has_bias else None)
        self._generator: torch.Generator | None = None
        self._draws = 0  # sampled steps drawn so far: seeds a new stream when a saved one cannot be used
        self._reseed_step: int | None = None  # set when a resharded checkpoint had no stream for this rank
        self.last_index: torch.Tensor | None = None  # centres used by the last sampled step
        self._row_update: RowUpdate | None = None  # `update_in_backward`

    def _initial_centres(self, init_std: float, device) -> torch.Tensor:
        """[C_local, D], or [C_local, k, D] for a sub-centre margin (a class's k sub-centres
        drawn as one row of k D numbers: the same at any world size, kept together by
        checkpoints and resharding)."""
        k = self.margin.subcenters
        if k == 1:
            return init_centres(self.shard, self.embedding_size, self.seed, init_std, device=device)
        if self.sampling:
            raise ValueError(f"sample_rate={self.sample_rate} is not supported with {k} sub-centres per class; "
                             "use sample_rate=1.0")
        if self.chunk_size is not None:
            raise ValueError(f"chunk_size={self.chunk_size} is not supported with {k} sub-centres per class (the "
                             f"sub-centre head holds its [G, C_local x {k}] cosines at once); use chunk_size=None "
                             "and shard the classes over more ranks to bound the memory")
        centres = init_centres(self.shard, self.embedding_size * k, self.seed, init_std, device=device)
        return centres.view(self.shard.num_local, k, self.embedding_size)

    def update_in_backward(self, row_update: RowUpdate | None) -> None:
        """Hand the centres' gradient, a piece of rows at a time, to `row_update(start, end,
        grad_rows)` inside the backward, instead of leaving the whole [C_local, D] gradient in
        `weight.grad` (which then stays None): the optimizer steps those rows there and then
        (`fr_trainer.train.optim.SGD.update_rows`), and the whole fp32 gradient never exists
        (at 10M classes per GPU and D 512: 20 GB). None turns it off.

        The gradient goes in pieces of the block policy's `piece_rows` classes (CPU 16,384,
        CUDA 65,536), within each `chunk_size` block if chunked. Needs a dense head (no
        sampling, no sub-centres). Every use of the
        gradient after the backward is the caller's to rule out: the trainer refuses gradient
        accumulation, fp16 loss scaling, clipping that covers the head and skipped steps
        (`head.fused_update`). A second backward of one forward (`retain_graph`) updates twice."""
        if row_update is not None:
            where = "PartialFC.update_in_backward (head.fused_update)"
            if self.margin.subcenters > 1:
                raise ValueError(f"{where} is not supported with {self.margin.subcenters} sub-centres per class")
            if self.sampling:
                raise ValueError(f"{where} needs sample_rate=1.0 (got {self.sample_rate}): a sampled head's "
                                 "gradient holds only its sampled rows already")
        self._row_update = row_update

    @property
    def updates_in_backward(self) -> bool:
        """Whether `update_in_backward` has handed the centres' gradient to an update."""
        return self._row_update is not None

    @property
    def sampling(self) -> bool:
        return self.sample_rate < 1.0

    def _sampling_generator(self) -> torch.Generator:
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(sampling_seed(self.seed, self.shard, self._reseed_step))
        return self._generator

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"PartialFC centres are {self.weight.dtype}; keep the centres in float32 and set "
                "compute_dtype=torch.bfloat16 (or float16) for 16-bit GEMMs and logits")
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            return self._loss(embeddings, labels)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        group = self.process_group
        check_inputs(embeddings, labels, self.num_classes, self.embedding_size, group, self.weight.device)
        all_labels = all_gather_tensor(labels, group)
        all_embeddings = all_gather_with_grad(embeddings.to(self.weight.dtype), group)
        owned = self.shard.owns(all_labels)
        local = torch.where(owned, all_labels - self.shard.start, torch.full_like(all_labels, -1))
        index = None
        if self.sampling:
            present = present_classes(local, owned, self.shard.num_local)
            index = sample_present(present, self.num_sample, self._sampling_generator(), local.numel())
            self._draws += 1
            local = torch.where(owned, torch.searchsorted(index, local.clamp_min(0)), local)
            self.last_index = index
        compute = check_compute_dtype(self.compute_dtype, self.weight.dtype)
        if self.margin.subcenters > 1:
            check_subcenter_margin(self.margin)
            return SubcenterSoftmaxCrossEntropy.apply(all_embeddings, self.weight, local, self.margin, group,
                                                      self.interclass_filtering_threshold,
                                                      policy_for(self.weight.device, self.block_policy), compute)
        logits = None if compute is None else (self.logits_dtype or default_logits_dtype(compute))
        return MarginSoftmaxCrossEntropy.apply(all_embeddings, self.weight, self.bias, index, local,
                                               self._call_margin(), group, self.chunk_size, compute, logits,
                                               policy_for(self.weight.device, self.block_policy), self.compiled,
                                               self._row_update)

    def _call_margin(self) -> Margin:
        """The margin the fused head applies: the head's, filtered when the inter-class
        filtering threshold is on."""
        threshold = self.interclass_filtering_threshold
        return self.margin if threshold <= 0 else InterclassFiltered(self.margin, threshold)

    def get_extra_state(self) -> dict:
        generator = self._generator
        if generator is None:
            return {"sampling_rng": None, "draws": self._draws}
        return {"sampling_rng": generator.get_state(), "sampling_device": generator.device.type,
                "draws": self._draws}

    def set_extra_state(self, state: dict) -> None:
        """The saved sampling stream; a checkpoint resharded to another world size has none
        (`sampling_rng` None: the old streams do not map onto the new shards, and copying
        one to two new ranks would give them the same negatives) and names its step in
        `reseed_step`: the stream restarts from (seed, step, rank, world size). A stream
        saved on another kind of device (a CUDA generator's state is not a CPU one's) cannot
        be restored either: the stream restarts from the number of sampled steps drawn."""
        state = state if isinstance(state, dict) else {}
        self._draws = int(state.get("draws", 0))
        rng = state.get("sampling_rng")
        if rng is not None and saved_generator_device(state) == self.weight.device.type:
            self._generator = None
            self._sampling_generator().set_state(rng)
            return
        step = state.get("reseed_step", self._draws if rng is not None else None)
        self._reseed_step = None if step is None else int(step)
        self._generator = None  # drawn afresh from the seed on the next sampled step

    def extra_repr(self) -> str:
        s = self.shard
        return (f"num_classes={s.num_classes}, shard=[{s.start}, {s.end}) of world {s.world_size}, "
                f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}, "
                f"chunk_size={self.chunk_size}, compute_dtype={self.compute_dtype}"
                + (f", block_policy={self.block_policy.name}" if self.block_policy else "")
                + (", compiled=True" if self.compiled else ""))
