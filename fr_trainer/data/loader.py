"""A prefetching loader over `RecordDataset`: workers decode, the device normalises.

`build_loader(dataset, batch_size=..., rank=..., world_size=...)` returns a
`PrefetchLoader` yielding `(images float32 [B,3,H,W], labels int64 [B])` on `device`:

- decode="pil": DataLoader workers decode with Pillow and flip; uint8 batches are pinned,
  copied (on CUDA, one batch ahead on a side stream) and normalised on the device.
- decode="gpu": workers only read bytes (and check the JPEG header); the main process decodes
  batches with torchvision's nvJPEG (`vision` extra), flips and normalises on the GPU. A batch
  nvJPEG refuses is decoded again on the CPU to find the bad image: the record's error
  (dataset.on_bad="error"), or (on_bad="skip") it is replaced by the next good image of the batch.
- decode="auto": "gpu" when torchvision and CUDA are present, else "pil".

Every batch also carries the dataset's bad-record notes (`on_bad="skip"`, see
`fr_trainer.data.bad_records`); the loader hands them to its `BadRecordTally` (if any)
and yields only `(images, labels)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from fr_trainer.data.bad_records import BadRecordError, BadRecordTally, with_skips
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.decode import decode_jpeg_batch_gpu, gpu_decode_available, normalize, undecodable
from fr_trainer.data.samplers import DistributedSampler


def _collate_bytes(items: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    datas, labels, flips, indices = zip(*items)
    return list(datas), torch.stack(labels), torch.stack(flips), torch.stack(indices)


class PrefetchLoader:
    """Iterates a DataLoader and delivers normalised batches on `device` one batch ahead."""

    def __init__(
        self,
        loader: DataLoader,
        device: torch.device,
        decode: str,
        image_size: int,
        bad_records: BadRecordTally | None = None,
    ) -> None:
        self.loader, self.device, self.decode, self.image_size = loader, device, decode, image_size
        self.bad_records = bad_records

    @property
    def dataset(self) -> RecordDataset:
        return self.loader.dataset

    @property
    def batch_size(self) -> int | None:
        """Samples per batch (None with a batch sampler: see its P x K)."""
        return self.loader.batch_size

    @property
    def sampler(self) -> Sampler:
        """The resumable sampler: the PK batch sampler, else the DistributedSampler."""
        batch_sampler = self.loader.batch_sampler
        return batch_sampler if hasattr(batch_sampler, "set_epoch") else self.loader.sampler

    def set_epoch(self, epoch: int, position: int = 0, start: int = 0) -> None:
        """Reshuffle (sampler) and re-draw flips (dataset); deal out the epoch from global
        entry `start` on (what the job consumed before: samples for the DistributedSampler,
        classes for the PK sampler) and skip `position` of this rank's share (samples, or
        batches for the PK sampler)."""
        self.sampler.set_epoch(epoch, position, start)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _batches(self) -> Iterator[tuple]:
        """The DataLoader's batches without their bad-record notes (given to the tally)."""
        for *batch, skips in self.loader:
            if skips and self.bad_records is not None:
                self.bad_records.add(skips)
            yield batch

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        if self.decode == "gpu":
            images, labels, flips = self._decode_gpu(*batch)
            flips = flips.to(self.device, non_blocking=non_blocking)
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        else:
            images, labels = batch
            images = images.to(self.device, non_blocking=non_blocking)
        return normalize(images), labels.to(self.device, non_blocking=non_blocking)

    def _decode_gpu(
        self, datas: list[torch.Tensor], labels: torch.Tensor, flips: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """nvJPEG decode; a refused batch is searched for its bad images (see the module doc)."""
        try:
            return decode_jpeg_batch_gpu(datas, self.device, self.image_size), labels, flips
        except Exception:
            bad = undecodable(datas)
            if not bad:  # every image decodes on the CPU: not a data problem
                raise
        dataset = self.dataset
        notes = [(int(indices[p]), f"{dataset.where(int(indices[p]))}: {reason}") for p, reason in bad]
        broken = {p for p, _ in bad}
        if dataset.on_bad == "error" or len(broken) == len(datas):
            index, reason = notes[0]
            raise BadRecordError(dataset.bad_message(index, reason))
        if self.bad_records is not None:
            self.bad_records.add(notes)
        size = len(datas)
        order = [next((p + s) % size for s in range(size) if (p + s) % size not in broken) for p in range(size)]
        datas = [datas[p] for p in order]
        return decode_jpeg_batch_gpu(datas, self.device, self.image_size), labels[order], flips[order]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for batch in self._batches():
                yield self._to_device(batch)
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self._batches():
            with torch.cuda.stream(stream):
                ready = self._to_device(batch)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for tensor in ready:
                tensor.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending


def build_loader(
    dataset: RecordDataset,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    decode: str = "auto",
    drop_last: bool = True,
    batch_sampler: Sampler | None = None,
    prefetch_factor: int = 4,
    bad_records: BadRecordTally | None = None,
) -> PrefetchLoader:
    """A `PrefetchLoader` over `dataset` with a `DistributedSampler(rank, world_size, seed)`
    (or the given `batch_sampler`, e.g. a `PKBatchSampler`). Sets `dataset.output`.
    `bad_records` counts and caps the records skipped with `dataset.on_bad="skip"`."""
    device = torch.device(device)
    if decode == "auto":
        decode = "gpu" if device.type == "cuda" and gpu_decode_available() else "pil"
    if decode not in ("pil", "gpu"):
        raise ValueError(f"decode must be 'auto', 'pil' or 'gpu', got {decode!r}")
    if decode == "gpu" and device.type != "cuda":
        raise ValueError("decode='gpu' needs a CUDA device; use decode='pil' on CPU")
    dataset.output = "bytes" if decode == "gpu" else "uint8"
    kwargs = {
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda",
        "collate_fn": with_skips(_collate_bytes if decode == "gpu" else default_collate, dataset),
    }
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    if batch_sampler is not None:
        loader = DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    else:
        sampler = DistributedSampler(len(dataset), rank, world_size, seed=seed, drop_last=drop_last)
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs
        )
    return PrefetchLoader(loader, device, decode, dataset.image_size, bad_records)
