"""Check a whole RecordIO training set before (or instead of) finding its bad records hours in.

`check_dataset(root)` returns a `CheckReport`:

- the index against the `.rec` (the `.rec` walked record by record): every offset points at
  the start of a record, no two keys share one, the index lists as many records as the `.rec`
  holds, the `.rec` itself is not cut short or corrupt between records;
- the insightface layout: the header record 0 (the image keys and the class range) and the
  identity records (`[first, end)` image keys per class: in range, in order, covering every
  image);
- every image record, in parallel over index ranges (`workers` processes): its payload reads,
  its label is an integer class in range and the one of its identity record, its image
  decodes (with the trainer's decoder) to `image_size` x `image_size` (0: any size).

`fr-trainer check-data ROOT` (`check_cli.py`) prints it and writes it as JSON.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fr_trainer.data.decode import decode_rgb, decoder_text  # imported before the workers fork
from fr_trainer.data.layout import read_layout
from fr_trainer.data.recordio import RecordIOError, RecordReader, read_index, scan_records, unpack

MAX_LISTED_PROBLEMS = 100  # index/layout problems listed one by one; the rest are counted


@dataclass(frozen=True)
class BadRecord:
    """An image record that training could not use."""

    index: int  # dataset index (what the trainer's errors and data.on_bad=skip logs name)
    key: int
    offset: int
    reason: str


@dataclass
class CheckReport:
    rec: str
    idx: str
    records_in_index: int = 0
    records_in_rec: int | None = None  # None: the .rec could not be walked to its end
    insightface: bool = False
    images: int = 0
    classes: int | None = None
    checked: int = 0
    image_size: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # index and layout problems
    more_problems: int = 0  # problems past MAX_LISTED_PROBLEMS
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(message)
        else:
            self.more_problems += 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        data["bad_count"] = len(self.bad)
        return data


# --------------------------------------------------------------------------- index vs .rec
def _walk(rec: Path, report: CheckReport) -> np.ndarray | None:
    """Offsets of the records of `rec`, ascending (None when the walk stopped at corruption)."""
    starts = array("q")
    try:
        for offset, _ in scan_records(rec):
            starts.append(offset)
    except RecordIOError as error:
        report.problem(f"the .rec is damaged after {len(starts)} records: {error}")
        return None
    report.records_in_rec = len(starts)
    return np.frombuffer(starts, dtype=np.int64)


def check_index(rec: Path, idx: Path, report: CheckReport) -> bool:
    """Index problems into `report`; False when the index cannot be used at all."""
    try:
        keys, offsets = read_index(idx)
    except RecordIOError as error:
        report.problem(str(error))
        return False
    report.records_in_index = len(keys)
    starts = _walk(rec, report)
    size = rec.stat().st_size
    listed = np.fromiter((offsets[key] for key in keys), dtype=np.int64, count=len(keys))
    usable = True
    for row in np.flatnonzero(listed + 8 > size).tolist():
        report.problem(f"{idx}: key {keys[row]} points at offset {listed[row]}, past the end of {rec} ({size} bytes)")
        usable = False
    if starts is not None:
        strays = listed + 8 <= size  # (those past the end are reported above)
        if starts.size:
            slot = np.minimum(np.searchsorted(starts, listed), starts.size - 1)
            strays &= starts[slot] != listed
        for row in np.flatnonzero(strays).tolist():
            report.problem(f"{idx}: key {keys[row]} points at offset {listed[row]}, which is not the start of a record")
    order = np.argsort(listed, kind="stable")
    ordered = listed[order]
    for j in np.flatnonzero(ordered[1:] == ordered[:-1]).tolist():
        a, b = int(order[j]), int(order[j + 1])
        report.problem(f"{idx}: keys {keys[a]} and {keys[b]} both point at offset {listed[a]}")
    if starts is not None and starts.size != len(keys):
        report.problem(f"{idx} lists {len(keys)} records but {rec} holds {starts.size}")
    return usable


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Plan:
    """What every image record is checked against."""

    keys: np.ndarray  # int64 [N] image keys, dataset order
    expected: np.ndarray  # int64 [N] class from the identity records, -1: unknown
    num_classes: int | None  # None: from the labels


def _identity_classes(ranges: np.ndarray, num_images: int, report: CheckReport) -> np.ndarray:
    """Class of every image from the identity ranges; problems when they do not tile 1..N."""
    expected = np.full(num_images, -1, dtype=np.int64)
    position = 1
    for label, (first, end) in enumerate(ranges.tolist()):
        if not (1 <= first <= end <= num_images + 1):
            report.problem(
                f"identity record of class {label}: image keys [{first}, {end}) are outside the "
                f"header's image keys [1, {num_images + 1})"
            )
            continue
        if first != position:
            report.problem(
                f"identity record of class {label} starts at image key {first}, expected {position} "
                "(the identity records leave a gap or overlap)"
            )
        expected[first - 1 : end - 1] = label
        position = end
    if position != num_images + 1:
        report.problem(
            f"the identity records end at image key {position}, the header lists images up to "
            f"key {num_images}"
        )
    return expected


def plan_checks(reader: RecordReader, report: CheckReport) -> _Plan:
    """The image keys and their classes, from the insightface header (or every key)."""
    header, image, skip_zero = None, b"", False
    if 0 in reader:
        try:
            header, image = unpack(reader.read(0))
        except RecordIOError as error:
            report.problem(f"record 0 (the header) does not read: {error}")
            skip_zero = True
    if header is not None and header.flag >= 2 and not image:
        try:
            layout = read_layout(reader)
        except RecordIOError as error:
            report.problem(f"the insightface header/identity records are wrong: {error}")
        else:
            report.insightface = True
            keys = layout.image_keys
            expected = np.full(keys.size, -1, dtype=np.int64)
            if layout.identity_ranges is None:
                report.problem("the header lists identity records that the index does not hold")
            else:
                expected = _identity_classes(layout.identity_ranges, keys.size, report)
            return _Plan(keys, expected, layout.num_classes)
        skip_zero = True
    # without a usable header every other key is checked; records with an array label and no
    # image bytes (identity records) are not images then (see _record_problem)
    keys = np.asarray([key for key in reader.keys if not (skip_zero and key == 0)], dtype=np.int64)
    return _Plan(keys, np.full(keys.size, -1, dtype=np.int64), None)


# --------------------------------------------------------------------------- records
_READER: RecordReader | None = None  # the reader of a worker process (inherited when forked)


def _open_reader(rec: str, idx: str) -> None:
    global _READER  # noqa: PLW0603 - one reader per worker process
    _READER = RecordReader(rec, idx)


def _record_problem(
    reader: RecordReader, key: int, expected: int, num_classes: int | None, image_size: int
) -> tuple[str | None, int]:
    """(what is wrong with image record `key` or None, its label or -1)."""
    try:
        header, data = unpack(reader.read(key))
    except RecordIOError as error:
        return str(error), -1
    if num_classes is None and header.flag >= 2 and not data:
        return None, -1  # an identity record of a file whose header is unusable: not an image
    raw = header.label if np.ndim(header.label) == 0 else np.asarray(header.label).reshape(-1)[0]
    value = float(raw)
    if value != int(value) or value < 0:
        return f"label {value:g} is not a class index (a non-negative integer)", -1
    label = int(value)
    if num_classes is not None and label >= num_classes:
        return f"label {label} is outside [0, {num_classes}) of the header record", -1
    if expected >= 0 and label != expected:
        return f"label {label} but its identity record says class {expected}", -1
    if not data:
        return "no image bytes", label
    try:
        pixels = decode_rgb(data)
    except Exception as error:  # noqa: BLE001 - any decoder failure is the record's problem
        return f"image of {len(data)} bytes does not decode ({type(error).__name__}: {decoder_text(error)})", label
    if image_size and pixels.shape[:2] != (image_size, image_size):
        return f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected {image_size}x{image_size}", label
    return None, label


def _check_chunk(task: tuple) -> tuple[int, list[BadRecord], int]:
    """(records checked, bad records, largest good label) of one index range."""
    start, keys, expected, num_classes, image_size = task
    reader = _READER
    bad: list[BadRecord] = []
    top = -1
    for offset_in_chunk, key in enumerate(keys.tolist()):
        reason, label = _record_problem(reader, key, int(expected[offset_in_chunk]), num_classes, image_size)
        if reason is not None:
            bad.append(BadRecord(start + offset_in_chunk, key, reader.offset(key), reason))
        top = max(top, label)
    return len(keys), bad, top


def _chunks(plan: _Plan, size: int, num_classes: int | None, image_size: int) -> Iterator[tuple]:
    for start in range(0, plan.keys.size, size):
        stop = start + size
        yield start, plan.keys[start:stop], plan.expected[start:stop], num_classes, image_size


class _Progress:
    """tqdm when installed, else a line every few seconds on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self._last = total, enabled, 0, time.monotonic()
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="rec", desc="check-data", dynamic_ncols=True)

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled and (time.monotonic() - self._last > 5 or self.done == self.total):
            self._last = time.monotonic()
            print(f"check-data: {self.done}/{self.total} records", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _map(function: Callable, tasks: list[tuple], workers: int, reader: RecordReader) -> Iterator:
    """`function` over `tasks` in `workers` processes, each reading through `reader` (forked:
    shared with the parent, so a big index is parsed once; spawned: opened again)."""
    global _READER  # noqa: PLW0603 - handed to the forked workers
    _READER = reader
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    if "fork" in multiprocessing.get_all_start_methods():
        pool = multiprocessing.get_context("fork").Pool(workers)
    else:
        args = (str(reader.rec_path), str(reader.idx_path))
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_open_reader, initargs=args)
    with pool:
        yield from pool.imap_unordered(function, tasks)


def check_dataset(
    root: str | os.PathLike,
    rec_name: str = "train.rec",
    *,
    workers: int | None = None,
    image_size: int = 112,
    progress: bool = False,
    chunk_size: int | None = None,
) -> CheckReport:
    """Check `root/rec_name` and its `.idx` (see the module docstring).

    Raises FileNotFoundError (naming the fix) when the root, the .rec or the .idx is missing.
    """
    start = time.perf_counter()
    root = Path(root)
    rec = root / rec_name
    idx = rec.with_suffix(".idx")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the data root (it holds {rec_name})")
    if not rec.is_file():
        present = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise FileNotFoundError(f"{rec} does not exist ({root} holds: {present}); pass --rec NAME")
    if not idx.is_file():
        raise FileNotFoundError(f"{idx} does not exist; rebuild it with `fr-trainer pack --reindex {rec}`")
    report = CheckReport(str(rec), str(idx), image_size=image_size)
    if check_index(rec, idx, report):
        with RecordReader(rec, idx) as reader:
            plan = plan_checks(reader, report)
            _check_records(plan, report, reader, workers, progress, chunk_size)
    report.bad.sort(key=lambda bad: bad.index)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _check_records(
    plan: _Plan,
    report: CheckReport,
    reader: RecordReader,
    workers: int | None,
    progress: bool,
    chunk_size: int | None,
) -> None:
    workers = (os.cpu_count() or 1) if workers is None else workers
    count = int(plan.keys.size)
    size = chunk_size or max(1, min(1024, -(-count // max(1, 8 * workers))))
    tasks = list(_chunks(plan, size, plan.num_classes, report.image_size))
    bar = _Progress(count, progress)
    top = -1
    try:
        for checked, bad, chunk_top in _map(_check_chunk, tasks, workers, reader):
            report.checked += checked
            report.bad.extend(bad)
            top = max(top, chunk_top)
            bar.update(checked)
    finally:
        bar.close()
    report.images = count
    report.classes = plan.num_classes if plan.num_classes is not None else top + 1
