"""RecordIO: byte-exact fixtures, round trips, insightface layout, bad input."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest

from fr_trainer.data.layout import describe, read_labels, read_layout
from fr_trainer.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    build_index,
    encode_record,
    pack,
    unpack,
)

MAGIC = bytes.fromhex("0a23d7ce")


def lrec(cflag: int, length: int) -> bytes:
    return ((cflag << 29) | length).to_bytes(4, "little")


# Hand-made fixtures of the format: (payload, exact bytes on disk).
FIXTURES = {
    "empty": (b"", MAGIC + lrec(0, 0)),
    "aligned": (b"abcd", MAGIC + lrec(0, 4) + b"abcd"),
    "padded": (b"abcde", MAGIC + lrec(0, 5) + b"abcde" + b"\0\0\0"),
    "unaligned magic is kept": (b"x" + MAGIC + b"yz", MAGIC + lrec(0, 7) + b"x" + MAGIC + b"yz\0"),
    "split once": (
        b"AAAA" + MAGIC + b"BB",
        MAGIC + lrec(1, 4) + b"AAAA" + MAGIC + lrec(3, 2) + b"BB\0\0",
    ),
    "magic only": (MAGIC, MAGIC + lrec(1, 0) + MAGIC + lrec(3, 0)),
    "split twice, middle part": (
        MAGIC + b"12345678" + MAGIC + b"z",
        MAGIC + lrec(1, 0) + MAGIC + lrec(2, 8) + b"12345678" + MAGIC + lrec(3, 1) + b"z\0\0\0",
    ),
    "adjacent magics": (
        b"abcd" + MAGIC + MAGIC,
        MAGIC + lrec(1, 4) + b"abcd" + MAGIC + lrec(2, 0) + MAGIC + lrec(3, 0),
    ),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_encode_matches_hand_made_bytes(name: str) -> None:
    payload, expected = FIXTURES[name]
    assert encode_record(payload) == expected


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_writer_reader_round_trip_each_fixture(tmp_path, name: str) -> None:
    payload, expected = FIXTURES[name]
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(5, b"prefix")
        writer.write(9, payload)
    first = encode_record(b"prefix")
    assert rec.read_bytes() == first + expected
    assert idx.read_text() == f"5\t0\n9\t{len(first)}\n"
    with RecordReader(rec, idx) as reader:
        assert reader.keys == [5, 9]
        assert len(reader) == 2
        assert reader.read(9) == payload
        assert reader.read(5) == b"prefix"


def test_pack_matches_hand_made_bytes() -> None:
    scalar = pack(IRHeader(0, 3.0, 7, 0), b"JP")
    assert scalar == (
        bytes.fromhex("00000000")
        + bytes.fromhex("00004040")
        + (7).to_bytes(8, "little")
        + bytes(8)
        + b"JP"
    )
    # Scalar label forces flag 0, as MXNet does.
    assert pack(IRHeader(5, 3.0, 7, 0), b"JP") == scalar
    array = pack(IRHeader(0, [1.0, 2.0], 1, 2), b"")
    assert array == (
        (2).to_bytes(4, "little")
        + bytes(4)
        + (1).to_bytes(8, "little")
        + (2).to_bytes(8, "little")
        + bytes.fromhex("0000803f")
        + bytes.fromhex("00000040")
    )


def test_pack_unpack_round_trip_scalar_array_and_empty() -> None:
    header, image = unpack(pack(IRHeader(0, 12.0, 3, 4), b"\xff\xd8jpeg"))
    assert header == IRHeader(0, 12.0, 3, 4) and image == b"\xff\xd8jpeg"
    header, image = unpack(pack(IRHeader(0, np.array([4, 9.5, -1]), 1, 0)))
    assert header.flag == 3 and image == b""
    np.testing.assert_array_equal(header.label, np.array([4, 9.5, -1], dtype=np.float32))


def test_random_payloads_with_planted_magics_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(200):
        data = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):
            if len(data) >= 4:
                at = int(rng.integers(0, len(data) - 3))
                data[at : at + 4] = MAGIC
        payloads.append(bytes(data))
    rec, idx = tmp_path / "r.rec", tmp_path / "r.idx"
    with RecordWriter(rec, idx) as writer:
        for key, payload in enumerate(payloads):
            writer.write(key, payload)
    reader = RecordReader(rec, idx)
    order = rng.permutation(len(payloads))
    for key in order:
        assert reader.read(int(key)) == payloads[key]
    # build_index over the .rec reproduces the writer's index (keys are in order).
    assert build_index(rec, tmp_path / "re.idx") == len(payloads)
    assert (tmp_path / "re.idx").read_text() == idx.read_text()


def _read_in_child(reader: RecordReader, key: int, queue) -> None:
    queue.put((os.getpid(), reader.read(key)))


def test_reader_is_safe_after_fork_and_pickle(tmp_path) -> None:
    rec, idx = tmp_path / "f.rec", tmp_path / "f.idx"
    with RecordWriter(rec, idx) as writer:
        for key in range(10):
            writer.write(key, bytes([key]) * (key + 1))
    reader = RecordReader(rec, idx)
    assert reader.read(3) == b"\x03" * 4  # opens the handle in the parent
    parent_fd = reader._fd
    context = mp.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(reader, 7, queue))
    child.start()
    pid, data = queue.get(timeout=60)
    child.join(timeout=60)
    assert pid != os.getpid() and data == b"\x07" * 8
    assert reader._fd == parent_fd and reader.read(9) == b"\x09" * 10
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None and clone.read(2) == b"\x02" * 3


def _write_insightface(rec, idx, labels: list[int]) -> None:
    """Header record 0, image keys 1..n, identity records (labels sorted by class)."""
    n = len(labels)
    classes = sorted(set(labels))
    with RecordWriter(rec, idx) as writer:
        writer.write(0, pack(IRHeader(0, [n + 1, n + 1 + len(classes)], 0, 0)))
        for key, label in enumerate(labels, 1):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), b"img%d" % key))
        for row, cls in enumerate(classes):
            keys = [k for k, lab in enumerate(labels, 1) if lab == cls]
            writer.write(n + 1 + row, pack(IRHeader(0, [keys[0], keys[-1] + 1], 0, 0)))


def test_insightface_layout_is_understood(tmp_path) -> None:
    rec, idx = tmp_path / "i.rec", tmp_path / "i.idx"
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    _write_insightface(rec, idx, labels)
    layout = read_layout(RecordReader(rec, idx))
    assert layout.insightface and layout.num_images == 9 and layout.num_classes == 3
    np.testing.assert_array_equal(layout.image_keys, np.arange(1, 10))
    np.testing.assert_array_equal(layout.identity_ranges, [[1, 4], [4, 6], [6, 10]])
    np.testing.assert_array_equal(read_labels(RecordReader(rec, idx), layout.image_keys), labels)
    described = describe(rec)  # the .idx beside the .rec
    assert (described.num_images, described.num_classes) == (9, 3)


def test_plain_file_uses_every_key_and_array_labels(tmp_path) -> None:
    rec, idx = tmp_path / "p.rec", tmp_path / "p.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(10, pack(IRHeader(0, [4.0, 0.5], 0, 0), b"a"))
        writer.write(11, pack(IRHeader(0, 1.0, 0, 0), b"b"))
    reader = RecordReader(rec, idx)
    layout = read_layout(reader)
    assert not layout.insightface and layout.num_classes == 5
    np.testing.assert_array_equal(read_labels(reader, layout.image_keys), [4, 1])


# ---- bad input: errors name the file, the key and the offset --------------------------


def _two_records(tmp_path):
    rec, idx = tmp_path / "b.rec", tmp_path / "b.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(0, b"a" * 40)
        writer.write(1, b"b" * 40)
    return rec, idx


def test_bad_magic_names_file_key_offset(tmp_path) -> None:
    rec, idx = _two_records(tmp_path)
    data = bytearray(rec.read_bytes())
    data[48:52] = b"XXXX"  # magic of record 1 (record 0 is 8 + 40 bytes)
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=r"b\.rec.*key 1 at offset 48.*bad magic.*pack --reindex"):
        RecordReader(rec, idx).read(1)


def test_truncated_record_names_file_key_offset(tmp_path) -> None:
    rec, idx = _two_records(tmp_path)
    rec.write_bytes(rec.read_bytes()[:70])
    with pytest.raises(RecordIOError, match=r"b\.rec.*key 1 at offset 48.*truncated"):
        RecordReader(rec, idx).read(1)


def test_index_offset_past_end(tmp_path) -> None:
    rec, idx = _two_records(tmp_path)
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match=r"key 1 points at offset 4096, past the end"):
        RecordReader(rec, idx)


def test_malformed_index_line(tmp_path) -> None:
    rec, idx = _two_records(tmp_path)
    idx.write_text("0\t0\nnot-a-key\n")
    with pytest.raises(RecordIOError, match=r"b\.idx:2"):
        RecordReader(rec, idx)


def test_writer_rejects_duplicate_keys_and_huge_payloads(tmp_path) -> None:
    with RecordWriter(tmp_path / "d.rec", tmp_path / "d.idx") as writer:
        writer.write(1, b"x")
        with pytest.raises(ValueError, match="key 1 written twice"):
            writer.write(1, b"y")
    with pytest.raises(ValueError, match="2\\^29"):
        encode_record(memoryview(bytearray(1 << 29)))


def test_large_multi_part_record_read_through_a_sparse_index(tmp_path) -> None:
    big = bytearray(np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    big[(2 << 20) : (2 << 20) + 4] = MAGIC  # a split beyond the reader's first read
    rec, idx = tmp_path / "big.rec", tmp_path / "big.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(0, bytes(big))
        writer.write(1, b"after")
    sparse = tmp_path / "sparse.idx"
    sparse.write_text("0\t0\n")  # the gap to the next listed offset is the whole file
    assert RecordReader(rec, sparse).read(0) == bytes(big)
    assert RecordReader(rec, idx).read(1) == b"after"
