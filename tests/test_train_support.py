"""Helpers of the training tests (no tests here): a tiny synthetic set, a BN-free backbone,
configs, and the rank functions that `run_ranks` calls (they must be importable)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fr_trainer.backbones.registry import BACKBONES
from fr_trainer.distributed.env import DistributedEnv
from fr_trainer.train.config import config_from_dict

NUM_CLASSES, PER_CLASS = 12, 8


class TinyLinear(nn.Module):
    """[B,3,112,112] -> pool 8x8 -> Linear -> [B, D]; no BatchNorm, so a batch of 2B and two
    batches of B give the same gradient."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.num_features = embedding_size
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.linear = nn.Linear(3 * 64, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(x), 1))


if "test_tinylinear" not in BACKBONES:
    BACKBONES.register("test_tinylinear")(lambda embedding_size=16: TinyLinear(embedding_size))


def make_data(root: Path) -> Path:
    from fr_trainer.data.synthetic import generate

    if not (root / "train.rec").is_file():
        generate(
            root,
            num_identities=NUM_CLASSES,
            images_per_identity=PER_CLASS,
            num_holdout_identities=0,
            num_pairs=0,
            num_ijbc_subjects=0,
            workers=0,
        )
    return root


def config_dict(data_root: Path, out: Path, **sections) -> dict:
    base = {
        "run": {"name": "t", "output_dir": str(out), "seed": 3},
        "data": {"root": str(data_root), "batch_size": 8, "num_workers": 0},
        "model": {"backbone": "test_tinylinear", "embedding_size": 16},
        "head": {"margin": "arcface", "margin_args": {"s": 16.0, "m": 0.3}},
        "optim": {"lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},
        "train": {"max_steps": 8, "device": "cpu", "precision": "fp32", "threads": 1},
        "checkpoint": {"every_steps": 0, "keep_last": 3},
        "log": {"every_steps": 100, "tensorboard": False, "progress": "off"},
        "eval": {"every_steps": 0, "at_end": False},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def make_trainer(rank: int, world_size: int, cfg: dict):
    from fr_trainer.train.trainer import Trainer

    env = DistributedEnv(
        rank, world_size, 0, "gloo" if world_size > 1 else None, torch.device("cpu")
    )
    return Trainer(config_from_dict(cfg), env)


def head_state(trainer) -> dict:
    """This rank's centres and their momentum (CPU copies)."""
    weight = trainer.head.weight
    momentum = trainer.optimizer.state[weight].get("momentum_buffer")
    return {
        "start": trainer.head.shard.start,
        "weight": weight.detach().clone(),
        "momentum": None if momentum is None else momentum.clone(),
    }


# ------------------------------------------------------------------ rank functions
def rank_fit(rank: int, world_size: int, cfg: dict, stop_after: int | None = None) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    result = trainer.fit(stop_after=stop_after)
    return {
        "losses": result["losses"],
        "snapshot": trainer.state_snapshot(),
        "head": head_state(trainer),
        "step": trainer.step,
    }


def rank_load_and_save(rank: int, world_size: int, cfg: dict) -> dict:
    """Build (resuming from cfg's checkpoint.resume), save again in this world size."""
    trainer = make_trainer(rank, world_size, cfg)
    trainer.save()
    return {
        "head": head_state(trainer),
        "step": trainer.step,
        "snapshot": trainer.state_snapshot(),
        "position": trainer.stream.position(),
    }


def make_data_with_pairs(root: Path) -> Path:
    """The tiny training set plus two small `.bin` sets of held-out identities."""
    from fr_trainer.data.synthetic import generate

    if not (root / "train.rec").is_file():
        generate(
            root,
            num_identities=NUM_CLASSES,
            images_per_identity=PER_CLASS,
            num_holdout_identities=6,
            num_pairs=20,
            num_ijbc_subjects=0,
            workers=0,
        )
    return root


def rank_verify(rank: int, world_size: int, cfg: dict) -> dict:
    """Train briefly with verification every 2 steps; return the last verification."""
    trainer = make_trainer(rank, world_size, cfg)
    summary = trainer.fit()
    return {"verification": summary["verification"], "initial": summary["verification_initial"]}


def write_head_checkpoint(folder: Path, heads: list, num_classes: int, step: int) -> None:
    """A checkpoint folder holding only the heads' shards (rank order) and the common
    fields a head reshard reads: what `PartialFC` state tests resume from."""
    from fr_trainer.train import checkpoint as ckpt

    folder.mkdir(parents=True)
    world = len(heads)
    torch.save({"world_size": world, "num_classes": num_classes, "step": step}, folder / ckpt.COMMON)
    for rank, head in enumerate(heads):
        torch.save({"head": head.state_dict(), "optim_head": {}}, folder / ckpt.shard_name(rank, world))
