"""The training loop: DDP backbone, model-parallel PartialFC head, one optimizer.

    trainer = Trainer(config)      # checks data and config, builds everything, resumes
    summary = trainer.fit()        # trains, checkpoints, verifies; summary.json in the run dir

Run under torchrun (`torchrun -m fr_trainer train CONFIG`) or as one process. One
optimizer step = `optim.accumulate` micro-batches of `data.batch_size` per rank; DDP
all-reduces only on the last one; the loss of each micro-step is divided by
`accumulate`, and the schedule counts optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fr_trainer.backbones import create_backbone
from fr_trainer.backbones.base import init_weights_upstream
from fr_trainer.backbones.two_head import TwoHeadBackbone
from fr_trainer.distributed.collectives import any_rank_flags
from fr_trainer.distributed.env import DistributedEnv, init_distributed
from fr_trainer.heads import PartialFC
from fr_trainer.heads.precision import HEAD_DTYPES, resolve_head_dtype
from fr_trainer.heads.update import densify
from fr_trainer.hugepage_malloc import hugepage_malloc_state
from fr_trainer.margins import create_margin
from fr_trainer.regularizers import CenterLoss, CirclePairLoss, TripletLoss
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train import peer_failure, resume_checks
from fr_trainer.train.checkpoint_payload import checkpoint_parts, join_optimizer_state
from fr_trainer.train.config import Config, ConfigError, save_config
from fr_trainer.train.data_setup import (
    BatchStream,
    build_train_data,
    consumed_from_position,
    open_dataset,
)
from fr_trainer.train.ema import build_ema, resume_ema, scaler_step_taken
from fr_trainer.train.finiteness import BufferSnapshot, NonFiniteState, NonFiniteSteps
from fr_trainer.train.freeze import BackboneFreeze
from fr_trainer.train.fused_update import attach_fused_update
from fr_trainer.train.grads import clip_global_norm, scale_backbone_grad
from fr_trainer.train.hyperparams import config_hyperparameters, restore_hyperparameters
from fr_trainer.train.optim import SGD, AdamW
from fr_trainer.train.periodic_eval import PeriodicVerifier, find_bins
from fr_trainer.train.pretrained_setup import load_configured_pretrained
from fr_trainer.train.regularizer_state import load_regularizer
from fr_trainer.train.reporting import Reporter
from fr_trainer.train.run_lock import take_run_lock
from fr_trainer.train.run_plan import PlanBasis, make_plan, resume_plan
from fr_trainer.train.runtime import (
    configure_backends,
    prepare_backbone,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_deterministic,
    wrap_ddp,
)
from fr_trainer.train.schedule import PolySchedule
from fr_trainer.train.signals import Preempted, StopRequest
from fr_trainer.train.step_reads import StepReads, StepRecord, resolve_host_reads
from fr_trainer.train.watchdog import COLLECTIVE_SLACK_S, Watchdog


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf and the policy says stop."""


@dataclass
class StepResult:
    loss: float | None  # None while train.host_reads defers its read (the value goes to Trainer.losses)
    lr: float
    skipped: bool
    grad_norm: torch.Tensor | None  # on the device (reading it is a host sync)


def _accuracies(results: dict[str, dict]) -> dict[str, dict]:
    return {
        n: {"accuracy": v["accuracy"], "accuracy_std": v["accuracy_std"]}
        for n, v in results.items()
    }


class Trainer:
    def __init__(self, config: Config, env: DistributedEnv | None = None) -> None:
        self.config = config
        self.t_start = time.perf_counter()
        device_type = resolve_device(config.train.device)
        timeout = timedelta(seconds=config.train.collective_timeout_s + COLLECTIVE_SLACK_S)
        self.env = env or init_distributed(device_type, timeout=timeout)
        self.rank, self.world_size, self.device = (
            self.env.rank,
            self.env.world_size,
            self.env.device,
        )
        self.group = None
        self.run_lock = take_run_lock(config.run_dir, self.rank, self.group, self.device)
        self.stop_request = StopRequest(self.group, self.device)
        self.precision = resolve_precision(
            config.train.precision, self.device.type, config.engine.name
        )
        set_deterministic(config.train.deterministic, config.train.threads)
        configure_backends(self.device, config.train.deterministic)
        self._build_data()
        self._build_model()
        self._build_optimizer()
        self.run_dir = config.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.nonfinite = NonFiniteSteps(config.train)  # train.nonfinite: stop or skip
        self.resume_notes: list[str] = []  # logged when the reporter exists
        self._buffer_snapshot: BufferSnapshot | None = None  # (train.nonfinite = "skip": made at the first step)
        reads = resolve_host_reads(config.train.host_reads, self.device.type, config.train.nonfinite)
        self.reads = StepReads(reads, config.optim.accumulate)  # train.host_reads
        self.losses: list[float] = []  # this fit's losses, as they are read
        self._prepare_run_dir()
        peer_failure.clear(self.run_dir, self.rank)  # a message of an earlier attempt
        self.resumed_from = self._maybe_resume()
        self.reporter = Reporter(
            self.run_dir, self.rank, self.total_steps, config.log.progress, config.log.tensorboard
        )
        for note in self._skipped_checkpoints:  # checkpoints skipped by the resume, and why
            self.reporter.info(f"warning: {note}")
        self.verifier = self._build_verifier()
        self.watchdog = Watchdog(self.rank, self.world_size, self.run_dir / "heartbeats",
                                 config.train.collective_timeout_s,
                                 on_tick=self._refresh_run_lock, before_exit=self._release_run_lock)
        self._saved_step: int | None = None
        self._lock_released = False
        self.ema_verification: dict[str, dict] = {}  # the latest verification of the EMA

    # ------------------------------------------------------------------ set-up steps
    def _build_data(self) -> None:
        c = self.config
        self.dataset = open_dataset(c)
        self.num_classes = self.dataset.num_classes
        if self.num_classes < self.world_size:
            raise ConfigError(
                f"the data has {self.num_classes} classes, fewer than {self.world_size} ranks; "
                "use fewer ranks"
            )
        self.loader = build_train_data(c, self.dataset, self.rank, self.world_size, self.device)
        self.stream = BatchStream(self.loader, self.world_size)
        per_epoch = self.stream.batches_per_epoch // c.optim.accumulate
        if per_epoch < 1:
            raise ConfigError(
                f"one epoch has {self.stream.batches_per_epoch} batches per rank, fewer than "
                f"optim.accumulate={c.optim.accumulate}; lower optim.accumulate or data.batch_size"
            )
        self.steps_per_epoch = per_epoch
        self.samples_per_step = c.data.batch_size * c.optim.accumulate * self.world_size
        # the plan of a fresh run; a resume replaces it by the one of the run's first start
        self.plan = make_plan(c, PlanBasis(per_epoch, self.samples_per_step))

    def _build_model(self) -> None:
        c = self.config
        seed_everything(c.run.seed)  # identical backbone init on every rank
        kwargs = {"embedding_size": c.model.embedding_size}
        if c.model.dropout:
            kwargs["dropout"] = c.model.dropout
        self.backbone_kwargs = kwargs
        try:
            backbone = create_backbone(c.model.backbone, **kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.backbone={c.model.backbone!r} with {kwargs}: {error}") from None
        if c.model.init == "upstream":
            init_weights_upstream(backbone)
        load_configured_pretrained(backbone, c.model.pretrained, c.model.pretrained_ema)
        if c.model.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(True)
        self.backbone = backbone.to(self.device, self.precision.param_dtype)
        self.channels_last = prepare_backbone(self.backbone, c, self.device)
        self.ema = build_ema(c.model.ema_decay, c.model.ema_warmup, self.backbone,
                             lambda: create_backbone(c.model.backbone, **kwargs))
        self.freeze = BackboneFreeze(self.backbone, c.model.freeze_steps)
        # triplet regularizer (Taha et al. 2020): a second, ranking head on the last feature map
        self.two_head = None
        network = self.backbone
        if c.regularizer.name == "triplet":
            try:
                self.two_head = TwoHeadBackbone(self.backbone, c.regularizer.second_dim)
            except TypeError as error:
                raise ConfigError(
                    f"regularizer.name='triplet' needs a two-head capable backbone: {error}; "
                    "pick a backbone from fr_trainer.backbones (e.g. demonet, iresnet50)"
                ) from None
            self.two_head = self.two_head.to(self.device, self.precision.param_dtype)
            network = self.two_head
        try:
            margin = create_margin(c.head.margin, num_classes=self.num_classes, **c.head.margin_args)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"head.margin={c.head.margin!r}, head.margin_args={c.head.margin_args!r}: {error}"
            ) from None
        try:
            self.head = PartialFC(
                self.num_classes,
                c.model.embedding_size,
                margin=margin,
                sample_rate=c.head.sample_rate,
                process_group=self.group,
                chunk_size=c.head.chunk_size,
                seed=c.run.seed,
                compute_dtype=resolve_head_dtype(c.head.dtype, self.precision.autocast_dtype),
                logits_dtype=None if c.head.logits_dtype == "auto" else HEAD_DTYPES[c.head.logits_dtype],
                device=self.device,  # drawn block by block into device memory, not via the host
                interclass_filtering_threshold=c.head.interclass_filtering_threshold,
                compiled=c.head.compile,
            )
        except ValueError as error:  # an option the margin cannot take (e.g. sampling with sub-centres)
            raise ConfigError(f"[head]: {error}") from None
        self.head = self.head.to(self.device, self.precision.param_dtype)
        self.regularizer = self._build_regularizer()
        if c.engine.name == "deepspeed":
            self.model = None  # the DeepSpeed engine, built with its optimizer
        elif self.env.is_distributed and self.world_size > 1:
            # triplet alone: the backbone's embedding head gets no gradient, DDP must not wait for it
            unused = self.two_head is not None and not c.regularizer.with_head
            self.model = wrap_ddp(network, c, self.device, find_unused=unused)
        else:
            self.model = network
        seed_everything(c.run.seed * 1000 + self.rank)  # per-rank streams (dropout, ...)

    def _build_regularizer(self) -> torch.nn.Module | None:
        """The `[regularizer]` loss (None when `regularizer.name` is empty)."""
        r = self.config.regularizer
        if not r.name:
            return None
        kinds = {"center": CenterLoss, "triplet": TripletLoss, "circle_pair": CirclePairLoss}
        args = dict(r.args)
        if r.name == "center":  # lambda is regularizer.weight, applied in micro_step
            args = {
                "num_classes": self.num_classes,
                "embedding_size": self.config.model.embedding_size,
                "loss_weight": 1.0,
                **args,
            }
        try:
            module = kinds[r.name](process_group=self.group, **args)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"regularizer.args={r.args!r} for {r.name!r}: {error}") from None
        return module.to(self.device, self.precision.param_dtype)

    def _replicated_params(self) -> list[torch.nn.Parameter]:
        """Parameters identical on every rank (DDP): the backbone, the triplet second head."""
        params = list(self.backbone.parameters())
        if self.two_head is not None:
            params += list(self.two_head.second_head.parameters())
        return params

    @property
    def _second_head(self) -> torch.nn.Module | None:
        """The triplet regularizer's second head (None without one)."""
        return self.two_head.second_head if self.two_head is not None else None

    def _regularizer_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Sharded parameters of the regularizer (the center loss's SGD-learned centres)."""
        return list(self.regularizer.named_parameters()) if self.regularizer is not None else []

    def _build_optimizer(self) -> None:
        o = self.config.optim
        groups = [
            {"params": self._replicated_params(), "lr_scale": o.backbone_lr_scale},
            {"params": list(self.head.parameters())},
        ]
        if self._regularizer_params():
            groups.append(
                {"params": [p for _, p in self._regularizer_params()], "weight_decay": 0.0}
            )
        if o.name == "sgd":
            self.optimizer = SGD(
                groups,
                lr=o.lr,
                momentum=o.momentum,
                weight_decay=o.weight_decay,
                nesterov=o.nesterov,
            )
        else:
            self.optimizer = AdamW(
                groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
        if self.config.engine.name == "deepspeed":  # backbone optimizer inside the engine
            from fr_trainer.train.deepspeed_engine import build_engine

            kind, defaults = type(self.optimizer), dict(self.optimizer.defaults)
            self.model, self.optimizer = build_engine(
                self.backbone, self.head, lambda g: kind(g, **defaults), self.config, self.env
            )
        self.schedule = PolySchedule(
            self.optimizer,
            o.lr,
            self.plan.total_samples,
            self.plan.warmup_samples,
            o.power,
            self.samples_per_step,
        )
        self.scaler = (
            torch.amp.GradScaler(
                self.device.type, growth_interval=self.config.train.scaler_growth_interval
            )
            if self.precision.scaler
            else None
        )
        if self.config.head.fused_update:  # (the head steps its centres in its backward)
            try:
                attach_fused_update(self.head, self.optimizer, self.scaler is not None)
            except ValueError as error:
                raise ConfigError(f"[head]: {error}") from None

    def _prepare_run_dir(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.json")
        self._barrier()

    def _build_verifier(self) -> PeriodicVerifier | None:
        e = self.config.eval
        if e.every_steps == 0 and not e.at_end and not e.at_start:
            return None
        paths = find_bins(self.config.data.root, e.bins)
        if not paths:
            self.reporter.info("eval.bins is empty: no verification (name the .bin sets to verify on)")
            return None
        return PeriodicVerifier(paths, e.batch_size, self.rank, self.world_size)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        if self.reads.pending:  # (deferred rows: a non-finite loss among them must stop the run unsaved)
            self._apply_reads()
        self.watchdog.begin(self.step, "checkpoint save")
        self._saved_step = self.step
        self.sync_buffers()
        common, shard = checkpoint_parts(
            rank=self.rank,
            config=self.config,
            num_classes=self.num_classes,
            backbone_kwargs=self.backbone_kwargs,
            backbone=self.backbone,
            head=self.head,
            second_head=self._second_head,
            regularizer=self.regularizer,
            ema=self.ema,
            optimizer=self.optimizer,
            scaler=self.scaler,
            schedule=self.schedule,
            plan=self.plan,
            stream=self.stream,
            precision=self.precision.name,
        )
        try:
            return ckpt.save_checkpoint(
                self.ckpt_root,
                self.step,
                common,
                shard,
                self.rank,
                self.world_size,
                self.config.checkpoint.keep_last,
                self.group,
            )
        except NonFiniteState as error:  # never a checkpoint: stop (exit status 3)
            raise NonFiniteLoss(
                f"step {self.step}: {error}. Lower optim.lr or enable optim.clip_grad_norm and "
                "rerun: it resumes from the newest finite checkpoint"
            ) from None

    def _maybe_resume(self) -> Path | None:
        """The newest intact, finite checkpoint (every rank agrees; see checkpoint.resume)."""
        self._skipped_checkpoints: list[str] = []
        resume = self.config.checkpoint.resume
        if resume == "never":
            return None
        candidates = (
            ckpt.complete_checkpoints(self.ckpt_root)[::-1]
            if resume == "auto"
            else ckpt.resume_candidates(resume)
        )
        folder, self._skipped_checkpoints = ckpt.resume(
            candidates, self.load, self.rank, self.world_size, self.group
        )
        return folder

    def load(self, folder: Path) -> None:
        self.resume_notes = []  # (of this candidate only: ckpt.resume may try several)
        common = resume_checks.read_common(folder)
        resume_checks.check_same_model(folder, common, self.config, self.backbone_kwargs)
        if common["num_classes"] != self.num_classes:
            raise ckpt.CheckpointError(
                f"{folder} was trained with {common['num_classes']} classes, this run has "
                f"{self.num_classes}; resume with the same data or checkpoint.resume=never"
            )
        saved_world = int(common["world_size"])
        exact = (
            ckpt.load_shard_exact(folder, self.rank, self.world_size)
            if saved_world == self.world_size
            else None
        )
        if exact is None:
            exact = ckpt.load_shard_rows(folder, self.head.shard.start, self.head.shard.end)
        ckpt.refuse_nonfinite(folder, {"common": common, "shard": exact}, self.group)
        resume_checks.check_head_state(folder, common, exact["head"], self.head.state_dict(), self.config.head.margin)
        self.backbone.load_state_dict(common["backbone"])
        self.resume_notes += resume_ema(self.ema, common.get("ema"), self.backbone, folder)
        # a resharded sampling stream is None: the head reseeds it for its rank and the step
        self.head.load_state_dict(exact["head"], strict="_extra_state" in exact["head"])
        optim_reg = load_regularizer(
            folder, common, exact, saved_world, self.world_size, self._second_head, self.regularizer
        )
        configured = config_hyperparameters(self.optimizer)
        state = join_optimizer_state(
            self.optimizer, self.head, self.regularizer, common, exact["optim_head"], optim_reg
        )
        self.optimizer.load_state_dict(state)
        self.resume_notes += restore_hyperparameters(self.optimizer, configured)
        if hasattr(self.optimizer, "load_shard_state"):
            same = saved_world == self.world_size
            self.optimizer.load_shard_state(exact.get("engine") if same else None)
        self.plan, notes = resume_plan(
            self.config, common, len(self.dataset), self.schedule, self.samples_per_step
        )
        self.resume_notes += notes
        if self.scaler is not None and common.get("scaler"):
            self.scaler.load_state_dict(common["scaler"])
        data = common["data"]
        consumed = consumed_from_position(data, saved_world, self.config.data.pk_k)
        self.stream = BatchStream(self.loader, self.world_size, int(data["epoch"]), consumed)
        if "rng" in exact:
            ckpt.set_rng_state(exact["rng"])
        self.step = int(common["step"])

    # ------------------------------------------------------------------ one step
    def _sync_context(self, last: bool):
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (unscaled) loss, detached,
        on the device (read once per optimizer step, not per micro-batch)."""
        accumulate = self.config.optim.accumulate
        with self._sync_context(last):
            images = images.to(self.precision.param_dtype)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.precision.autocast(self.device):
                output = self.model(images)
            embeddings, second = output if self.two_head is not None else (output, None)
            # the head's and the regularizers' losses are replicated over the ranks and give
            # the exact gradient for the local rows: x world size turns DDP's mean into a sum
            embeddings = scale_backbone_grad(embeddings, self.world_size)
            dtype = self.precision.param_dtype
            loss = self._regularized_loss(embeddings.to(dtype), second, labels)
            scaled = loss / accumulate
            if self.config.engine.name == "deepspeed":
                self.model.backward(scaled, scale_wrt_gas=False)  # loss already / accumulate
                if not last:
                    self.model.step()  # before the boundary: only counts the micro-step
            else:
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def _regularized_loss(
        self, embeddings: torch.Tensor, second: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """head loss + regularizer.weight * regularizer (on the second head's output for
        the triplet regularizer, else on the embeddings)."""
        r = self.config.regularizer
        loss = self.head(embeddings, labels) if r.with_head else None
        if self.regularizer is None:
            return loss
        if second is not None:
            features = scale_backbone_grad(second, self.world_size).to(embeddings.dtype)
        else:
            features = embeddings
        extra = r.weight * self.regularizer(features, labels)
        return extra if loss is None else loss + extra

    def train_step(self) -> StepResult:
        accumulate = self.config.optim.accumulate
        losses = []
        # skip policy: a skipped step must not move BatchNorm's running statistics either
        network = self.two_head if self.two_head is not None else self.backbone
        buffers = None
        if self.config.train.nonfinite == "skip":
            if self._buffer_snapshot is None:
                self._buffer_snapshot = BufferSnapshot([network, self.head, self.regularizer])
            buffers = self._buffer_snapshot.take()
        frozen = self.freeze.begin_step(self.step)
        lr = self.schedule.apply()  # (before the backward: head.fused_update steps the centres there)
        for i in range(accumulate):
            images, labels = self.stream.next()
            losses.append(self.micro_step(images, labels, last=i == accumulate - 1))
        loss_sum = torch.stack(losses).sum().detach()
        flags = torch.stack([(~torch.isfinite(loss_sum)).to(torch.float32),
                             loss_sum.new_full((), float(self.stop_request.requested_here), dtype=torch.float32)])
        flags = any_rank_flags(flags, self.group)  # [a loss is non-finite, a stop was asked] on any rank
        self.reads.add(self.step + 1, loss_sum, flags)
        loss = None  # (train.host_reads = "when_logging": read later, see `_apply_reads`)
        if not self.reads.deferred:
            # the step's host read: the loss (the non-finite policy needs it) and the flags
            (record,) = self._apply_reads()  # (a stop agreed there is acted on at the end of the step)
            loss = record.loss
            if record.nonfinite:  # any rank's: every rank takes the same decision
                self.optimizer.zero_grad(set_to_none=True)
                if buffers is not None:
                    buffers.restore()
                self._on_nonfinite(loss)
                self.schedule.advance()
                return StepResult(loss, lr, True, None)
            self.nonfinite.finite()
        if frozen:
            self.freeze.drop_grads()
        if self.config.head.update == "dense":
            densify(self.head)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.config.optim.clip_grad_norm > 0:
            sharded = list(self.head.parameters()) + [p for _, p in self._regularizer_params()]
            norm = clip_global_norm(
                self._replicated_params(),
                sharded if self.config.optim.clip_scope == "all" else [],
                self.config.optim.clip_grad_norm,
                self.group,
            )
        taken = True
        if self.scaler is not None:
            scale = self.scaler.get_scale() if self.ema is not None else 0.0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            taken = self.ema is None or scaler_step_taken(scale, self.scaler.get_scale())
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and taken:
            self.ema.update(self.backbone)
        self.schedule.advance()
        return StepResult(loss, lr, False, norm)

    def _apply_reads(self) -> list[StepRecord]:
        """Read the steps' rows waiting on the device (`fr_trainer.train.step_reads`): their
        losses go to `self.losses`, their stop flags are agreed; deferred, a non-finite loss
        stops the run here (`train.nonfinite = "stop"`; nothing after it has been saved)."""
        records = self.reads.read()
        if records:
            self.stop_request.agree(any(record.stop for record in records))
        for record in records:
            if self.reads.deferred and record.nonfinite:
                _, message = self.nonfinite.nonfinite(record.step, record.loss)
                raise NonFiniteLoss(f"{message} (found at the read after step {self.step}, train.host_reads = "
                                    f"\"when_logging\"; no checkpoint after step {record.step - 1} was written)")
            self.losses.append(record.loss)
        return records

    def _on_nonfinite(self, loss: float) -> None:
        stop, message = self.nonfinite.nonfinite(self.step + 1, loss)
        if stop:
            raise NonFiniteLoss(message)
        self.reporter.info(message)

    # ------------------------------------------------------------------ loop
    def sync_buffers(self) -> None:
        """Give every rank rank 0's backbone buffers (BatchNorm running statistics).

        DDP broadcasts them at the start of each forward, so after the last step every rank
        holds statistics updated by its own batch; verification and checkpoints use rank 0's.
        """
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            for buffer in [*self.backbone.buffers(), *(self.ema.buffers() if self.ema else [])]:
                dist.broadcast(buffer, 0, group=self.group)

    def verify(self) -> dict[str, dict]:
        if not self.verifier:
            return {}
        self.watchdog.begin(self.step, "verification")
        self.sync_buffers()
        results = self.verifier.run(self.backbone, self.device, self.precision.param_dtype)
        line = ", ".join(f"{name} {r['accuracy'] * 100:.2f}%" for name, r in results.items())
        self.reporter.info(f"verification at step {self.step}: {line}")
        self.reporter.scalars(
            self.step, {f"val/{n}/accuracy": r["accuracy"] for n, r in results.items()}
        )
        if self.ema is not None:  # the average too, logged beside the weights
            ema = self.verifier.run(self.ema.module, self.device, self.precision.param_dtype)
            line = ", ".join(f"{name} {r['accuracy'] * 100:.2f}%" for name, r in ema.items())
            self.reporter.info(f"verification of the EMA at step {self.step}: {line}")
            self.reporter.scalars(self.step, {f"val/{n}/accuracy_ema": r["accuracy"] for n, r in ema.items()})
            self.ema_verification = ema
        return results

    @property
    def total_steps(self) -> int:
        """The optimizer step at which the run will end, at the current global batch."""
        return self.step + self.schedule.steps_left()

    def _finished_summary(self) -> dict:
        """A rerun of a finished run: say so, keep summary.json, train nothing."""
        plan = self.plan
        self.reporter.info(
            f"the run is complete: {self.schedule.samples_seen} of {plan.total_samples} samples "
            f"({plan.epochs:g} epochs) at step {self.step}; nothing to do (raise train.epochs "
            f"to continue it, or use a new run.name)"
        )
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {"steps": self.step}
        self.reporter.close()
        return dict(summary, already_complete=True)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train until the plan's samples are seen (or stop, checkpointed, after
        `stop_after` steps: tests).

        SIGTERM/SIGINT on any rank: all ranks save at the next step boundary and raise
        `Preempted`; a watchdog thread names the rank a hung step waits for (train/watchdog.py).
        """
        if self._lock_released:  # a second fit() on this Trainer: every rank takes part
            self.run_lock = take_run_lock(self.run_dir, self.rank, self.group, self.device)
            self._lock_released = False
        self.stop_request.install()
        self.watchdog.start()
        try:
            return self._fit(stop_after)
        finally:
            self.watchdog.stop()
            self.stop_request.uninstall()
            self._release_run_lock()
            self._lock_released = True

    def _refresh_run_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.refresh()

    def _release_run_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def _preempt(self) -> Preempted:
        """Save this step (unless just saved) for a stop signal; the exception to raise."""
        folder = self.save() if self._saved_step != self.step else None
        self.reporter.info(f"stopping at step {self.step}: {self.stop_request.reason}")
        return Preempted(self.step, self.stop_request.reason, folder)

    def _fit(self, stop_after: int | None = None) -> dict:
        c = self.config
        r = self.reporter
        for note in self.resume_notes:
            r.info(f"resume: {note}")
        if self.resumed_from is not None and self.schedule.done:
            return self._finished_summary()
        r.info(
            f"training {c.model.backbone} on {self.dataset.rec_path} ({len(self.dataset)} images, "
            f"{self.num_classes} classes), world size {self.world_size}, {self.device}, "
            f"{self.precision.name}"
            + (f" ({self.precision.reason})" if self.precision.reason else "")
            + f", {self.total_steps} steps of {self.samples_per_step} samples "
            f"({self.plan.total_samples} samples, {self.plan.epochs:g} epochs)"
            + (f", resumed from {self.resumed_from}" if self.resumed_from else "")
            + (", the head's centres stepped in its backward" if self.head.updates_in_backward else "")
            + (f", losses read every {c.log.every_steps} steps" if self.reads.deferred else "")
        )
        if self.device.type == "cpu":
            r.info(hugepage_malloc_state())
        initial = self.verify() if c.eval.at_start and self.step == 0 else {}
        self.backbone.train()
        r.start(self.step)
        self.losses = []
        losses = self.losses  # (filled by `_apply_reads`)
        verification: dict = {}
        throughput: dict = {}
        t_loop = time.perf_counter()
        first_step = self.step
        while not self.schedule.done:
            self.watchdog.begin(self.step + 1, "train step")
            # a rank's own data error is left for its peers; a peer's is raised by its message
            result = peer_failure.guarded(self.train_step, self.run_dir, self.rank, self.world_size)
            self.step += 1
            done = self.schedule.done
            log = self.step % c.log.every_steps == 0 or done
            save = bool(c.checkpoint.every_steps) and self.step % c.checkpoint.every_steps == 0 and not done
            check = bool(c.eval.every_steps) and self.step % c.eval.every_steps == 0 and not done
            stopping = stop_after is not None and self.step - first_step >= stop_after
            if self.reads.deferred and (log or save or check or stopping):
                self._apply_reads()  # (at the same steps on every rank)
            shown = losses[-1] if losses else float("nan")
            throughput = r.step(self.step, shown, result.lr, self.samples_per_step, log) or throughput
            if save:
                self.save()
            if check:
                verification = self.verify()
            if stopping:
                self.save()
                return {"stopped_at": self.step, "losses": losses}
            # agreed in the step's read: every rank stops at the same step (after the last: finish)
            if not self.schedule.done and self.stop_request.agreed:
                raise self._preempt()
        loop_seconds = time.perf_counter() - t_loop
        folder = self.save()
        if c.eval.at_end:
            verification = self.verify()
        summary = self._summary(losses, verification, loop_seconds, folder, first_step)
        summary["verification_initial"] = _accuracies(initial)
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        r.close()
        return summary

    def _summary(self, losses, verification, loop_seconds, folder, first_step) -> dict:
        steps = self.step - first_step
        summary = {
            "steps": self.step,
            "steps_this_run": steps,
            "samples_seen": self.schedule.samples_seen,
            "epochs": self.schedule.samples_seen / self.plan.basis.epoch_samples,
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "losses": losses,
            "samples_per_s": steps * self.samples_per_step / loop_seconds
            if loop_seconds > 0
            else None,
            "train_seconds": loop_seconds,
            "wall_seconds": time.perf_counter() - self.t_start,
            "world_size": self.world_size,
            "checkpoint": str(folder),
            "verification": _accuracies(verification),
        }
        if self.ema is not None:
            summary["verification_ema"] = _accuracies(self.ema_verification)
        return summary

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def state_snapshot(self) -> dict:
        """Backbone and head tensors (CPU copies), for tests."""
        return {
            "backbone": {
                k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()
            },
            "head": self.head.weight.detach().cpu().clone(),
            "regularizer": {
                k: v.detach().cpu().clone() for k, v in self.regularizer.state_dict().items()
            }
            if self.regularizer is not None
            else {},
            "second_head": {
                k: v.detach().cpu().clone() for k, v in self.two_head.second_head.state_dict().items()
            }
            if self.two_head is not None
            else {},
            "ema": {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
            if self.ema is not None
            else {},
        }
