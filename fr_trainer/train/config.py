"""Typed training configuration: TOML/JSON files, validation, dotted overrides.

    cfg = load_config("configs/demo.toml", overrides=["optim.lr=0.2", "data.root=/data"])
    save_config(cfg, run_dir / "config.json")     # the resolved config of a run

Unknown sections or keys are errors that name the key and list the accepted ones.
Override values are parsed as TOML values (`0.2`, `true`, `"text"`, `[1, 2]`); a bare
word that is not valid TOML is taken as a string (`--set model.backbone=iresnet50`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib


class ConfigError(ValueError):
    """A config value or key that is wrong; the message names it and the fix."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 0


@dataclass
class DataConfig:
    root: str = ""  # holds train.rec/.idx and the .bin sets
    rec: str = "train.rec"  # relative to root
    num_classes: int | None = None  # None: read from the data
    batch_size: int = 128  # per rank, per micro-step
    num_workers: int = 2
    flip: bool = True
    decode: str = "auto"  # auto | pil | gpu
    sampler: str = "random"  # random | pk (P classes x K images per rank; P = batch_size / pk_k)
    pk_k: int = 4  # K of the P x K sampler
    on_bad: str = "error"  # error (stop, naming the record) | skip (replace by the next good one)
    max_bad_fraction: float = 0.001  # on_bad=skip: stop once a rank met more bad records than this x size
    # torch: DataLoader workers decode (data.decode); dali: DALI decodes the same samples in
    # the same order with the same flips (nvJPEG on CUDA, CPU otherwise; the `dali` extra)
    loader: str = "torch"
    dali_threads: int = 2  # DALI decode threads per rank


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    embedding_size: int = 512
    dropout: float = 0.0
    grad_checkpointing: bool = False
    # "default": our init (Kaiming-normal convs); "upstream": arcface_torch's iresnet init
    # (convs N(0, 0.1), the embedding BatchNorm1d's weight fixed at 1 and not trained)
    init: str = "default"
    channels_last: str = "auto"  # auto (on CUDA, for convolutional backbones) | on | off
    compile: bool = False  # torch.compile the backbone (inductor; gcc on CPU, Triton on GPU)
    # "" or a backbone state_dict file (arcface_torch's published iresnet/mbf/ViT weights load
    # as they are; fr_trainer/backbones/pretrained.py) loaded right after the backbone is built
    pretrained: str = ""
    # (a run directory / checkpoint of ours also works: its backbone, not its head)
    pretrained_ema: bool = False  # model.pretrained is our run: take its EMA of the weights
    # EMA of the backbone weights after each taken optimizer step (train/ema.py); 0: off.
    # The average is checkpointed, verified beside the weights and exported with --ema
    ema_decay: float = 0.0
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    # fine-tuning (train/freeze.py): the backbone frozen (BN in eval mode, weights unchanged)
    # for the first freeze_steps optimizer steps; the head trains from the start
    freeze_steps: int = 0


@dataclass
class HeadConfig:
    margin: str = "arcface"
    margin_args: dict[str, Any] = field(default_factory=lambda: {"s": 64.0, "m": 0.5})
    sample_rate: float = 1.0
    chunk_size: int | None = None
    # sampled head (sample_rate < 1): "sparse" updates only the sampled rows (their momentum
    # and weight decay too); "dense" (arcface_torch) applies momentum and weight decay to
    # every row each step, as if the unsampled rows had a zero gradient
    update: str = "sparse"
    # the head's GEMMs and logit buffer: auto (follow train.precision's autocast: bf16 / fp16)
    # | fp32 | bf16 | fp16; the centres stay fp32 (fr_trainer/heads/precision.py)
    dtype: str = "auto"
    logits_dtype: str = "auto"  # auto (fp16 head: fp16, bf16 head: fp32) | fp32 | bf16 | fp16
    # non-target cosines above it count as 0 (likely the same identity under another label);
    # 0 = off (arcface_torch's interclass_filtering_threshold)
    interclass_filtering_threshold: float = 0.0
    # torch.compile the head's elementwise passes (margin, softmax, softmax gradient;
    # fr_trainer/heads/fused.py); off: eager. Off by default: no measurement shows it pays yet
    compile: bool = False
    # step the centres inside the head's backward, a piece of classes at a time: their whole
    # fp32 gradient never exists (fr_trainer/train/fused_update.py says what it rules out)
    fused_update: bool = False


@dataclass
class RegularizerConfig:
    """A loss added to the head's: total = head loss + weight * regularizer (LOSSES.md)."""

    name: str = ""  # "" (none) | center | triplet | circle_pair
    weight: float = 1.0  # lambda (center loss: 0.003 in the paper)
    # keyword arguments of the regularizer: center {alpha, update = "paper" | "sgd"},
    # triplet {margin, mining = "batch_hard" | "semi_hard", normalize}, circle_pair {gamma, m}
    args: dict[str, Any] = field(default_factory=dict)
    second_dim: int = 256  # triplet: width of the second (ranking) head
    with_head: bool = True  # false: train with the regularizer alone (circle_pair, triplet)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # for the whole global batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    power: float = 2.0  # polynomial decay exponent
    clip_grad_norm: float = 0.0  # 0: no clipping
    clip_scope: str = "all"  # all (backbone + head + regularizer) | backbone (arcface_torch)
    accumulate: int = 1  # micro-steps per optimizer step
    backbone_lr_scale: float = 1.0  # the backbone's LR = this x the scheduled LR (fine-tuning)


@dataclass
class TrainConfig:
    epochs: float = 20.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 where fast (bf16 GPUs, AVX512-BF16/AMX CPUs), else fp16 on cuda, fp32 on cpu
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 | fp64
    nonfinite: str = "stop"  # stop | skip
    max_nonfinite_skips: int = 10  # consecutive skips before stopping anyway
    # when a step's loss and flags are read on the host (a sync): every_step | when_logging
    # (every log.every_steps, and before saves and verification) | auto (when_logging on
    # CUDA with nonfinite = "stop", else every_step); fr_trainer/train/step_reads.py
    host_reads: str = "auto"
    deterministic: bool = False
    threads: int = 0  # torch intra-op threads per rank (0: torch default)
    scaler_growth_interval: int = 2000  # fp16 GradScaler (torch's default; arcface_torch: 100)
    # a step (or checkpoint save, verification) waiting longer than this for another rank ends
    # the job with status 76, naming that rank (train/watchdog.py)
    collective_timeout_s: float = 600.0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in the run dir) | never | PATH


@dataclass
class LogConfig:
    every_steps: int = 50
    tensorboard: bool = True
    progress: str = "auto"  # auto (a bar when attached to a terminal) | on | off


@dataclass
class EvalConfig:
    every_steps: int = 2000  # 0: only at the end
    bins: list[str] = field(default_factory=list)  # names of .bin sets in data.root ([]: none)
    batch_size: int = 128
    at_end: bool = True
    at_start: bool = False  # also verify the initial weights (not when resuming)


@dataclass
class EngineConfig:
    name: str = "ddp"  # ddp | deepspeed (the `deepspeed` extra; see train/deepspeed_engine.py)
    zero_stage: int = 1  # deepspeed: ZeRO stage 1 (optimizer states) or 2 (+ gradients)


@dataclass
class DDPConfig:
    """How DistributedDataParallel wraps the backbone (engine.name = "ddp")."""

    broadcast_buffers: bool = False  # BatchNorm statistics: the trainer syncs them before saves
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    static_graph: bool = False  # valid when every step uses the same parameters
    find_unused_parameters: bool = False  # set automatically where a branch is unused
    comm_hook: str = "none"  # none | fp16 | bf16: compress gradients for the all-reduce


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


CHOICES: dict[str, tuple[str, ...]] = {
    "data.decode": ("auto", "pil", "gpu"),
    "data.sampler": ("random", "pk"),
    "data.on_bad": ("error", "skip"),
    "data.loader": ("torch", "dali"),
    "regularizer.name": ("", "center", "triplet", "circle_pair"),
    "optim.name": ("sgd", "adamw"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "fp16", "bf16", "fp64"),
    "train.nonfinite": ("stop", "skip"),
    "train.host_reads": ("auto", "every_step", "when_logging"),
    "log.progress": ("auto", "on", "off"),
    "engine.name": ("ddp", "deepspeed"),
    "model.init": ("default", "upstream"),
    "model.channels_last": ("auto", "on", "off"),
    "head.update": ("sparse", "dense"),
    "head.dtype": ("auto", "fp32", "bf16", "fp16"),
    "head.logits_dtype": ("auto", "fp32", "bf16", "fp16"),
    "optim.clip_scope": ("all", "backbone"),
    "ddp.comm_hook": ("none", "fp16", "bf16"),
}


MAX_EMBEDDING_SIZE = 65536  # far above any face model (512 is usual); catches a typo'd size

# --------------------------------------------------------------------------- building
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's type (int -> float widening allowed)."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any:
        return value
    base = origin or hint
    if base is list and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], where) if args else v for v in value]
    if base is dict and isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) and base is not bool:
        raise ConfigError(f"{where} must be {getattr(base, '__name__', base)}, got {value!r}")
    if not isinstance(value, base):
        raise ConfigError(
            f"{where} must be {getattr(base, '__name__', base)}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table of keys, got {values!r}")
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            raise ConfigError(
                f"unknown config key {name!r}; accepted in "
                f"{'[' + where + ']' if where else 'the top level'}: {', '.join(known)}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, name)
        else:
            kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def config_from_dict(values: dict) -> Config:
    """A validated `Config` from nested dicts (unknown keys raise `ConfigError`)."""
    config = _build(Config, values, "")
    validate(config)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- overrides
def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(values: dict, assignment: str) -> None:
    """`a.b.c=value` into nested dict `values` (in place)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not KEY=VALUE; e.g. --set optim.lr=0.2")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is not a dotted name like optim.lr")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    target[parts[-1]] = _parse_value(text.strip())


def read_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass a .toml or .json file (see configs/)"
        )
    if path.suffix == ".toml":
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
    raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .toml or .json")


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a config file (or the defaults when `path` is None) and apply overrides."""
    values = read_config_file(path) if path is not None else {}
    for assignment in overrides:
        apply_override(values, assignment)
    return config_from_dict(values)


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- validation
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Value checks that need no data; the data-dependent ones run in `train.setup`."""
    from fr_trainer.train import config_checks as checks  # the registries (imports torch)
    from fr_trainer.train.fused_update import fused_update_problems

    checks.check_finite(config)
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        checks.check_choice(key, getattr(getattr(config, section), name), allowed)
    d, o, t, h = config.data, config.optim, config.train, config.head
    checks.check_backbone(config.model.backbone)
    checks.check_margin(h.margin, h.margin_args, d.num_classes)
    checks.check_resume(config.checkpoint.resume)
    checks.check_output_dir(config.run.output_dir)
    from fr_trainer.train.deepspeed_engine import check_config  # no deepspeed import

    check_config(config)
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(d.dali_threads >= 1, f"data.dali_threads must be >= 1, got {d.dali_threads}")
    _check(
        d.num_classes is None or d.num_classes >= 1,
        f"data.num_classes must be >= 1 or left out, got {d.num_classes}",
    )
    _check(
        1 <= config.model.embedding_size <= MAX_EMBEDDING_SIZE,
        f"model.embedding_size must be in [1, {MAX_EMBEDDING_SIZE}], got {config.model.embedding_size}",
    )
    _check(0 <= config.model.dropout < 1, f"model.dropout must be in [0, 1), got {config.model.dropout}")
    _check(
        config.model.pretrained == config.model.pretrained.strip(),
        f"model.pretrained={config.model.pretrained!r} has leading/trailing spaces; give the bare path",
    )
    m = config.model
    _check(
        0.0 <= m.ema_decay < 1.0,
        f"model.ema_decay must be in [0, 1) (0 = off; e.g. 0.999), got {m.ema_decay}",
    )
    _check(m.freeze_steps >= 0, f"model.freeze_steps must be >= 0 (0 = never frozen), got {m.freeze_steps}")
    _check(
        config.optim.backbone_lr_scale >= 0,
        f"optim.backbone_lr_scale must be >= 0 (1 = the scheduled LR), got {config.optim.backbone_lr_scale}",
    )
    _check(0.0 < h.sample_rate <= 1.0, f"head.sample_rate must be in (0, 1], got {h.sample_rate}")
    _check(
        0.0 <= h.interclass_filtering_threshold <= 1.0,
        f"head.interclass_filtering_threshold must be in [0, 1] (0 = off), got {h.interclass_filtering_threshold}",
    )
    _check(
        h.chunk_size is None or h.chunk_size >= 1,
        f"head.chunk_size must be >= 1 or left out, got {h.chunk_size}",
    )
    for problem in fused_update_problems(config):
        _check(False, problem)
    r = config.regularizer
    _check(
        d.decode != "gpu" or config.train.device != "cpu",
        "data.decode='gpu' needs train.device='cuda' (or auto on a GPU machine); use data.decode='pil' on CPU",
    )
    _check(d.pk_k >= 1, f"data.pk_k must be >= 1, got {d.pk_k}")
    _check(
        0.0 <= d.max_bad_fraction < 1.0,
        f"data.max_bad_fraction must be in [0, 1), got {d.max_bad_fraction} (0.001: stop when "
        "more than 0.1% of the records are bad)",
    )
    _check(
        d.sampler != "pk" or d.batch_size % d.pk_k == 0,
        f"data.sampler='pk' needs data.batch_size (P x K per rank) a multiple of data.pk_k; "
        f"got batch_size={d.batch_size}, pk_k={d.pk_k}",
    )
    _check(r.weight >= 0, f"regularizer.weight must be >= 0, got {r.weight}")
    _check(r.second_dim >= 1, f"regularizer.second_dim must be >= 1, got {r.second_dim}")
    _check(
        r.with_head or r.name in ("triplet", "circle_pair"),
        f"regularizer.with_head=false needs regularizer.name triplet or circle_pair "
        f"(got {r.name!r}): nothing else would train the embedding",
    )
    _check(
        r.name != "center" or "loss_weight" not in r.args,
        "regularizer.args.loss_weight is not used: put the center-loss lambda in "
        "regularizer.weight",
    )
    checks.check_regularizer_args(r.name, r.args)
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(
        o.momentum >= 0 and o.weight_decay >= 0,
        f"optim.momentum and optim.weight_decay must be >= 0, got {o.momentum}, {o.weight_decay}",
    )
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    _check(
        o.warmup_steps is None or o.warmup_steps >= 0,
        f"optim.warmup_steps must be >= 0, got {o.warmup_steps}",
    )
    _check(o.power >= 0, f"optim.power must be >= 0, got {o.power}")
    _check(
        o.clip_grad_norm >= 0,
        f"optim.clip_grad_norm must be >= 0 (0 = off), got {o.clip_grad_norm}",
    )
    _check(o.accumulate >= 1, f"optim.accumulate must be >= 1, got {o.accumulate}")
    _check(
        t.epochs > 0 or (t.max_steps or 0) > 0,
        f"train.epochs must be > 0 (or set train.max_steps), got {t.epochs}",
    )
    _check(
        t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"
    )
    _check(
        not (t.host_reads == "when_logging" and t.nonfinite == "skip"),
        'train.host_reads = "when_logging" reads the losses after their optimizer steps; train.nonfinite = '
        '"skip" must know a non-finite loss before its step: use train.host_reads = "every_step" (or "auto")',
    )
    _check(
        t.max_nonfinite_skips >= 1,
        f"train.max_nonfinite_skips must be >= 1, got {t.max_nonfinite_skips}",
    )
    _check(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    _check(
        t.scaler_growth_interval >= 1,
        f"train.scaler_growth_interval must be >= 1, got {t.scaler_growth_interval}",
    )
    _check(
        config.ddp.bucket_cap_mb > 0, f"ddp.bucket_cap_mb must be > 0, got {config.ddp.bucket_cap_mb}"
    )
    _check(
        t.collective_timeout_s > 0,
        f"train.collective_timeout_s must be > 0 seconds (default 600), got {t.collective_timeout_s}",
    )
    _check(
        config.checkpoint.every_steps >= 0 and config.checkpoint.keep_last >= 1,
        "checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1",
    )
    _check(
        config.log.every_steps >= 1, f"log.every_steps must be >= 1, got {config.log.every_steps}"
    )
    _check(
        config.eval.every_steps >= 0,
        f"eval.every_steps must be >= 0, got {config.eval.every_steps}",
    )
    _check(
        bool(config.run.name) and "/" not in config.run.name,
        f"run.name must be a non-empty name without '/', got {config.run.name!r}",
    )
