"""`fr-trainer import-insightface RUN_DIR OUT --config CONFIG`: continue an arcface_torch run.

Converts the files of an arcface_torch run (`insightface_files`: any world size W) into a
complete fr_trainer checkpoint in `OUT/checkpoints/` that `fr-trainer train CONFIG --set
checkpoint.resume=OUT` resumes at any world size:

- backbone: renamed to ours where they differ (`backbones.pretrained.to_our_names`) and
  checked against the config's backbone (every key, every shape);
- centres: arcface_torch's rank r holds the classes our `ClassShard(C, W, r)` owns (same
  formula), so their rank files become our W shards in class order; the trainer reshards
  them on load;
- optimizer state (checkpoint_gpu files): SGD momentum buffers or AdamW exp_avg /
  exp_avg_sq / step, of the backbone (by parameter name: their index i is the i-th
  parameter of their state_dict) and of the centres (rows as the centres);
- progress: `global_step` (iterations) / `optim.accumulate` (their `gradient_acc`) -> our
  step, `samples_seen = global_step x per-GPU batch x W`,
  `epoch` -> the data position (the epoch's first sample: they save at epoch ends), their
  scheduler's `warmup_iters` / `total_iters` -> the plan in samples.

Their per-GPU batch is the config's `data.batch_size` unless `--batch-size B` says
otherwise; their `gradient_acc` is the config's `optim.accumulate`. The centres' count
must be the data's (`data.num_classes` or data.root's .rec, when the config has them).
What is not imported (the AMP scaler, RNG states, the scheduler object itself) is listed
in the report (`OUT/import_insightface.log`). Reading: `insightface_files`; optimizer state and progress:
`insightface_mapping`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from fr_trainer.backbones import create_backbone
from fr_trainer.backbones.pretrained import PretrainedError, check_fits, to_our_names, unwrap_state_dict
from fr_trainer.distributed.shard import ClassShard
from fr_trainer.heads.init import init_centres
from fr_trainer.margins import create_margin
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.config import Config, ConfigError, load_config, to_dict
from fr_trainer.train.finiteness import describe, nonfinite_entries
from fr_trainer.train.insightface_files import ImportFailure, InsightfaceFormatError, RankHead, SourceRun, read_source
from fr_trainer.train.insightface_mapping import (
    backbone_optimizer,
    data_position,
    iteration_samples,
    our_row_state,
    our_step,
    param_groups,
    plan_and_schedule,
    run_optimizer,
)

PROG = "fr-trainer import-insightface"
REPORT = "import_insightface.log"


# --------------------------------------------------------------------------- checks
def check_config(config: Config) -> None:
    """What an imported run can be: a plain head and no sharded regularizer state."""
    if config.regularizer.name:
        raise ImportFailure(f"regularizer.name={config.regularizer.name!r}: arcface_torch runs have no "
                            "regularizer state; import with regularizer.name=\"\" (add one after resuming "
                            "with a new run)")
    if config.engine.name != "ddp":
        raise ImportFailure(f"engine.name={config.engine.name!r}: import into engine.name=\"ddp\"")
    margin = create_margin(config.head.margin, num_classes=2, **config.head.margin_args)
    if margin.has_bias or (isinstance(margin, nn.Module) and margin.state_dict()):
        raise ImportFailure(f"head.margin={config.head.margin!r} keeps state arcface_torch has not "
                            "(a bias or statistics); use arcface, cosface or combined")


def build_backbone(config: Config) -> tuple[nn.Module, dict]:
    """The config's backbone (as the trainer builds it) and its keyword arguments."""
    kwargs: dict = {"embedding_size": config.model.embedding_size}
    if config.model.dropout:
        kwargs["dropout"] = config.model.dropout
    try:
        return create_backbone(config.model.backbone, **kwargs), kwargs
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.backbone={config.model.backbone!r} with {kwargs}: {error}") from None


def map_backbone(model: nn.Module, source: SourceRun) -> tuple[dict, list[str]]:
    """(our backbone state_dict, our names of their parameters in their order)."""
    what = f"{source.backbone_file} (backbone)"
    state = to_our_names(model, unwrap_state_dict(source.backbone, what))
    try:
        check_fits(model, state, what)
    except PretrainedError as error:
        raise ImportFailure(f"{error}; set model.backbone / model.embedding_size to the run's network") from None
    params = {name for name, _ in model.named_parameters()}
    return state, [name for name in state if name in params]


# --------------------------------------------------------------------------- head
def head_rows(source: SourceRun, config: Config) -> tuple[int, list[int]]:
    """(num_classes, rows per rank), each rank's centres checked against arcface_torch's split."""
    rows, width = [], config.model.embedding_size
    for head in source.heads():
        if head.weight.shape[1] != width:
            raise ImportFailure(f"{head.path}: the centres are {head.weight.shape[1]}-d, model.embedding_size "
                                f"is {width}; set model.embedding_size={head.weight.shape[1]}")
        rows.append(int(head.weight.shape[0]))
    num_classes = sum(rows)
    for rank, (count, expected) in enumerate(zip(rows, ClassShard.sizes(num_classes, len(rows)))):
        if count != expected:
            raise ImportFailure(f"{source.rank_files[rank]}: holds {count} centres, but rank {rank} of "
                                f"{len(rows)} owns {expected} of {num_classes} classes; the rank files come "
                                "from different runs or world sizes")
    return num_classes, rows


def _shard(source: SourceRun, head: RankHead, rank: int, num_classes: int, kind: str, step: int) -> dict:
    shard = ClassShard(num_classes, source.world_size, rank)
    state = our_row_state(kind, head.state, head.weight.shape, f"{head.path} (centres' state)") \
        if head.state else {}
    bad = nonfinite_entries({"centres": head.weight, "state": state})
    if bad:
        raise ImportFailure(f"{head.path} holds NaN/inf ({describe(bad)}); import an earlier save of the run")
    return {"head": {"weight": head.weight, "_extra_state": {"sampling_rng": None,
                                                             "reseed_step": step}},
            "optim_head": {"weight": state} if state else {}, "shard": (shard.start, shard.num_local)}


def shards(source: SourceRun, num_classes: int, kind: str, config: Config) -> Iterator[dict]:
    if source.format == "backbone":  # fresh centres, as the trainer would draw them
        shard = ClassShard(num_classes, 1, 0)
        weight = init_centres(shard, config.model.embedding_size, config.run.seed)
        yield _shard(source, RankHead(source.backbone_file, weight), 0, num_classes, kind, 0)
        return
    for rank, head in enumerate(source.heads()):
        yield _shard(source, head, rank, num_classes, kind, our_step(config, source))


def data_classes(config: Config) -> int | None:
    """The classes of the config's data (data.num_classes, else its .rec when data.root has
    one), None when neither says."""
    if config.data.num_classes:
        return config.data.num_classes
    if not config.data.root or not (Path(config.data.root) / config.data.rec).is_file():
        return None
    from fr_trainer.train.data_setup import open_dataset

    return open_dataset(config).num_classes


def check_classes(source: SourceRun, num_classes: int, config: Config) -> None:
    """The rank files' classes are the data's: a last rank's file missing leaves no gap."""
    known = data_classes(config)
    if known is not None and known != num_classes:
        raise ImportFailure(f"{source.root}: the {source.world_size} rank files hold {num_classes} classes, the "
                            f"data {known}; copy every rank's file (the run may have had more ranks) or point "
                            "data.root at the run's training set")


# --------------------------------------------------------------------------- the import
def import_run(run_dir: str | Path, out: str | Path, config: Config, batch_size: int | None = None,
               num_classes: int | None = None) -> tuple[Path, list[str]]:
    """Write the checkpoint; returns its folder and the report (what was and was not imported)."""
    check_config(config)
    root = Path(out) / "checkpoints"
    if ckpt.complete_checkpoints(root):
        raise ImportFailure(f"{root} already holds checkpoints; import into a new OUT directory")
    source = read_source(run_dir)
    model, kwargs = build_backbone(config)
    backbone, names = map_backbone(model, source)
    report = [f"source: {source.root} ({source.format} format, {source.world_size} rank(s))",
              f"imported: backbone {config.model.backbone} ({len(backbone)} tensors) from {source.backbone_file}"]
    kind = run_optimizer(source, config)
    optim_backbone = backbone_optimizer(source, kind, model, names) if source.optimizer and kind else {}
    if source.format == "backbone":
        num_classes = num_classes or data_classes(config)
        if not num_classes:
            raise ImportFailure(f"{source.backbone_file} holds the backbone only: give --num-classes N "
                                "(the classes of the data this run will train on) or set data.root")
        report.append(f"not imported: centres (none in {source.root}); {num_classes} drawn as a fresh run would")
    else:
        num_classes, rows = head_rows(source, config)
        check_classes(source, num_classes, config)
        report.append(f"imported: centres [{num_classes}, {config.model.embedding_size}] in class order from "
                      f"{source.world_size} rank files (rows {rows})")
    plan, schedule, lines = plan_and_schedule(config, source, iteration_samples(config, source, batch_size))
    report += lines
    if source.format == "v2" and kind:
        report.append(f"imported: {kind} state of {len(optim_backbone)} of {len(names)} backbone parameters "
                      "and of the centres")
    else:
        report.append("not imported: the backbone's optimizer state (none in this format; it starts at zero)"
                      + ("; the centres' SGD momentum is imported" if kind else ""))
    if source.format in ("pfc", "legacy", "backbone"):
        report.append(f"not imported: step and epoch ({source.format} files save none): the run continues "
                      f"from step 0 with {source.backbone_file.name}; set train.epochs to the epochs left")
    report.append("not imported: the AMP grad scaler and RNG states (arcface_torch does not save them); "
                  "the head's sampling stream is drawn afresh")
    common = {
        "config": to_dict(config), "num_classes": num_classes, "embedding_size": config.model.embedding_size,
        "backbone_name": config.model.backbone, "backbone_kwargs": kwargs, "backbone": backbone,
        "optim_backbone": optim_backbone, "param_groups": param_groups(config, model, source),
        "schedule": schedule, "scaler": None, "data": data_position(config, source.epoch),
        "precision": config.train.precision, "regularizer_name": "", "second_head": None,
        "imported_from": f"arcface_torch:{source.root}",
    }
    if plan is not None:
        common["plan"] = plan
    world = 1 if source.format == "backbone" else source.world_size
    rank_shards = shards(source, num_classes, kind, config)
    folder = ckpt.write_offline(root, our_step(config, source), common, rank_shards, world)
    report.append(f"wrote {folder} (world size {world}; resumes at any world size)")
    (Path(out) / REPORT).write_text("\n".join(report) + "\n")
    return folder, report


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert an arcface_torch run directory into an "
                                "fr_trainer checkpoint that `fr-trainer train` resumes at any world size.")
    p.add_argument("run_dir", help="the arcface_torch output folder (checkpoint_gpu_*.pt, model.pt, ...)")
    p.add_argument("out", help="the fr_trainer run directory to write (OUT/checkpoints/step_*)")
    p.add_argument("--config", required=True, help="the fr_trainer config the run continues with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="their per-GPU batch_size (default: the config's data.batch_size)")
    p.add_argument("--num-classes", type=int, default=None, help="classes, for a backbone-only import")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        _, report = import_run(args.run_dir, args.out, config, args.batch_size, args.num_classes)
    except (ImportFailure, InsightfaceFormatError, ConfigError, ckpt.CheckpointError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print("\n".join(report))
    sets = "".join(f" --set {o}" for o in args.overrides)
    print(f"continue with: fr-trainer train {args.config}{sets} --set checkpoint.resume={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
