"""The trainer's DALI loader: the torch path's order and flips, decoded by DALI.

`DaliTrainLoader` takes the same `RecordDataset` and sampler as `build_loader`
(`DistributedSampler`, or a `PKBatchSampler`). Per batch it reads the sampler's indices
from the dataset in "bytes" mode (encoded image + label + the flip flag drawn from
(seed, epoch, index)) and feeds them to a DALI pipeline through `fn.external_source`; DALI
decodes (`mixed`, i.e. nvJPEG, on CUDA; libjpeg-turbo on the CPU), resizes images not
already `image_size` square (DALI's linear resampling, not Pillow's: only same-size images
match the torch path within JPEG tolerance), and `crop_mirror_normalize`s with `mirror` = the dataset's flip
flags and `(x - 127.5) / 127.5` (= `decode.normalize`). So the order (the global epoch
permutation dealt out by rank), the flips, the ragged end of an epoch and the resume
position (`set_epoch(epoch, position, start)`) are the torch path's, by construction.
Up to `prefetch` batches are decoded ahead, in the loader's own thread, while the caller
trains.

Bad records: what the dataset itself rejects (bad magic, truncated record, label out of
range) follows `dataset.on_bad` exactly as on the torch path (the items are read with
`dataset[index]`). An image that DALI cannot decode invalidates the pipeline; the loader
rebuilds it, finds the culprit(s) among the in-flight batches (`find_undecodable`: the
records Pillow cannot decode either), and hands them to `resolve_bad`, the one place a
policy acts: `on_bad="error"` raises a `BadRecordError` naming the file, key, offset and
the fix; `on_bad="skip"` replaces each by the next good record (as the torch path does)
and notes it for the run's `BadRecordTally` (logged once, capped by data.max_bad_fraction).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from fr_trainer.data.bad_records import BadRecordError, BadRecordTally
from fr_trainer.data.dali import normalize_faces
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.decode import decode_rgb
from fr_trainer.data.recordio import RecordIOError


class DaliUnavailable(ImportError):
    """NVIDIA DALI (the `dali` extra) is not installed."""


def import_dali():
    """(fn, types, pipeline_def, feed_ndarray); `DaliUnavailable` naming the fix."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import pipeline_def
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as error:
        raise DaliUnavailable(
            f"data.loader='dali' needs NVIDIA DALI, which is not importable ({error}); "
            "pip install 'fr_trainer[dali]' (nvidia-dali-cuda130), or set data.loader=torch"
        ) from None
    return fn, types, pipeline_def, feed_ndarray


@dataclass
class Item:
    """One sample as fed to DALI: dataset index, encoded bytes, label, flip flag."""

    index: int
    data: np.ndarray  # uint8 [n]
    label: int
    flip: bool


def read_item(dataset: RecordDataset, index: int) -> Item:
    # on_bad of the dataset applies to record errors; `used` is the record actually read
    data, label, flip, used = dataset[index]
    return Item(int(used), data.numpy(), int(label), bool(flip))


def find_undecodable(items: list[Item]) -> list[int]:
    """Positions of the items whose bytes Pillow cannot decode either."""
    bad = []
    for position, item in enumerate(items):
        try:
            decode_rgb(item.data.tobytes())
        except Exception:  # noqa: BLE001 - any decoder failure marks the record
            bad.append(position)
    return bad


def _where(dataset: RecordDataset, index: int) -> str:
    key = int(dataset.layout.image_keys[index])
    return f"{dataset.rec_path}: key {key} at offset {dataset.reader.offset(key)}"


def resolve_bad(dataset: RecordDataset, items: list[Item], bad: list[int], error: str) -> list[Item]:
    """The batch with its undecodable items dealt with by `dataset.on_bad`: "error" raises
    one `BadRecordError` naming the (first) record and the fix; "skip" replaces each by the
    next record that reads and decodes (index + 1, + 2, ...), like `RecordDataset` does,
    and notes it for the run's `BadRecordTally` (logged, capped by data.max_bad_fraction)."""
    if dataset.on_bad == "error":
        item = items[bad[0]]
        more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        raise BadRecordError(
            f"{_where(dataset, item.index)}{more}: image of {item.data.size} bytes does not "
            f"decode in DALI ({error}); repack the data (`fr-trainer pack`), or skip bad records "
            "(data.on_bad='skip')"
        )
    fixed = list(items)
    for position in bad:
        index = items[position].index
        for attempt in range(1, dataset.max_consecutive_bad + 1):
            dataset.note_skipped((index + attempt - 1) % len(dataset), "image does not decode in DALI")
            candidate = read_item(dataset, (index + attempt) % len(dataset))
            if not find_undecodable([candidate]):
                fixed[position] = candidate
                break
        else:
            raise BadRecordError(
                f"{dataset.rec_path}: {dataset.max_consecutive_bad} consecutive bad records from "
                f"index {index}; the file is badly damaged, re-copy or repack it"
            )
    return fixed


class DaliTrainLoader:
    """Batches `(images float32 [B,3,S,S], labels int64 [B])` on `device`, decoded by DALI,
    in the order of `sampler` (a `DistributedSampler`, with `batch_size`), or of
    `batch_sampler` (lists of indices, e.g. `PKBatchSampler`). The interface the trainer's
    `BatchStream` uses: `sampler`, `dataset`, `batch_size`, `set_epoch`, `__len__`, `__iter__`.
    """

    def __init__(
        self,
        dataset: RecordDataset,
        *,
        batch_size: int,
        sampler=None,
        batch_sampler=None,
        device: str | torch.device = "cpu",
        num_threads: int = 2,
        drop_last: bool = True,
        prefetch: int = 2,
        seed: int = 0,
        bad_records: BadRecordTally | None = None,
    ) -> None:
        self.bad_records = bad_records  # counts the records skipped with on_bad="skip"
        if (sampler is None) == (batch_sampler is None):
            raise ValueError("give exactly one of sampler and batch_sampler")
        if num_threads < 1 or prefetch < 1:
            raise ValueError(f"num_threads and prefetch must be >= 1, got {num_threads}, {prefetch}")
        self._fn, self._types, self._pipeline_def, self._copy = import_dali()
        dataset.output = "bytes"
        self._dataset, self._sampler, self._batch_sampler = dataset, sampler, batch_sampler
        self.device = torch.device(device)
        self._batch_size = batch_sampler.p * batch_sampler.k if batch_sampler is not None else batch_size
        self.num_threads, self.drop_last, self.prefetch, self.seed = num_threads, drop_last, prefetch, seed
        self._pipeline = None  # built on first use, kept across epochs
        self._side_stream = None
        self._thread: ThreadPoolExecutor | None = None  # of the running iteration
        self._pending: deque = deque()

    # ------------------------------------------------------------------ interface
    @property
    def dataset(self) -> RecordDataset:
        return self._dataset

    @property
    def sampler(self):
        """The resumable sampler: the batch sampler when given, else the DistributedSampler."""
        return self._batch_sampler if self._batch_sampler is not None else self._sampler

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def set_epoch(self, epoch: int, position: int = 0, start: int = 0) -> None:
        """As `PrefetchLoader.set_epoch`: reshuffle, re-draw flips, resume from `start`."""
        self.sampler.set_epoch(epoch, position, start)
        self._dataset.set_epoch(epoch)

    def __len__(self) -> int:
        if self._batch_sampler is not None:
            return len(self._batch_sampler)
        count = len(self._sampler)
        return count // self._batch_size if self.drop_last else -(-count // self._batch_size)

    def index_batches(self) -> Iterator[list[int]]:
        """This rank's batches of dataset indices for the rest of the epoch."""
        if self._batch_sampler is not None:
            yield from (list(batch) for batch in self._batch_sampler)
            return
        indices = list(self._sampler)
        stop = len(self) * self._batch_size
        for first in range(0, min(stop, len(indices)), self._batch_size):
            yield indices[first : first + self._batch_size]

    # ------------------------------------------------------------------ pipeline
    def _gpu(self) -> bool:
        return self.device.type == "cuda"

    def _build(self):
        """A synchronous pipeline (run in the loader's own thread, `prefetch` batches ahead):
        DALI's asynchronous executor costs ~10% more CPU per image for the same overlap."""
        fn, types = self._fn, self._types
        size, gpu = self._dataset.image_size, self._gpu()
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()

        @self._pipeline_def(
            batch_size=self._batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=self.seed,
            exec_async=False,
            exec_pipelined=False,
            enable_conditionals=True,
        )
        def train_pipeline():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            flips = fn.external_source(name="flips", dtype=types.INT32)
            shape = fn.peek_image_shape(jpegs)  # H, W, C from the header
            decoded = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            # resizing costs twice the decode even at the same size: only where it is needed
            if (shape[0] == size) & (shape[1] == size):
                images = decoded
            else:
                images = fn.resize(decoded, resize_x=size, resize_y=size)
            return normalize_faces(fn, types, images, flips)

        pipeline = train_pipeline()
        pipeline.build()
        return pipeline

    def _decode(self, items: list[Item]) -> torch.Tensor:
        """Decode one batch (in the loader thread): images float32 [B,3,S,S] on the device."""
        pipeline = self._pipeline
        pipeline.feed_input("jpegs", [item.data for item in items])
        pipeline.feed_input("flips", np.array([int(item.flip) for item in items], dtype=np.int32))
        (images,) = pipeline.run()
        tensor = images.as_tensor()
        if not self._gpu():
            out = torch.empty(tuple(tensor.shape()), dtype=torch.float32)
            self._copy(tensor, out)
            return out
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._side_stream):
            out = torch.empty(tuple(tensor.shape()), dtype=torch.float32, device=self.device)
            self._copy(tensor, out, cuda_stream=self._side_stream)
        self._side_stream.synchronize()
        return out

    def _recover(self, pending: deque, error: Exception) -> None:
        """The pipeline failed on one of the `pending` batches (DALI invalidates it): once
        the loader thread is idle, resolve the undecodable records by the policy on a fresh
        pipeline and decode the pending batches again."""
        wait([future for _, future in pending])
        self._pipeline = self._build()
        message = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = next((line for line in message if "failure" in line or "rror" in line), message[-1])
        found = False
        for position, (items, _) in enumerate(pending):
            bad = find_undecodable(items)
            if bad:
                found = True
                pending[position] = (resolve_bad(self._dataset, items, bad, detail), None)
        if not found:
            raise RecordIOError(
                f"DALI failed on a batch of {self._dataset.rec_path} whose images all decode with "
                f"Pillow (first record {_where(self._dataset, pending[0][0][0].index)}): {detail}; "
                "use data.loader=torch"
            ) from error
        for position, (items, _) in enumerate(pending):
            pending[position] = (items, self._thread.submit(self._decode, items))

    def _stop(self) -> None:
        """End the running iteration's work (its decodes finish or are cancelled)."""
        if self._thread is not None:
            for _, future in self._pending:
                future.cancel()
            self._thread.shutdown(wait=True)
            self._thread = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._stop()  # an earlier iterator not yet collected: it ends here
        if self._pipeline is None:
            self._pipeline = self._build()
        batches = self.index_batches()
        pending: deque[tuple[list[Item], Future]] = deque()
        thread = ThreadPoolExecutor(1, thread_name_prefix="fr_trainer_dali")
        self._thread, self._pending = thread, pending

        def submit(indices: list[int]) -> None:
            items = [read_item(self._dataset, index) for index in indices]
            pending.append((items, thread.submit(self._decode, items)))

        try:
            for indices in islice(batches, self.prefetch):
                submit(indices)
            while pending and self._thread is thread:
                items, future = pending[0]
                try:
                    images = future.result()
                except RuntimeError as error:
                    self._recover(pending, error)
                    continue
                pending.popleft()
                indices = next(batches, None)
                if indices is not None:
                    submit(indices)
                labels = torch.tensor([item.label for item in items], dtype=torch.int64)
                if self._gpu():
                    images.record_stream(torch.cuda.current_stream(self.device))
                    labels = labels.to(self.device, non_blocking=True)
                skips = self._dataset.take_skipped()
                if skips and self.bad_records is not None:
                    self.bad_records.add(skips)
                yield images, labels
            if pending:
                raise RuntimeError(
                    "this DaliTrainLoader iterator was ended by a newer iter() of the same loader "
                    "(one iteration at a time); iterate the newer one"
                )
        finally:  # also when the caller stops early: nothing is left running
            if self._thread is thread:
                self._stop()
