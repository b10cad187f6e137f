"""Device, precision, seeds and determinism of a training process (set once, in one place)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from fr_trainer.train.config import ConfigError

DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Precision:
    """`param_dtype`: dtype of weights; `autocast_dtype`: the backbone's autocast dtype or
    None; `scaler`: whether fp16 loss scaling is used."""

    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    scaler: bool
    reason: str = ""  # why `precision = "auto"` chose it (logged)

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device='cuda' but CUDA is not available; use train.device=cpu or auto"
        )
    return name


def resolve_precision(name: str, device_type: str, engine: str = "ddp") -> Precision:
    """auto: see `auto_precision` (bf16 where the hardware runs it fast); with `engine="deepspeed"` see
    `_deepspeed_precision` (that branch never scales the loss)."""
    if engine == "deepspeed":
        name = _deepspeed_precision(name, device_type)
    reason = ""
    if name == "auto":
        name, reason = auto_precision(device_type)
    if name == "fp16" and device_type != "cuda":
        raise ConfigError(
            "train.precision='fp16' needs CUDA (a grad scaler on GPU); on CPU use fp32 or bf16"
        )
    if name in ("fp16", "bf16"):
        return Precision(name, torch.float32, DTYPES[name], name == "fp16", reason)
    return Precision(name, DTYPES[name], None, False, reason)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX tiles: bf16 GEMMs and convolutions then run several times faster
    than fp32 (about 4x for a [256, 512] x [512, 50000] GEMM on an AMX machine)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def auto_precision(device_type: str) -> tuple[str, str]:
    """What `precision = "auto"` means on this machine, and why: mixed precision where the
    hardware runs 16-bit math fast (at the accuracy of fp32 training: master weights,
    reductions and the loss stay fp32), else fp32. bf16 needs no loss scaling, so it is
    preferred to fp16 wherever it is fast."""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU has bf16 tensor cores (no loss scaling needed)"
        return "fp16", "auto: this GPU has no fast bf16; fp16 with a grad scaler"
    if cpu_has_fast_bf16():
        return "bf16", "auto: this CPU has AVX512-BF16/AMX (bf16 runs several times faster than fp32)"
    return "fp32", "auto: this CPU has no fast bf16"


def _deepspeed_precision(name: str, device_type: str) -> str:
    """The DeepSpeed engine's backward does not go through a GradScaler, so fp16 (which
    needs one) is refused and auto means bf16 on a CUDA device that supports it, else fp32:
    a scaled loss would leave the head's gradients (outside the engine) multiplied by the
    scale, and an unscaled fp16 backward underflows."""
    if name == "fp16":
        raise ConfigError(
            "train.precision='fp16' is not supported with engine.name='deepspeed' (its loss is "
            "not scaled); use precision 'auto', 'bf16' or 'fp32', or engine.name='ddp'"
        )
    if name != "auto":
        return name
    return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- the GPU step
def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN picks the fastest convolution algorithms for the (fixed) 112x112 shapes on CUDA,
    unless the run asks for determinism."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def is_convolutional(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def use_channels_last(setting: str, backbone: torch.nn.Module, device: torch.device) -> bool:
    """model.channels_last: "auto" turns it on for convolutional backbones on CUDA (NHWC
    is what tensor-core convolutions want); "on" forces it wherever there are convolutions."""
    if setting == "off" or not is_convolutional(backbone):
        return False
    return setting == "on" or device.type == "cuda"


def prepare_backbone(backbone: torch.nn.Module, config, device: torch.device) -> bool:
    """Memory format and compilation of the backbone, in place; returns whether inputs
    should be channels_last too."""
    channels_last = use_channels_last(config.model.channels_last, backbone, device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    if config.model.compile:
        backbone.compile()  # in place: state_dict keys stay those of the eager module
    return channels_last


def _buffer_sync(every_forward: bool) -> dict:
    """DDP's per-forward buffer broadcast: `forward_sync_buffers` where this torch has it
    (it deprecates `broadcast_buffers`; buffers are still synced once at construction, and
    ours are equal there anyway: every rank builds the backbone from the same seed)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": every_forward}
    return {"broadcast_buffers": every_forward}


def wrap_ddp(network: torch.nn.Module, config, device: torch.device, find_unused: bool = False):
    """DistributedDataParallel with the run's [ddp] settings and optional gradient
    compression (the trainer's world-size factor on the embeddings is unaffected: the
    hooks average, like DDP itself)."""
    from torch.nn.parallel import DistributedDataParallel

    d = config.ddp
    model = DistributedDataParallel(
        network,
        device_ids=[device.index] if device.type == "cuda" else None,
        **_buffer_sync(d.broadcast_buffers),
        bucket_cap_mb=d.bucket_cap_mb,
        gradient_as_bucket_view=d.gradient_as_bucket_view,
        static_graph=d.static_graph,
        find_unused_parameters=d.find_unused_parameters or find_unused,
    )
    if d.comm_hook != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
        model.register_comm_hook(None, hook[d.comm_hook])
    return model
