"""Bad training records: one clear error (`BadRecordError`), or skip and count (`BadRecordTally`).

`RecordDataset(on_bad="error")` raises `BadRecordError` for a record that does not decode
(bad magic, truncated, bad header, label out of range, image that does not decode): one line
naming the file, the dataset index, the key, the offset and the fix. A DataLoader worker
re-raises it in the main process as `BadRecordError(worker traceback text)`; the
constructor finds the original line in that text again, so `str(error)` stays one line.

`RecordDataset(on_bad="skip")` replaces the bad item by the next good record (same shapes,
deterministic) and remembers `(index, reason)` in the process that read it. The loader's
collate function (`with_skips`) runs in that same process right after reading a batch: it
takes those notes and ships them with the batch, so notes from DataLoader workers reach the
main process. There `BadRecordTally` logs each bad index once per rank and raises
`TooManyBadRecords` when the bad records met exceed `max_fraction` of the dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from fr_trainer.data.recordio import RecordIOError

LOGGER_NAME = "fr_trainer.train"  # the trainer's logger: train.log and stdout on rank 0
_MARKER = "BadRecordError: "


class BadRecordError(RecordIOError):
    """A record that cannot be trained on; one line naming the record and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(_original_line(str(message), type(self).__name__))


class TooManyBadRecords(BadRecordError):
    """With on_bad="skip": more bad records than `max_bad_fraction` of the data allows."""


def _original_line(message: str, name: str) -> str:
    """Our one-line message, also out of the text a DataLoader worker re-raises with."""
    if "Traceback" not in message:
        return message
    marker = f"{name}: "
    for line in reversed(message.splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return message.strip().splitlines()[-1]


def check_data_hint(rec_path: str | Path) -> str:
    """The command that lists every bad record of `rec_path`."""
    rec = Path(rec_path)
    extra = "" if rec.name == "train.rec" else f" --rec {rec.name}"
    return f"`fr-trainer check-data {rec.parent}{extra}`"


Skip = tuple[int, str]  # (dataset index, reason)


def with_skips(collate: Callable, dataset) -> Callable:
    """A collate function returning `(*collate(items), skips)`: the dataset's bad-record notes
    of this batch (taken in the process that read it)."""
    return _CollateWithSkips(collate, dataset)


class _CollateWithSkips:
    def __init__(self, collate: Callable, dataset) -> None:
        self.collate, self.dataset = collate, dataset

    def __call__(self, items: list):
        return (*self.collate(items), self.dataset.take_skipped())


class BadRecordTally:
    """Bad records one rank has met: logged once per index, counted, and capped.

    num_records: the dataset size; max_fraction: the run stops when the distinct bad records
    met exceed `max_fraction * num_records` (data.max_bad_fraction). A rank meets the records
    of its shard, so over the epochs every rank meets every bad record.
    """

    def __init__(
        self,
        num_records: int,
        max_fraction: float,
        rank: int = 0,
        rec_path: str | Path = "",
        log_path: str | Path | None = None,
    ) -> None:
        self.num_records, self.max_fraction, self.rank = num_records, max_fraction, rank
        self.rec_path = Path(rec_path)
        self.log_path = Path(log_path) if log_path is not None else None
        self.reasons: dict[int, str] = {}  # index -> reason, in the order met
        self.events = 0  # every skip, including a bad record met again in a later epoch
        self.logger = logging.getLogger(LOGGER_NAME)

    @property
    def count(self) -> int:
        return len(self.reasons)

    @property
    def fraction(self) -> float:
        return self.count / max(1, self.num_records)

    def add(self, skips: list[Skip]) -> None:
        """Record the notes of one batch; raises `TooManyBadRecords` past the cap."""
        for index, reason in skips:
            self.events += 1
            index = int(index)
            if index in self.reasons:
                continue
            self.reasons[index] = reason
            self._log(index, reason)
        if skips and self.fraction > self.max_fraction:
            raise TooManyBadRecords(
                f"rank {self.rank}: {self.count} bad record{'s' if self.count != 1 else ''} skipped out of "
                f"{self.num_records} "
                f"({self.fraction:.2%}), more than data.max_bad_fraction={self.max_fraction:g}; the "
                f"data is damaged: list the bad records with {check_data_hint(self.rec_path)} and "
                "repack the data, or raise data.max_bad_fraction"
            )

    def _log(self, index: int, reason: str) -> None:
        self.logger.warning(
            f"rank {self.rank}: skipped bad record {self.count} (data.on_bad=skip): index {index}: "
            f"{reason}"
        )
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps({"index": index, "reason": reason}) + "\n")
