"""DALI (CPU pipelines) reads what RecordWriter writes: same labels, pixels equal to the
torch path within JPEG tolerance; the image-only index makes insightface files readable."""

from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "nvidia.dali", reason="DALI is the `dali` extra (pip install nvidia-dali-cuda130)"
)

from synth_helpers import tiny_training_set

from fr_trainer.data.dali import DaliLoader, image_index
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.recordio import MAGIC_BYTES, IRHeader, RecordReader, RecordWriter, pack

CLASSES, PER_CLASS = 5, 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_training_set(tmp_path_factory.mktemp("synth"), CLASSES, PER_CLASS, seed=2)


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_image_index_lists_only_image_records_and_is_cached(synth) -> None:
    path = image_index(synth / "train.rec")
    assert path == synth / "train.dali.idx"
    reader = RecordReader(synth / "train.rec", synth / "train.idx")
    lines = path.read_text().splitlines()
    assert [line.split("\t") for line in lines] == [
        [str(k), str(reader.offset(k))] for k in range(1, 21)
    ]
    stamp = path.stat().st_mtime_ns
    assert image_index(synth / "train.rec") == path and path.stat().st_mtime_ns == stamp
    os.utime(synth / "train.rec", ns=(stamp + 10**9, stamp + 10**9))  # data newer than the cache
    image_index(synth / "train.rec")
    assert path.stat().st_mtime_ns > stamp


def test_dali_cpu_matches_the_torch_path_on_an_insightface_file(synth) -> None:
    loader = DaliLoader(
        synth / "train.rec",
        batch_size=6,
        device="cpu",
        flip=False,
        shuffle=False,
        drop_last=False,
        num_threads=1,
    )
    images, labels = _all(loader)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (CLASSES * PER_CLASS, 3, 112, 112)
    dataset = RecordDataset(synth / "train.rec", flip=False)
    np.testing.assert_array_equal(labels.numpy(), dataset.labels())
    reference = torch.stack([dataset[i][0] for i in range(len(dataset))])
    difference = (images - reference).abs() * 127.5  # in 0..255 levels
    assert float(difference.mean()) < 1.0 and float(difference.max()) < 32


def test_dali_flip_mirrors_some_images(synth) -> None:
    plain = _all(
        DaliLoader(synth / "train.rec", batch_size=20, device="cpu", flip=False, shuffle=False)
    )[0]
    flipped = _all(
        DaliLoader(
            synth / "train.rec", batch_size=20, device="cpu", flip=True, shuffle=False, seed=5
        )
    )[0]
    same = [(flipped[i] - plain[i]).abs().max() < 0.05 for i in range(20)]
    mirrored = [(flipped[i] - plain[i].flip(-1)).abs().max() < 0.05 for i in range(20)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 20


def test_dali_shards_by_rank(synth) -> None:
    shards = [
        _all(
            DaliLoader(
                synth / "train.rec",
                batch_size=2,
                rank=r,
                world_size=2,
                device="cpu",
                drop_last=False,
                shuffle=False,
            )
        )[1].tolist()
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 10
    assert Counter(shards[0] + shards[1]) == Counter(
        np.repeat(np.arange(CLASSES), PER_CLASS).tolist()
    )


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (112, 112), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_dali_reads_array_labels_and_multi_part_records(tmp_path) -> None:
    rec, idx = tmp_path / "plain.rec", tmp_path / "plain.idx"
    payloads = []
    for key in range(4):
        jpeg = _jpeg((60 * key, 100, 200 - 40 * key))
        if key % 2:  # trailing bytes after the JPEG end holding the magic at a 4-byte boundary
            jpeg += b"\0" * (-(len(jpeg) + 24 + 8) % 4) + MAGIC_BYTES + b"tail"
        label = [float(key), 7.5] if key < 2 else float(key)
        payloads.append(pack(IRHeader(0, label, key, 0), jpeg))
    with RecordWriter(rec, idx) as writer:
        for key, payload in enumerate(payloads):
            writer.write(key, payload)
    assert b"tail" in rec.read_bytes() and rec.read_bytes().count(MAGIC_BYTES) > 4  # really split
    loader = DaliLoader(rec, idx, batch_size=4, device="cpu", flip=False, shuffle=False)
    images, labels = _all(loader)
    assert labels.tolist() == [0, 1, 2, 3]
    reference = torch.stack([RecordDataset(rec, idx, flip=False)[i][0] for i in range(4)])
    assert float(((images - reference).abs() * 127.5).max()) < 4
