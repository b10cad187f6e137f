"""How an arcface_torch run's optimizer state and progress become ours (`import_insightface`).

Optimizer state: their index i in group 0 is the i-th parameter of the backbone file's
state_dict (`map_backbone` gives our names in that order); SGD's `momentum_buffer` carries
over as it is, AdamW's scalar `step` becomes our per-row step. Progress: `global_step`
counts iterations (micro-batches with `gradient_acc`, our `optim.accumulate`), each of
`per-GPU batch x W` samples; the scheduler's `warmup_iters` / `total_iters` become the
plan in samples; the data position is the first sample of `epoch` (they save at epoch
ends).
"""

from __future__ import annotations

import torch
from torch import nn

from fr_trainer.train.config import Config
from fr_trainer.train.insightface_files import (
    ImportFailure,
    SourceRun,
    optimizer_groups,
    optimizer_kind,
)
from fr_trainer.train.optim import SGD, AdamW

OVERLAID = ("lr", "momentum", "weight_decay", "betas", "eps")


# --------------------------------------------------------------------------- optimizer
def our_row_state(kind: str, state: dict, shape: torch.Size, where: str) -> dict:
    """Their state of one parameter in our optimizer's form (AdamW: a step per row)."""
    for key, value in state.items():
        if key != "step" and (not isinstance(value, torch.Tensor) or value.shape != shape):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ImportFailure(f"{where}: {key} has shape {got}, the parameter {list(shape)}; the "
                                "optimizer state does not belong to these weights")
    out = {k: v for k, v in state.items() if k != "step"}
    if kind == "adamw":
        out["step"] = torch.full((shape[0] if len(shape) else 1,), int(state["step"]), dtype=torch.int64)
    return out


def backbone_optimizer(source: SourceRun, kind: str, model: nn.Module, names: list[str]) -> dict[int, dict]:
    """Their backbone optimizer state, keyed by our parameter index."""
    path = source.rank_files[0]
    indices, _, state = optimizer_groups(path, source.optimizer)
    if len(indices) != len(names):
        raise ImportFailure(f"{path}: state_optimizer's group 0 has {len(indices)} parameters, the "
                            f"backbone {len(names)}; the file's backbone and optimizer do not match")
    ours = {name: (i, p) for i, (name, p) in enumerate(model.named_parameters())}
    out = {}
    for index, name in zip(indices, names):
        if index in state:
            position, param = ours[name]
            out[position] = our_row_state(kind, state[index], param.shape, f"{path} state {index} ({name})")
    return out


def param_groups(config: Config, model: nn.Module, source: SourceRun) -> list[dict]:
    """Our optimizer's two groups (backbone, centres), with their run's hyper-parameters
    where it saved them (the trainer then applies the config's and reports differences)."""
    head = nn.Parameter(torch.zeros(1, config.model.embedding_size))
    groups = [{"params": list(model.parameters())}, {"params": [head]}]
    o = config.optim
    optimizer = (SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
                 if o.name == "sgd" else
                 AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay))
    ours = optimizer.state_dict()["param_groups"]
    theirs = (source.optimizer or {}).get("param_groups") or [{}, {}]
    for group, saved in zip(ours, theirs):
        group.update({k: (list(saved[k]) if k == "betas" else saved[k]) for k in OVERLAID if k in saved and k in group})
    return ours


def run_optimizer(source: SourceRun, config: Config) -> str:
    """'sgd' / 'adamw' when the run saved optimizer state ('' otherwise); it must be the config's."""
    kind, where = "", source.rank_files[0] if source.rank_files else source.root
    if source.format == "v2":
        kind = optimizer_kind(where, optimizer_groups(where, source.optimizer)[2])
    elif source.format == "legacy" and where.with_name("rank_0_softmax_weight_mom.pt").is_file():
        kind, where = "sgd", where.with_name("rank_0_softmax_weight_mom.pt")
    if kind and kind != config.optim.name:
        raise ImportFailure(f"{where}: the run used {kind} (its optimizer state), the config "
                            f"optim.name={config.optim.name!r}; set optim.name={kind}")
    return kind


# --------------------------------------------------------------------------- progress
def iteration_samples(config: Config, source: SourceRun, batch_size: int | None) -> int:
    """Samples of one arcface_torch iteration (its `global_step` counts them): per-GPU
    batch x world size."""
    return (batch_size or config.data.batch_size) * source.world_size


def our_step(config: Config, source: SourceRun) -> int:
    """Optimizer steps done: their iterations / gradient_acc (= optim.accumulate)."""
    return source.global_step // config.optim.accumulate


def plan_and_schedule(config: Config, source: SourceRun, micro: int) -> tuple[dict | None, dict, list[str]]:
    """(the plan in samples or None, the schedule state, report lines); `micro`: the
    samples of one of their iterations."""
    acc = config.optim.accumulate
    batch, seen = micro * acc, source.global_step * micro
    schedule = {"samples_seen": seen, "base_lr": config.optim.lr, "step_samples": batch}
    lines = [f"step {our_step(config, source)}, epoch {source.epoch}: samples_seen = global_step "
             f"{source.global_step} x {micro} (batch x {source.world_size} ranks) = {seen}"
             + (f"; {acc} iterations per optimizer step (optim.accumulate)" if acc > 1 else "")]
    sched = source.scheduler
    if not sched or source.epoch < 1 or source.global_step < 1:
        lines.append("not imported: the run's length and warmup (no scheduler state); they come from "
                     "train.epochs and optim.warmup_* of the config")
        return None, schedule, lines
    total, warmup = int(sched.get("total_iters", 0)), int(sched.get("warmup_iters", 0))
    per_epoch = max(1, source.global_step // source.epoch // acc)
    plan = {"basis": {"steps_per_epoch": per_epoch, "step_samples": batch},
            "total_samples": total * micro, "warmup_samples": min(warmup, total) * micro}
    lines.append(f"plan: their scheduler's total_iters {total}, warmup_iters {warmup} iterations of {micro} "
                 f"samples ({per_epoch} steps per epoch = global_step / epoch); a config that differs "
                 "changes it and the trainer says so on resume")
    power = sched.get("power")
    if power is not None and float(power) != config.optim.power:
        lines.append(f"note: their LR decays with power {power}, the config's optim.power is "
                     f"{config.optim.power} (--set optim.power={power} keeps their curve)")
    return plan, schedule, lines


def data_position(config: Config, epoch: int) -> dict:
    """The first sample of `epoch` (arcface_torch saves at epoch ends)."""
    pk = config.data.sampler == "pk"
    return {"epoch": epoch, "consumed": 0, "unit": "classes" if pk else "samples",
            "batch_size": config.data.batch_size, "sampler": "pk" if pk else "random"}
