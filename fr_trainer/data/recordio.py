"""MXNet RecordIO, byte for byte: `RecordWriter`, `RecordReader`, `IRHeader`, `pack`, `unpack`.

On-disk record (see FORMATS.md)::

    magic 0xCED7230A (LE bytes 0a 23 d7 ce) | lrec uint32 LE = cflag << 29 | length
    | payload[length] | zero padding to a multiple of 4

A payload that holds the magic at an offset that is a multiple of 4 is split there: the
magic is dropped and the parts are written with cflag 1 (first), 2 (middle), 3 (last);
an unsplit record has cflag 0. The reader joins the parts and puts the magic back.

The `.idx` file is text, one ``key<TAB>offset`` line per record, the offset pointing at
the record's (first part's) magic.

Payload header (`pack`/`unpack`): struct ``<IfQQ`` = flag, label, id, id2. With an array
label, ``flag`` is its length, the header's label field is 0 and ``flag`` float32 values
follow the header; then the image bytes.

`RecordReader` opens its file lazily in each process (it tracks ``os.getpid()``), so one
reader can be built in the parent and used in forked or spawned DataLoader workers.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_LENGTH = (1 << 29) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24

Label = Union[float, np.ndarray, Sequence[float]]  # noqa: UP007 - runtime alias
PathLike = Union[str, os.PathLike]  # noqa: UP007


class RecordIOError(ValueError):
    """A malformed `.rec`/`.idx`; the message names the file, the key, the offset and the fix."""


REINDEX_FIX = "if the .rec is intact, rebuild the index with `fr-trainer pack --reindex REC`"


class IRHeader(NamedTuple):
    """Payload header: `flag` (0, or the number of float32 labels), `label`, `id`, `id2`."""

    flag: int
    label: Label
    id: int
    id2: int


def pack(header: IRHeader, image: bytes = b"") -> bytes:
    """Header (+ array label) + image bytes, as MXNet's `recordio.pack`.

    A scalar label forces `flag = 0`; an array label of n values sets `flag = n` and
    stores the values after the header (header label field 0).
    """
    _, label, key, key2 = header  # the flag follows from the label
    if isinstance(label, (int, float, np.integer, np.floating)):
        head = struct.pack(IR_FORMAT, 0, float(label), int(key), int(key2))
        return head + bytes(image)
    values = np.asarray(label, dtype="<f4").reshape(-1)
    head = struct.pack(IR_FORMAT, values.size, 0.0, int(key), int(key2))
    return head + values.tobytes() + bytes(image)


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Inverse of `pack`: `(IRHeader, image_bytes)`; an array label comes back as float32 [flag]."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(
            f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader"
        )
    flag, label, key, key2 = struct.unpack_from(IR_FORMAT, payload, 0)
    body = memoryview(payload)[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(
                f"IRHeader says {flag} float32 labels but only {len(body)} bytes follow it"
            )
        label = np.frombuffer(body[: 4 * flag], dtype="<f4").copy()
        body = body[4 * flag :]
    return IRHeader(flag, label, key, key2), bytes(body)


def _lrec(cflag: int, length: int) -> bytes:
    return MAGIC_BYTES + struct.pack("<I", (cflag << 29) | length)


def encode_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record (parts split at 4-aligned magics, zero-padded)."""
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds the 2^29-1 byte limit")
    payload = bytes(payload)
    cuts: list[int] = []
    position = payload.find(MAGIC_BYTES)
    while position >= 0:
        if position % 4 == 0:
            cuts.append(position)
            position = payload.find(MAGIC_BYTES, position + 4)
        else:
            position = payload.find(MAGIC_BYTES, position + 1)
    pieces: list[bytes] = []
    start = 0
    for index, cut in enumerate(cuts):
        pieces += [_lrec(1 if index == 0 else 2, cut - start), payload[start:cut]]
        start = cut + 4
    pieces += [_lrec(3 if cuts else 0, len(payload) - start), payload[start:]]
    pieces.append(b"\0" * (-len(payload) % 4))
    return b"".join(pieces)


class RecordWriter:
    """Appends records to `rec_path` and their offsets to `idx_path`.

    >>> with RecordWriter("train.rec", "train.idx") as writer:
    ...     writer.write(0, pack(IRHeader(0, 3.0, 0, 0), jpeg_bytes))
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec = open(self.rec_path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._idx = open(self.idx_path, "w") if self.idx_path is not None else None  # noqa: SIM115
        self._keys: set[int] = set()
        self._offset = 0

    def tell(self) -> int:
        """Offset of the next record."""
        return self._offset

    def write(self, key: int, payload: bytes) -> int:
        """Write one record under integer `key`; returns its offset."""
        if self._rec.closed:
            raise ValueError(f"{self.rec_path}: write after close")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice; keys must be unique")
        self._keys.add(key)
        data = encode_record(payload)
        offset = self._offset
        self._rec.write(data)
        self._offset += len(data)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> RecordWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_index(idx_path: PathLike) -> tuple[list[int], dict[int, int]]:
    """Parse a `.idx`: (keys in file order, key -> offset). Errors name the line and the fix."""
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(idx_path) as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = int(fields[0]), int(fields[1])
                if len(fields) != 2 or offset < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise RecordIOError(
                    f"{idx_path}:{line_number}: expected 'key<TAB>offset', got {line.strip()!r}; "
                    + REINDEX_FIX
                ) from None
            if key in offsets:
                raise RecordIOError(
                    f"{idx_path}:{line_number}: key {key} is listed twice; " + REINDEX_FIX
                )
            keys.append(key)
            offsets[key] = offset
    return keys, offsets


@dataclass(frozen=True)
class _Where:
    path: Path
    key: int | None
    offset: int

    def __str__(self) -> str:
        key = "" if self.key is None else f" key {self.key}"
        return f"{self.path}:{key} at offset {self.offset}"


class RecordReader:
    """Random access to the records of `rec_path` through `idx_path`.

    `.keys` (file order), `len()`, `.read(key) -> payload bytes`, `.offset(key)`. The file
    is opened lazily per process, so a reader can cross `fork` and be pickled to workers.
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        for path, what in ((self.rec_path, "record file"), (self.idx_path, "index")):
            if not path.is_file():
                raise FileNotFoundError(f"{what} {path} does not exist")
        self.file_size = self.rec_path.stat().st_size
        self.keys, self._offsets = read_index(self.idx_path)
        self._check_offsets()
        self._span = self._spans()
        self._fd: int | None = None
        self._pid: int | None = None

    def _check_offsets(self) -> None:
        for key in self.keys:
            offset = self._offsets[key]
            if offset + 8 > self.file_size:
                raise RecordIOError(
                    f"{self.idx_path}: key {key} points at offset {offset}, past the end of "
                    f"{self.rec_path} ({self.file_size} bytes): the index belongs to another or "
                    f"a truncated file; " + REINDEX_FIX
                )

    def _spans(self) -> dict[int, int]:
        """Bytes from each record's offset to the next listed offset (or the file end)."""
        order = sorted(self._offsets.items(), key=lambda item: item[1])
        ends = [offset for _, offset in order[1:]] + [self.file_size]
        # Capped: an index that skips records (e.g. DALI's image-only one) leaves big gaps;
        # read_at fetches whatever more a record needs.
        return {key: min(max(end - offset, 8), 1 << 20) for (key, offset), end in zip(order, ends)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._offsets

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys)

    def offset(self, key: int) -> int:
        try:
            return self._offsets[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no key {key} in the index") from None

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._handle(), size, offset)

    def read(self, key: int) -> bytes:
        """The payload of record `key` (parts joined, magic restored between them)."""
        offset = self.offset(key)
        return self.read_at(offset, key=key, span=self._span[key])

    def read_at(self, offset: int, *, key: int | None = None, span: int = 4096) -> bytes:
        """The payload of the record whose magic is at `offset`."""
        where = _Where(self.rec_path, key, offset)
        buffer = self._pread(span, offset)
        parts: list[bytes] = []
        position = 0  # within buffer
        while True:
            if position + 8 > len(buffer):
                buffer += self._pread(position + 8 - len(buffer), offset + len(buffer))
            if position + 8 > len(buffer):
                raise RecordIOError(
                    f"{where}: truncated record: the file ends inside a record header at "
                    f"offset {offset + position}; the .rec was cut short, re-copy it"
                )
            magic, lrec = struct.unpack_from("<II", buffer, position)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{where}: bad magic 0x{magic:08x} at offset {offset + position} (expected "
                    f"0x{MAGIC:08x}): the index does not match the .rec or the file is corrupt; "
                    + REINDEX_FIX
                )
            cflag, length = lrec >> 29, lrec & MAX_LENGTH
            start = position + 8
            stop = start + length
            if stop > len(buffer):
                buffer += self._pread(stop + 3 - len(buffer), offset + len(buffer))
            if stop > len(buffer):
                raise RecordIOError(
                    f"{where}: truncated record: it declares {length} bytes at offset "
                    f"{offset + start} but the file ends at {self.file_size}; the .rec was cut "
                    f"short, re-copy it"
                )
            parts.append(buffer[start:stop])
            if cflag in (0, 3):
                if cflag == 3 and len(parts) == 1:
                    raise RecordIOError(f"{where}: record starts with a last-part flag (cflag 3)")
                return MAGIC_BYTES.join(parts)
            if cflag == 2 and len(parts) == 1:
                raise RecordIOError(f"{where}: record starts with a middle-part flag (cflag 2)")
            position = stop + (-length % 4)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - never raise from a finaliser
            pass

    def __enter__(self) -> RecordReader:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def scan_records(rec_path: PathLike) -> Iterator[tuple[int, int]]:
    """Walk a `.rec` from the start: yields `(offset, total_bytes)` of every record."""
    path = Path(rec_path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset < size:
            start = offset
            while True:
                handle.seek(offset)
                head = handle.read(8)
                if len(head) < 8:
                    raise RecordIOError(f"{path}: truncated record header at offset {offset}")
                magic, lrec = struct.unpack("<II", head)
                if magic != MAGIC:
                    raise RecordIOError(
                        f"{path}: bad magic 0x{magic:08x} at offset {offset}; the file is corrupt"
                    )
                length = lrec & MAX_LENGTH
                offset += 8 + length + (-length % 4)
                if offset > size:
                    raise RecordIOError(
                        f"{path}: truncated record at offset {start}: declares {length} bytes "
                        f"past the end of the file ({size} bytes)"
                    )
                if (lrec >> 29) in (0, 3):
                    break
            yield start, offset - start


def build_index(rec_path: PathLike, idx_path: PathLike) -> int:
    """Write a `.idx` for `rec_path` with keys 0, 1, ... in file order; returns the count.

    The keys are the record numbers, as MXNet's and insightface's packers write them. The
    index is written to a temporary file and renamed, so a `.rec` that turns out corrupt
    (`RecordIOError`) leaves the old index in place.
    """
    idx_path = Path(idx_path)
    partial = idx_path.with_name(idx_path.name + ".partial")
    count = 0
    try:
        with open(partial, "w") as handle:
            for count, (offset, _) in enumerate(scan_records(rec_path), 1):
                handle.write(f"{count - 1}\t{offset}\n")
        os.replace(partial, idx_path)
    finally:
        partial.unlink(missing_ok=True)
    return count
