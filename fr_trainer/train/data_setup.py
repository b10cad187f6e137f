"""The training data of a run: checks before training, the loader, a resumable stream.

`check_data_root` fails early with the fix when the data root or its files are missing;
`open_dataset` opens the RecordIO set (num_classes checked against the file, the
data.on_bad policy); `build_train_data` builds the loader (bad records skipped with
data.on_bad=skip are counted and capped by a `BadRecordTally`);
`BatchStream` yields batches forever, counting (epoch, samples consumed by the whole job)
so that a checkpoint can restart the stream at the next unused sample at any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from fr_trainer.data.bad_records import BadRecordTally
from fr_trainer.data.dali_train import DaliTrainLoader
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.loader import PrefetchLoader, build_loader
from fr_trainer.data.recordio import RecordIOError
from fr_trainer.data.samplers import PKBatchSampler
from fr_trainer.train.config import Config, ConfigError
from fr_trainer.train.dali_setup import build_dali_loader


def check_data_root(config: Config) -> Path:
    """The .rec path; ConfigError naming what is missing and how to get it."""
    if not config.data.root:
        raise ConfigError(
            "data.root is not set; pass --set data.root=DIR (a folder with train.rec/train.idx, "
            "e.g. made by `fr-trainer synth DIR`)"
        )
    root = Path(config.data.root)
    if not root.is_dir():
        raise ConfigError(
            f"data.root={str(root)!r} does not exist; create it with `fr-trainer synth {root}` "
            "or point data.root at your dataset"
        )
    rec = root / config.data.rec
    idx = rec.with_suffix(".idx")
    present = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
    if not rec.is_file():
        missing = [p.name for p in (rec, idx) if not p.is_file()]
        raise ConfigError(
            f"data.root={str(root)!r} has no {' / '.join(missing)} (it holds: {present}); set "
            "data.rec to the .rec file name or pack the data with `fr-trainer pack IMAGE_DIR OUT_DIR`"
        )
    if not idx.is_file():
        raise ConfigError(
            f"data.root={str(root)!r} has {rec.name} but no {idx.name} (it holds: {present}); "
            f"rebuild the index from the .rec with `fr-trainer pack --reindex {rec}`"
        )
    return rec


def open_dataset(config: Config) -> RecordDataset:
    """The training set; ConfigError (what is wrong with the data, and the fix) when it is
    unreadable or its classes contradict data.num_classes."""
    rec = check_data_root(config)
    try:
        return RecordDataset(
            rec,
            num_classes=config.data.num_classes,
            flip=config.data.flip,
            seed=config.run.seed,
            on_bad=config.data.on_bad,
        )
    except RecordIOError as error:
        raise ConfigError(
            f"data.root={config.data.root!r}: {error} (check the whole set with "
            f"`fr-trainer check-data {rec.parent}`)"
        ) from None
    except ValueError as error:  # the given num_classes contradicts the file
        raise ConfigError(f"data.num_classes does not fit the data: {error}") from None


def bad_record_tally(config: Config, dataset: RecordDataset, rank: int) -> BadRecordTally:
    """Counts and logs this rank's skipped records (data.on_bad=skip) into the run dir."""
    return BadRecordTally(
        len(dataset),
        config.data.max_bad_fraction,
        rank,
        dataset.rec_path,
        config.run_dir / f"bad_records.rank{rank}.jsonl",
    )


def build_train_data(
    config: Config, dataset: RecordDataset, rank: int, world_size: int, device: torch.device
) -> PrefetchLoader | DaliTrainLoader:
    batch = config.data.batch_size
    if len(dataset) < batch * world_size:
        raise ConfigError(
            f"{dataset.rec_path} has {len(dataset)} images, fewer than one global batch "
            f"(data.batch_size={batch} x {world_size} ranks); lower data.batch_size"
        )
    batch_sampler = None
    if config.data.sampler == "pk":
        k = config.data.pk_k
        try:
            batch_sampler = PKBatchSampler(
                dataset.class_groups(), batch // k, k, rank, world_size, seed=config.run.seed
            )
        except ValueError as error:
            raise ConfigError(
                f"data.sampler='pk' (P={batch // k} classes x K={k} per rank): {error}; lower "
                "data.batch_size or use data.sampler='random'"
            ) from None
    tally = bad_record_tally(config, dataset, rank)
    if config.data.loader == "dali":
        return build_dali_loader(config, dataset, batch_sampler, rank, world_size, device, tally)
    return build_loader(
        dataset,
        batch_sampler=batch_sampler,
        batch_size=batch,
        rank=rank,
        world_size=world_size,
        seed=config.run.seed,
        num_workers=config.data.num_workers,
        device=device,
        decode=config.data.decode,
        drop_last=True,
        bad_records=tally,
    )


class BatchStream:
    """Endless batches over epochs; `position()` is where the next batch comes from.

    The position is `(epoch, consumed)`: how many entries of the epoch's permutation the
    whole job has used (samples; classes for the P x K sampler). It does not depend on the
    world size, so a job of another size (or per-rank batch) resumes at the next unused
    sample: within that epoch nothing is repeated or skipped.
    """

    def __init__(
        self, loader: PrefetchLoader | DaliTrainLoader, world_size: int, epoch: int = 0, consumed: int = 0
    ) -> None:
        self.loader = loader
        sampler = loader.sampler
        # the P x K batch sampler deals out classes, the DistributedSampler samples
        self.pk = hasattr(sampler, "batches_per_epoch")
        self.batch_size = sampler.p * sampler.k if self.pk else loader.batch_size
        self.units_per_batch = (sampler.p if self.pk else self.batch_size) * world_size
        self.epoch, self.consumed = epoch, consumed
        self._iterator: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a whole epoch (from its start)."""
        sampler = self.loader.sampler
        total = sampler.classes.size if self.pk else sampler.num_samples
        return total // self.units_per_batch

    def _start(self) -> None:
        self.loader.set_epoch(self.epoch, 0, self.consumed)
        self._iterator = iter(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
            batch = next(self._iterator)
        self.consumed += self.units_per_batch
        return batch

    def position(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "unit": "classes" if self.pk else "samples",
            "batch_size": self.batch_size,
            "sampler": "pk" if self.pk else "random",
        }


def consumed_from_position(data: dict, saved_world: int, pk_k: int) -> int:
    """The job-wide entries of the epoch a saved position has used (positions saved before
    they were job-wide counted this rank's batches)."""
    if "consumed" in data:
        return int(data["consumed"])
    batches, batch = int(data["batch_in_epoch"]), int(data["batch_size"])
    per_batch = batch // pk_k if data.get("sampler") == "pk" else batch
    return batches * per_batch * saved_world
