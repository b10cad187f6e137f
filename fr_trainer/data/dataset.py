"""`RecordDataset`: a torch `Dataset` over a `.rec`/`.idx` (insightface layout understood).

Each item is `(image, label)`: image float32 [3,H,W] normalised to `(x/255-0.5)/0.5` (or
uint8 [3,H,W] with `output="uint8"`, normalised later on the device by the loader, or the
encoded bytes with `output="bytes"` for GPU decode: then `(bytes, label, flip, index)`, the
JPEG header checked), label an int64 scalar tensor. The
horizontal flip is a pure function of (seed, epoch, index), so it does not depend on the
number of workers; call `set_epoch` before each epoch's iterator is created.

Bad records (bad magic, truncated, bad header, label out of range, image that does not
decode) raise a `BadRecordError` (one line: the file, the index, the key, the offset and the
fix); with `on_bad="skip"` they are replaced by the next good record (same shapes, the same
replacement on every run) and noted: `skipped` counts them in this process and
`take_skipped()` hands over `(index, reason)` for the loader to ship with the batch (see
`fr_trainer.data.bad_records`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fr_trainer.data.bad_records import BadRecordError, Skip, check_data_hint
from fr_trainer.data.decode import decode_rgb, decoder_text, jpeg_problem, normalize, to_chw_uint8
from fr_trainer.data.layout import RecordLayout, read_labels, read_layout
from fr_trainer.data.recordio import RecordIOError, RecordReader, unpack
from fr_trainer.data.samplers import groups_from_labels

OUTPUTS = ("float", "uint8", "bytes")
ON_BAD = ("error", "skip")
_MASK = (1 << 64) - 1


def _mix(value: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit hash of `value`."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is flipped in `epoch` (probability 1/2, deterministic)."""
    return bool(_mix(_mix(_mix(seed) ^ epoch) ^ index) >> 63)


def default_index_path(rec_path: str | os.PathLike) -> Path:
    return Path(rec_path).with_suffix(".idx")


class RecordDataset(Dataset):
    """Images and labels of a RecordIO file.

    num_classes: taken from the insightface header when present (a given value must agree);
        otherwise from the argument, else max label + 1 (read from the record headers).
    image_size: decoded images are resized to `image_size` x `image_size` when they differ.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike,
        idx_path: str | os.PathLike | None = None,
        *,
        num_classes: int | None = None,
        image_size: int = 112,
        flip: bool = True,
        seed: int = 0,
        output: str = "float",
        on_bad: str = "error",
        max_consecutive_bad: int = 64,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.reader = RecordReader(
            rec_path, idx_path if idx_path is not None else default_index_path(rec_path)
        )
        self.layout: RecordLayout = read_layout(self.reader)
        self.num_classes = self._resolve_classes(num_classes)
        self.image_size, self.flip, self.seed = image_size, flip, seed
        self.output, self.on_bad, self.max_consecutive_bad = output, on_bad, max_consecutive_bad
        self.epoch = 0
        self.skipped = 0  # per process
        self._notes: list[Skip] = []  # (index, reason) not yet taken, per process

    def _resolve_classes(self, num_classes: int | None) -> int:
        found = self.layout.num_classes
        if num_classes is None:
            return found
        if self.layout.insightface and num_classes != found:
            raise ValueError(
                f"num_classes={num_classes} but the header of {self.reader.rec_path} says {found}; "
                f"drop num_classes from the config (it is read from the file)"
            )
        if num_classes < found:
            raise ValueError(
                f"num_classes={num_classes} but {self.reader.rec_path} has labels up to {found - 1}; "
                f"set num_classes >= {found}"
            )
        return num_classes

    @property
    def rec_path(self) -> Path:
        return self.reader.rec_path

    def __len__(self) -> int:
        return self.layout.num_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels(self) -> np.ndarray:
        """Class of every image, int64 [N] (reads only the record headers)."""
        return read_labels(self.reader, self.layout.image_keys)

    def class_groups(self) -> list[np.ndarray]:
        """Dataset indices per identity (from the identity records when present)."""
        ranges = self.layout.identity_ranges
        if ranges is not None:  # image keys are 1..N, dataset index = key - 1
            return [
                np.arange(first - 1, end - 1, dtype=np.int64)
                for first, end in ranges
                if end > first
            ]
        return groups_from_labels(self.labels())

    def _where(self, key: int) -> str:
        return f"{self.reader.rec_path}: key {key} at offset {self.reader.offset(key)}"

    def _label(self, key: int, label: object) -> int:
        value = float(label if np.ndim(label) == 0 else np.asarray(label).reshape(-1)[0])
        if value != int(value) or not 0 <= value < self.num_classes:
            source = "the header record" if self.layout.insightface else "num_classes"
            raise RecordIOError(
                f"{self._where(key)}: label {value:g} is outside [0, {self.num_classes}) (from "
                f"{source}) or not an integer: the record is corrupt"
            )
        return int(value)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index` without skipping: raises `BadRecordError` on a bad record."""
        try:
            return self._load(index)
        except RecordIOError as error:
            raise BadRecordError(self.bad_message(index, error)) from None

    def where(self, index: int) -> str:
        """`FILE: key K at offset O` of image `index`."""
        return self._where(int(self.layout.image_keys[index]))

    def bad_message(self, index: int, error: Exception | str) -> str:
        """The one-line `BadRecordError` message for image `index`: what is wrong, and the fix."""
        return (
            f"bad training record at index {index}: {error}; list every bad record with "
            f"{check_data_hint(self.reader.rec_path)}, or skip them with data.on_bad=skip"
        )

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index`; raises `RecordIOError` (file, key, offset, what is wrong)."""
        key = int(self.layout.image_keys[index])
        payload = self.reader.read(key)  # its errors name the file, the key and the offset
        try:
            header, data = unpack(payload)
        except RecordIOError as error:
            raise RecordIOError(f"{self._where(key)}: {error}") from None
        label = torch.tensor(self._label(key, header.label), dtype=torch.int64)
        flip = self.flip and flip_decision(self.seed, self.epoch, index)
        if self.output == "bytes":  # decoded later on the GPU: check what the header can tell
            problem = jpeg_problem(data)
            if problem is not None:
                raise RecordIOError(f"{self._where(key)}: {problem}")
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return data, label, torch.tensor(flip), torch.tensor(index, dtype=torch.int64)
        try:
            pixels = decode_rgb(data, self.image_size)
        except Exception as error:  # noqa: BLE001 - any decoder failure names the record
            raise RecordIOError(
                f"{self._where(key)}: image of {len(data)} bytes does not decode "
                f"({type(error).__name__}: {decoder_text(error)})"
            ) from None
        image = to_chw_uint8(pixels, flip)
        return (normalize(image) if self.output == "float" else image), label

    def note_skipped(self, index: int, reason: str) -> None:
        """Count a bad record replaced under `on_bad="skip"` (also by the DALI loader)."""
        self.skipped += 1
        self._notes.append((index, reason))

    def take_skipped(self) -> list[Skip]:
        """The `(index, reason)` of the bad records skipped in this process since the last call."""
        notes, self._notes = self._notes, []
        return notes

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for attempt in range(self.max_consecutive_bad):
            current = (index + attempt) % len(self)
            try:
                return self._load(current)
            except RecordIOError as error:
                if self.on_bad == "error":
                    raise BadRecordError(self.bad_message(current, error)) from None
                self.note_skipped(current, str(error))
        raise BadRecordError(
            f"{self.reader.rec_path}: {self.max_consecutive_bad} consecutive bad records from "
            f"index {index}; the file is badly damaged: check it with "
            f"{check_data_hint(self.reader.rec_path)}, re-copy or repack it"
        )
