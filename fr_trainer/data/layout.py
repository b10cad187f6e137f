"""The insightface layout of a `.rec`: which keys are images, how many classes there are.

Record 0 is a header with an array label ``[a, b]`` and no image bytes: image records are keys ``1 .. a-1``;
records ``a .. b-1`` are one per identity, label ``[first, end)`` of its image keys and an
empty payload, so ``num_classes = b - a``. A file without that header uses every key in the
index as an image and its number of classes is read from the labels (max + 1).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fr_trainer.data.recordio import IR_FORMAT, IR_SIZE, RecordIOError, RecordReader, unpack


@dataclass(frozen=True)
class RecordLayout:
    """What a `.rec` holds.

    image_keys: int64 [N], the keys of the image records in order.
    num_classes: number of classes.
    identity_ranges: int64 [C, 2] `[first, end)` image keys per identity, or None when the
        file has no identity records.
    insightface: whether record 0 is an insightface header.
    """

    image_keys: np.ndarray
    num_classes: int
    identity_ranges: np.ndarray | None
    insightface: bool

    @property
    def num_images(self) -> int:
        return int(self.image_keys.size)


def _header_range(reader: RecordReader) -> tuple[int, int] | None:
    """`(a, b)` from an insightface header record 0, or None when there is none."""
    if 0 not in reader:
        return None
    header, image = unpack(reader.read(0))
    if header.flag < 2 or image:  # an image record (it has image bytes), not a header
        return None
    first, end = int(header.label[0]), int(header.label[1])
    if not (1 <= first <= end):
        raise RecordIOError(
            f"{reader.rec_path}: key 0 at offset {reader.offset(0)}: insightface header "
            f"label [{first}, {end}) is not a valid range; the file is corrupt"
        )
    return first, end


def _identity_ranges(reader: RecordReader, first: int, end: int) -> np.ndarray | None:
    ranges = np.zeros((end - first, 2), dtype=np.int64)
    for row, key in enumerate(range(first, end)):
        if key not in reader:
            return None
        header, _ = unpack(reader.read(key))
        if header.flag < 2:
            raise RecordIOError(
                f"{reader.rec_path}: key {key} at offset {reader.offset(key)}: identity record "
                f"without a [first, end) label; the file does not follow the insightface layout"
            )
        ranges[row] = (int(header.label[0]), int(header.label[1]))
    return ranges


def read_label(reader: RecordReader, key: int) -> int:
    """The class of image record `key`, reading only its header bytes (fast)."""
    offset = reader.offset(key)
    head = reader._pread(8 + IR_SIZE + 4, offset)
    if len(head) < 8 + IR_SIZE:
        payload = reader.read(key)  # raises a precise error
        head = b"\0" * 8 + payload
    flag, label = struct.unpack_from(IR_FORMAT, head, 8)[:2]
    if flag > 0:
        label = struct.unpack_from("<f", head, 8 + IR_SIZE)[0] if len(head) >= 36 else None
        if label is None:
            header, _ = unpack(reader.read(key))
            label = float(header.label[0])
    value = float(label)
    if value != int(value) or value < 0:
        raise RecordIOError(
            f"{reader.rec_path}: key {key} at offset {offset}: label {value} is not a class "
            f"index (a non-negative integer)"
        )
    return int(value)


def read_labels(reader: RecordReader, keys: np.ndarray) -> np.ndarray:
    """Classes of the image records `keys` [N] -> int64 [N], from their headers only."""
    return np.fromiter(
        (read_label(reader, int(key)) for key in keys), dtype=np.int64, count=len(keys)
    )


def read_layout(reader: RecordReader) -> RecordLayout:
    """Recognise the insightface layout, else treat every indexed key as an image."""
    header = _header_range(reader)
    if header is None:
        keys = np.asarray(reader.keys, dtype=np.int64)
        labels = read_labels(reader, keys)
        num_classes = int(labels.max()) + 1 if labels.size else 0
        return RecordLayout(keys, num_classes, None, insightface=False)
    first, end = header
    keys = np.arange(1, first, dtype=np.int64)
    missing = [int(key) for key in keys[:10] if int(key) not in reader]
    if missing or (keys.size and int(keys[-1]) not in reader):
        raise RecordIOError(
            f"{reader.idx_path}: the insightface header of {reader.rec_path} lists image keys "
            f"1..{first - 1} but the index lacks some (e.g. {missing or [int(keys[-1])]}); "
            f"the index belongs to another file"
        )
    ranges = _identity_ranges(reader, first, end)
    return RecordLayout(keys, end - first, ranges, insightface=True)


def describe(
    rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
) -> RecordLayout:
    """Layout of a `.rec` (number of images and classes) for configs: no need to type them.

    >>> layout = describe("ms1mv3/train.rec"); layout.num_images, layout.num_classes
    """
    rec = Path(rec_path)
    with RecordReader(rec, idx_path if idx_path is not None else rec.with_suffix(".idx")) as reader:
        return read_layout(reader)
