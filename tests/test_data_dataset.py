"""RecordDataset and the prefetching loader over a tiny synthetic set; bad input; 2 ranks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from synth_helpers import tiny_training_set

from fr_trainer.data.dataset import RecordDataset, flip_decision
from fr_trainer.data.layout import read_labels
from fr_trainer.data.loader import build_loader
from fr_trainer.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    unpack,
)
from fr_trainer.data.samplers import PKBatchSampler
from fr_trainer.distributed.spawn import run_ranks

CLASSES, PER_CLASS = 6, 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_training_set(tmp_path_factory.mktemp("synth"), CLASSES, PER_CLASS, seed=1)


def test_counts_come_from_the_header(synth) -> None:
    dataset = RecordDataset(synth / "train.rec")
    assert len(dataset) == CLASSES * PER_CLASS and dataset.num_classes == CLASSES
    np.testing.assert_array_equal(dataset.labels(), np.repeat(np.arange(CLASSES), PER_CLASS))
    groups = dataset.class_groups()
    assert [g.tolist() for g in groups] == [
        list(range(c * PER_CLASS, (c + 1) * PER_CLASS)) for c in range(CLASSES)
    ]
    with pytest.raises(ValueError, match="header .* says 6"):
        RecordDataset(synth / "train.rec", num_classes=7)


def test_item_is_normalised_decoded_image_and_label(synth) -> None:
    dataset = RecordDataset(synth / "train.rec", flip=False)
    image, label = dataset[5]
    assert (
        image.shape == (3, 112, 112) and image.dtype == torch.float32 and label.dtype == torch.int64
    )
    assert int(label) == 5 // PER_CLASS
    reader = RecordReader(synth / "train.rec", synth / "train.idx")
    _, jpeg = unpack(reader.read(6))  # index 5 is key 6
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(
        2, 0, 1
    )
    torch.testing.assert_close(image, (pixels.float() / 255 - 0.5) / 0.5)
    assert image.min() >= -1 and image.max() <= 1


def test_flip_is_deterministic_and_mirrors(synth) -> None:
    plain = RecordDataset(synth / "train.rec", flip=False)
    flipping = RecordDataset(synth / "train.rec", flip=True, seed=4)
    decisions = [flip_decision(4, 0, i) for i in range(len(plain))]
    assert 0 < sum(decisions) < len(decisions)
    index = decisions.index(True)
    torch.testing.assert_close(flipping[index][0], plain[index][0].flip(-1))
    kept = decisions.index(False)
    torch.testing.assert_close(flipping[kept][0], plain[kept][0])
    flipping.set_epoch(1)
    assert [flip_decision(4, 1, i) for i in range(len(plain))] != decisions


def test_loader_yields_normalised_batches_covering_the_shard(synth) -> None:
    dataset = RecordDataset(synth / "train.rec")
    loader = build_loader(
        dataset, batch_size=5, rank=1, world_size=2, num_workers=2, drop_last=False, seed=3
    )
    assert loader.decode == "pil"  # "auto" without CUDA
    loader.set_epoch(2)
    labels = []
    for images, batch_labels in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 112, 112)
        assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
        labels += batch_labels.tolist()
    expected = read_labels(dataset.reader, dataset.layout.image_keys)[
        list(loader.sampler.indices())
    ]
    assert labels == expected.tolist()


def test_loader_with_pk_batch_sampler(synth) -> None:
    dataset = RecordDataset(synth / "train.rec")
    sampler = PKBatchSampler(dataset.class_groups(), 2, 3, 0, 1, seed=0)
    loader = build_loader(dataset, batch_size=6, batch_sampler=sampler, num_workers=0)
    batches = [labels.tolist() for _, labels in loader]
    assert len(batches) == CLASSES // 2
    for labels in batches:
        assert (
            labels[:3] == [labels[0]] * 3
            and labels[3:] == [labels[3]] * 3
            and labels[0] != labels[3]
        )


def _rank_labels(rank: int, world_size: int, rec: str) -> list[int]:
    dataset = RecordDataset(rec)
    loader = build_loader(
        dataset, batch_size=4, rank=rank, world_size=world_size, num_workers=0, seed=11
    )
    labels = [label for _, batch in loader for label in batch.tolist()]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, sorted(int(i) for i in loader.sampler.indices()))
    return [labels, gathered]


def test_two_ranks_read_disjoint_shards_of_one_epoch(synth) -> None:
    results = run_ranks(_rank_labels, 2, str(synth / "train.rec"))
    shards = results[0][1]
    assert results[1][1] == shards
    assert set(shards[0]).isdisjoint(shards[1]) and sorted(shards[0] + shards[1]) == list(
        range(CLASSES * PER_CLASS)
    )
    assert len(results[0][0]) == len(results[1][0]) == CLASSES * PER_CLASS // 2


# ---- bad input -----------------------------------------------------------------------------


def _write(tmp_path, records: list[tuple[float, bytes]], num_classes: int):
    rec, idx = tmp_path / "bad.rec", tmp_path / "bad.idx"
    n = len(records)
    with RecordWriter(rec, idx) as writer:
        writer.write(0, pack(IRHeader(0, [n + 1, n + 1 + num_classes], 0, 0)))
        for key, (label, data) in enumerate(records, 1):
            writer.write(key, pack(IRHeader(0, label, key, 0), data))
        for c in range(num_classes):
            writer.write(n + 1 + c, pack(IRHeader(0, [1, 2], 0, 0)))
    return rec


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (112, 112), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_label_out_of_range_names_file_key_offset(tmp_path) -> None:
    rec = _write(tmp_path, [(0.0, _jpeg()), (5.0, _jpeg())], num_classes=2)
    dataset = RecordDataset(rec)
    offset = dataset.reader.offset(2)
    with pytest.raises(
        RecordIOError, match=rf"bad\.rec: key 2 at offset {offset}: label 5 is outside \[0, 2\)"
    ):
        dataset[1]


def test_undecodable_image_raises_or_is_skipped_with_a_count(tmp_path) -> None:
    rec = _write(
        tmp_path, [(0.0, _jpeg()), (1.0, b"\xff\xd8 not a jpeg"), (1.0, _jpeg())], num_classes=2
    )
    dataset = RecordDataset(rec)
    with pytest.raises(
        RecordIOError, match=r"bad\.rec: key 2 at offset \d+: image of 13 bytes does not decode"
    ):
        dataset[1]
    skipping = RecordDataset(rec, on_bad="skip", flip=False)
    image, label = skipping[1]
    assert skipping.skipped == 1 and int(label) == 1  # replaced by the next record (key 3)
    [(index, reason)] = skipping.take_skipped()
    assert index == 1 and "key 2" in reason and "does not decode" in reason
    torch.testing.assert_close(image, skipping[2][0])


def test_truncated_file_is_an_error_not_a_hang(tmp_path) -> None:
    rec = _write(tmp_path, [(0.0, _jpeg()), (1.0, _jpeg())], num_classes=2)
    data = rec.read_bytes()
    dataset = RecordDataset(rec)
    cut = dataset.reader.offset(2) + 100
    rec.write_bytes(data[:cut])
    with pytest.raises(RecordIOError, match=r"index .* past the end|truncated"):
        RecordDataset(rec)[1]
