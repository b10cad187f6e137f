"""DeepSpeed ZeRO (stage 1 or 2) as the backbone's data-parallel engine (`deepspeed` extra).

    [engine]
    name = "deepspeed"     # "ddp" (default) | "deepspeed"
    zero_stage = 2         # 1: optimizer states partitioned; 2: gradients too

Only the backbone goes into the engine. The PartialFC head is already model-parallel
(each rank owns a shard of the centres): it stays outside, with its own sparse-aware
optimizer (`fr_trainer.train.optim`), and `JointOptimizer` makes the two look like the
one optimizer the trainer steps, schedules and checkpoints.

Gradient scale: ZeRO stage 1/2 AVERAGES the backbone gradients over the data-parallel ranks,
exactly as DDP does (checked by tests/test_train_deepspeed.py against the DDP engine), so
the trainer's `scale_backbone_grad(embeddings, world_size)` stays the one place where
the world-size factor lives.

Gradient accumulation: the engine is told `gradient_accumulation_steps = optim.accumulate`
(so it reduces only at the boundary) but the trainer already divides each micro-loss by
`accumulate`, so the engine is asked not to divide again (`scale_wrt_gas=False`).

Checkpoints: the backbone weights are replicated after every step (ZeRO 1/2 all-gathers
the updated partitions) and are saved as with DDP; each rank's ZeRO partition of the
backbone optimizer state goes into that rank's shard file. Resuming restores it at the
same world size; at another world size (or from a DDP checkpoint) the backbone optimizer
state starts fresh, with a warning, while weights, head, schedule and data position resume.

Not supported with this engine (a `ConfigError` says so): `optim.clip_grad_norm > 0` (the
backbone gradient lives in ZeRO partitions), `train.nonfinite = "skip"` (the engine has
already reduced the step's gradients), fp16 with a grad scaler.

Precision: the engine's backward is not scaled, so `train.precision = "auto"` resolves to
bf16 on a CUDA device that supports it, else fp32 (`runtime.resolve_precision`), and no
GradScaler is built: a scaled loss would leave the head's gradients, which the engine does
not see, multiplied by the scale. Tested on CPU with gloo in fp32.

DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`)
when its comm layer starts; only inference all-reduce uses it, and compiling it takes
minutes and a C++ toolchain, so it is switched off here (`shm_comm=False`).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from fr_trainer.train.config import Config, ConfigError


def import_deepspeed():
    """`deepspeed`, on the CPU accelerator when there is no CUDA device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(
            f"engine.name='deepspeed' needs DeepSpeed ({error}); install the extra: "
            "pip install 'fr_trainer[deepspeed]'"
        ) from error
    return deepspeed


def _disable_shm_comm() -> None:
    """Keep DeepSpeed's comm layer from JIT-building its CPU shared-memory all-reduce op.

    `deepspeed.comm.torch.build_shm_op` builds it only if `deepspeed.ops.__compatible_ops__`
    says the op is compatible; that dict is probed lazily on first access, and nothing
    else in DeepSpeed reads it, so marking the op incompatible before the comm layer
    starts is enough."""
    import deepspeed.ops as ops

    compatible = dict(vars(ops).get("__compatible_ops__") or {})
    compatible["deepspeed_shm_comm"] = False
    vars(ops)["__compatible_ops__"] = compatible


def check_config(config: Config) -> None:
    """What the DeepSpeed engine cannot do (no data or import needed)."""
    e, o, t = config.engine, config.optim, config.train
    if e.name != "deepspeed":
        return
    if e.zero_stage not in (1, 2):
        raise ConfigError(f"engine.zero_stage must be 1 or 2, got {e.zero_stage}")
    if o.clip_grad_norm > 0:
        raise ConfigError(
            "optim.clip_grad_norm > 0 is not supported with engine.name='deepspeed' (the "
            "backbone gradient lives in ZeRO partitions); set it to 0 or use engine.name='ddp'"
        )
    if t.nonfinite != "stop":
        raise ConfigError(
            "train.nonfinite='skip' is not supported with engine.name='deepspeed' (the engine "
            "has reduced the step's gradients already); use 'stop' or engine.name='ddp'"
        )
    if getattr(getattr(config, "regularizer", None), "name", ""):
        raise ConfigError(
            "[regularizer] is not supported with engine.name='deepspeed' yet; use engine.name='ddp'"
        )
    if config.model.freeze_steps or o.backbone_lr_scale != 1.0:
        raise ConfigError(
            "model.freeze_steps and optim.backbone_lr_scale are not supported with "
            "engine.name='deepspeed' (ZeRO steps the backbone on its own); use engine.name='ddp'"
        )
    if t.precision == "fp16":
        raise ConfigError(
            "train.precision='fp16' is not supported with engine.name='deepspeed' "
            "(fp32 or bf16); or use engine.name='ddp'"
        )


def deepspeed_config(config: Config) -> dict:
    """The DeepSpeed config dict: ZeRO stage, micro batch and accumulation from `config`."""
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": config.optim.accumulate,
        "gradient_clipping": 0.0,
        "zero_optimization": {
            "stage": config.engine.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
        },
        # our SGD/AdamW are plain torch optimizers; ZeRO steps them on flat partitions
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class JointOptimizer:
    """The engine's ZeRO-wrapped backbone optimizer and the head's optimizer, stepped,
    scheduled and checkpointed as one.

    `param_groups` is [backbone groups..., head groups...] (so the lr schedule reaches
    both); `state_dict()` is a torch-style dict holding only the head's state, keyed
    after the backbone's group indices, which is what the trainer's checkpoint split
    expects; the backbone's partition is in `shard_state()`.
    """

    def __init__(self, engine, head_optimizer: torch.optim.Optimizer) -> None:
        self.engine = engine
        self.head = head_optimizer

    @property
    def backbone(self):
        return self.engine.optimizer

    @property
    def param_groups(self) -> list[dict]:
        return [*self.backbone.param_groups, *self.head.param_groups]

    @property
    def state(self):
        """The head optimizer's per-parameter state (the backbone's is partitioned)."""
        return self.head.state

    def _num_backbone(self) -> int:
        return len(self.backbone.param_groups[0]["params"])

    def step(self) -> None:
        self.engine.step()  # the accumulation boundary: ZeRO steps and re-gathers the weights
        self.head.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.head.zero_grad(set_to_none=set_to_none)  # the engine zeroes its own in step()

    def state_dict(self) -> dict:
        head = self.head.state_dict()
        offset = self._num_backbone()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.backbone.param_groups]
        return {
            "state": {offset + i: s for i, s in head["state"].items()},
            "param_groups": [*groups, *head["param_groups"]],
        }

    def load_state_dict(self, state: dict) -> None:
        offset = self._num_backbone()
        count = len(self.backbone.param_groups)
        head_groups = state["param_groups"][count:]
        end = offset + len(self.head.param_groups[0]["params"])
        # a DDP checkpoint also holds backbone entries here; only the head's are taken
        head_state = {i - offset: s for i, s in state["state"].items() if offset <= i < end}
        self.head.load_state_dict({"state": head_state, "param_groups": head_groups})
        for group, saved in zip(self.backbone.param_groups, state["param_groups"][:count]):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def shard_state(self) -> dict:
        return {"zero": self.backbone.state_dict(), "zero_stage": self.engine.zero_optimization_stage()}

    def load_shard_state(self, shard: dict | None) -> bool:
        """Restore this rank's ZeRO partition (after the backbone weights were loaded).
        Returns False, with a warning, when `shard` has none for this layout."""
        zero = shard.get("zero") if shard else None
        if zero is None or shard.get("zero_stage") != self.engine.zero_optimization_stage():
            warnings.warn(
                "the checkpoint has no ZeRO optimizer state for this engine and world size "
                f"({self.engine.dp_world_size}); the backbone optimizer state (momentum) starts fresh",
                stacklevel=2,
            )
            self.backbone._restore_from_bit16_weights()
            return False
        import torch.distributed as dist

        states = [None] * dist.get_world_size(self.backbone.dp_process_group)
        states[dist.get_rank(self.backbone.dp_process_group)] = zero
        self.backbone.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=False)
        return True


def build_engine(
    backbone: torch.nn.Module,
    head: torch.nn.Module,
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
    config: Config,
    env,
):
    """(engine, JointOptimizer): the backbone in a ZeRO engine with its own optimizer, and
    the head with another, outside the engine. `env` is the trainer's `DistributedEnv`:
    the process group must be initialised (the engine joins the default group), also for
    one process (`torchrun --nproc-per-node 1`)."""
    check_config(config)
    if not env.is_distributed:
        raise ConfigError(
            "engine.name='deepspeed' needs an initialised process group: launch with torchrun "
            "(also for one process) or use engine.name='ddp'"
        )
    deepspeed = import_deepspeed()
    _disable_shm_comm()
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    backbone_optimizer = make_optimizer([{"params": list(backbone.parameters())}])
    head_optimizer = make_optimizer([{"params": list(head.parameters())}])
    engine, _, _, _ = deepspeed.initialize(
        model=backbone,
        optimizer=backbone_optimizer,
        config=deepspeed_config(config),
        dist_init_required=False,
    )
    return engine, JointOptimizer(engine, head_optimizer)
