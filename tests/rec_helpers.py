"""Tiny insightface-layout `.rec` files with chosen (possibly corrupt) records, for the
bad-record and check-data tests (no tests here)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image

from fr_trainer.data.recordio import IRHeader, RecordReader, RecordWriter, pack


def jpeg(size: int = 112, color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_rec(root: Path, labels: list[float], images: dict[int, bytes] | None = None,
              classes: list[int] | None = None, name: str = "train") -> Path:
    """`root/<name>.rec/.idx`: image record i (key i + 1) has label `labels[i]` and the JPEG
    `images.get(i, jpeg())`; the header and identity records follow `classes` (default: the
    labels; each class's images must be contiguous)."""
    root.mkdir(parents=True, exist_ok=True)
    images = images or {}
    classes = [int(label) for label in labels] if classes is None else classes
    num_classes = max(classes) + 1
    n = len(labels)
    rec = root / f"{name}.rec"
    with RecordWriter(rec, root / f"{name}.idx") as writer:
        writer.write(0, pack(IRHeader(0, [n + 1, n + 1 + num_classes], 0, 0)))
        for key, label in enumerate(labels, 1):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), images.get(key - 1, jpeg())))
        for c in range(num_classes):
            members = [i + 1 for i, k in enumerate(classes) if k == c]
            writer.write(n + 1 + c, pack(IRHeader(0, [members[0], members[-1] + 1], 0, 0)))
    return rec


def image_offset(rec: Path, index: int) -> int:
    """Offset of image record `index` (key index + 1)."""
    with RecordReader(rec, rec.with_suffix(".idx")) as reader:
        return reader.offset(index + 1)


def corrupt(rec: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of `rec` at `offset`."""
    raw = bytearray(rec.read_bytes())
    raw[offset : offset + len(data)] = data
    rec.write_bytes(bytes(raw))


def shrink_payload(rec: Path, index: int, length: int) -> None:
    """Make image record `index` declare a `length`-byte payload (a bad IRHeader when < 24)."""
    offset = image_offset(rec, index)
    corrupt(rec, offset + 4, struct.pack("<I", length))


def labels_of(classes: int, per_class: int) -> list[float]:
    return [float(c) for c in range(classes) for _ in range(per_class)]
