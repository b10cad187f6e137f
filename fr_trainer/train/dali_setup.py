"""`data.loader = "dali"`: the trainer's DALI loader over the torch path's sampler."""

from __future__ import annotations

import torch

from fr_trainer.data.bad_records import BadRecordTally
from fr_trainer.data.dali_train import DaliTrainLoader, DaliUnavailable
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.samplers import DistributedSampler
from fr_trainer.train.config import Config, ConfigError


def build_dali_loader(
    config: Config,
    dataset: RecordDataset,
    batch_sampler,
    rank: int,
    world_size: int,
    device: torch.device,
    bad_records: BadRecordTally | None = None,
) -> DaliTrainLoader:
    """A `DaliTrainLoader` dealing out exactly what `build_loader` would (same sampler, seed,
    drop_last); a ConfigError naming the fix when DALI is not installed."""
    sampler = None
    if batch_sampler is None:
        sampler = DistributedSampler(len(dataset), rank, world_size, seed=config.run.seed, drop_last=True)
    try:
        return DaliTrainLoader(
            dataset,
            batch_size=config.data.batch_size,
            sampler=sampler,
            batch_sampler=batch_sampler,
            device=device,
            num_threads=config.data.dali_threads,
            drop_last=True,
            seed=config.run.seed,
            bad_records=bad_records,
        )
    except DaliUnavailable as error:
        raise ConfigError(str(error)) from None
