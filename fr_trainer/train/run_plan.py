"""The run's length and warmup in samples, fixed when the run starts.

A run is planned once, at its first start, from the config and the *basis* of that start:
the optimizer steps of one epoch and the samples of one step (global batch = per-rank
batch x accumulate x world size). The basis is saved in every checkpoint; a resume, at any
world size or per-rank batch, derives the plan from the saved basis and the config, so

    total_samples  = ceil(epochs * steps_per_epoch) * step_samples    (or max_steps * step_samples)
    warmup_samples = min(warmup steps, total steps) * step_samples
    warmup steps   = optim.warmup_steps, else int(optim.warmup_epochs * steps_per_epoch)

stay what they were, and the learning rate as a function of samples seen equals the
uninterrupted run's. Changing `train.epochs` (or `max_steps`, the warmup) on resume is
honoured and reported: that is how a finished run is extended. `resume_plan` does that for
`Trainer.load`: the plan, the schedule set to it, and the notes for the resume log.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fr_trainer.train.config import Config
from fr_trainer.train.schedule import PolySchedule


@dataclass(frozen=True)
class PlanBasis:
    """What one epoch and one optimizer step were when the run started."""

    steps_per_epoch: int
    step_samples: int

    @property
    def epoch_samples(self) -> int:
        return self.steps_per_epoch * self.step_samples


@dataclass(frozen=True)
class RunPlan:
    basis: PlanBasis
    total_samples: int
    warmup_samples: int

    @property
    def epochs(self) -> float:
        return self.total_samples / self.basis.epoch_samples

    def state_dict(self) -> dict:
        return {
            "basis": asdict(self.basis),
            "total_samples": self.total_samples,
            "warmup_samples": self.warmup_samples,
        }


def make_plan(config: Config, basis: PlanBasis) -> RunPlan:
    """The plan the config asks for, on `basis`."""
    t, o = config.train, config.optim
    per_epoch = basis.steps_per_epoch
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_epochs * per_epoch)
    return RunPlan(
        basis, total_steps * basis.step_samples, min(warmup, total_steps) * basis.step_samples
    )


def basis_from_checkpoint(common: dict, num_samples: int) -> PlanBasis:
    """The basis a checkpoint was planned on; for checkpoints saved before plans existed,
    the basis of the world size and batch they were saved at."""
    saved = common.get("plan")
    if saved is not None:
        return PlanBasis(**saved["basis"])
    config = common["config"]
    world = int(common["world_size"])
    batch, accumulate = int(config["data"]["batch_size"]), int(config["optim"]["accumulate"])
    return PlanBasis(max(1, num_samples // (batch * world) // accumulate), batch * accumulate * world)


def describe_change(old: RunPlan, new: RunPlan) -> str | None:
    """A log line when the config changed the plan on resume, else None."""
    if (old.total_samples, old.warmup_samples) == (new.total_samples, new.warmup_samples):
        return None
    return (
        f"the config changes the plan: {old.total_samples} -> {new.total_samples} samples "
        f"({old.epochs:g} -> {new.epochs:g} epochs), warmup {old.warmup_samples} -> "
        f"{new.warmup_samples} samples"
    )


def resume_plan(
    config: Config,
    common: dict,
    num_samples: int,
    schedule: PolySchedule,
    samples_per_step: int,
) -> tuple[RunPlan, list[str]]:
    """The plan of the run's first start (length and warmup in samples), with what the
    config changes, for a resume from a checkpoint's `common` part (`num_samples`: the
    dataset's length). `schedule` is set to that plan and continues from the samples
    seen. Returns the plan and the notes for the resume log: a plan the config changed,
    a global batch that is not the saved one (`samples_per_step` now)."""
    notes: list[str] = []
    basis = basis_from_checkpoint(common, num_samples)
    plan = make_plan(config, basis)
    saved = common.get("plan")
    if saved is not None:
        old = RunPlan(basis, int(saved["total_samples"]), int(saved["warmup_samples"]))
        change = describe_change(old, plan)
        if change:
            notes.append(change)
    schedule.total_samples = plan.total_samples
    schedule.warmup_samples = plan.warmup_samples
    state = dict(common["schedule"])
    state.setdefault("step_samples", basis.step_samples)  # saved before samples were counted
    schedule.load_state_dict(state)
    if basis.step_samples != samples_per_step:
        notes.append(
            f"the global batch changes {basis.step_samples} -> {samples_per_step} "
            f"samples; the schedule and the epochs continue in samples "
            f"({schedule.samples_seen} of {plan.total_samples} seen)"
        )
    return plan, notes
