"""What the trainer puts into a checkpoint, and how the optimizer's state is cut for it.

A checkpoint has a *common* part, written by rank 0, with everything replicated (config,
backbone, its optimizer state, schedule and plan, scaler, data position, the triplet second
head, the EMA), and one *shard* part per rank with everything sharded by class (the head's
rows and their optimizer state, the RNG states, the center loss's centres, DeepSpeed's
ZeRO partition). `checkpoint.save_checkpoint` writes them (and adds `step`, `world_size`,
`format`); the layout is described in docs/formats.md#training-checkpoints.

The optimizer holds its state by parameter index over its groups: the replicated
parameters first (backbone, second head), then the head's, then the regularizer's. The
replicated part is saved by index (the same on every rank and at every world size), the
head's and the centres' by parameter name, so that a resume at another world size can cut
their rows; `join_optimizer_state` puts the three back together.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fr_trainer.heads import PartialFC
from fr_trainer.regularizers import CenterLoss
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.config import Config, to_dict
from fr_trainer.train.data_setup import BatchStream
from fr_trainer.train.ema import BackboneEMA
from fr_trainer.train.run_plan import RunPlan
from fr_trainer.train.schedule import PolySchedule


class OptimizerParts(NamedTuple):
    replicated: dict  # the replicated parameters' state, by index
    head: dict  # the head's, by parameter name
    param_groups: list
    regularizer: dict  # the (sharded) regularizer's, by parameter name


def _names(module: nn.Module | None) -> list[str]:
    return [name for name, _ in module.named_parameters()] if module is not None else []


def split_optimizer_state(
    optimizer: torch.optim.Optimizer, head: nn.Module, regularizer: nn.Module | None
) -> OptimizerParts:
    """`optimizer`'s state cut into the replicated parameters' (the first param group),
    `head`'s and `regularizer`'s (the groups after it, in that order)."""
    state = optimizer.state_dict()
    num_backbone = len(optimizer.param_groups[0]["params"])
    names = _names(head)
    num_head = num_backbone + len(names)
    reg_names = _names(regularizer)
    items = state["state"].items()
    backbone = {i: s for i, s in items if i < num_backbone}
    head_state = {names[i - num_backbone]: s for i, s in items if num_backbone <= i < num_head}
    reg = {reg_names[i - num_head]: s for i, s in items if i >= num_head}
    return OptimizerParts(backbone, head_state, state["param_groups"], reg)


def join_optimizer_state(
    optimizer: torch.optim.Optimizer,
    head: nn.Module,
    regularizer: nn.Module | None,
    common: dict,
    optim_head: dict,
    optim_reg: dict | None = None,
) -> dict:
    """The state dict for `optimizer.load_state_dict`: the replicated parameters' state and
    the param groups of a checkpoint's `common` part, with `optim_head` and `optim_reg`
    (by parameter name, this rank's rows) put back at their indices."""
    num_backbone = len(optimizer.param_groups[0]["params"])
    names = _names(head)
    state = dict(common["optim_backbone"])
    for name, value in optim_head.items():
        state[num_backbone + names.index(name)] = value
    reg_names = _names(regularizer)
    for name, value in (optim_reg or {}).items():
        state[num_backbone + len(names) + reg_names.index(name)] = value
    return {"state": state, "param_groups": common["param_groups"]}


def checkpoint_parts(
    *,
    rank: int,
    config: Config,
    num_classes: int,
    backbone_kwargs: dict,
    backbone: nn.Module,
    head: PartialFC,
    second_head: nn.Module | None,
    regularizer: nn.Module | None,
    ema: BackboneEMA | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    schedule: PolySchedule,
    plan: RunPlan,
    stream: BatchStream,
    precision: str,
) -> tuple[dict | None, dict]:
    """(common, shard): the common part (None except on rank 0, which alone writes it) and
    this rank's shard part of a checkpoint of the current state."""
    optim = split_optimizer_state(optimizer, head, regularizer)
    common = None
    if rank == 0:
        common = {
            "config": to_dict(config),
            "num_classes": num_classes,
            "embedding_size": config.model.embedding_size,
            "backbone_name": config.model.backbone,
            "backbone_kwargs": backbone_kwargs,
            "backbone": backbone.state_dict(),
            "optim_backbone": optim.replicated,
            "param_groups": optim.param_groups,
            "schedule": schedule.state_dict(),
            "plan": plan.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "data": stream.position(),
            "precision": precision,
            "regularizer_name": config.regularizer.name,
            "second_head": second_head.state_dict() if second_head is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
        }
    shard = {
        "head": head.state_dict(),
        "optim_head": optim.head,
        "rng": ckpt.rng_state(),
        "shard": (head.shard.start, head.shard.num_local),
    }
    if hasattr(optimizer, "shard_state"):  # DeepSpeed: this rank's ZeRO partition
        shard["engine"] = optimizer.shard_state()
    if isinstance(regularizer, CenterLoss):  # centres sharded like the head
        shard["regularizer"] = regularizer.state_dict()
        shard["optim_regularizer"] = optim.regularizer
    return common, shard
