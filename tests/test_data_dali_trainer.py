"""`data.loader = "dali"`: the trainer's DALI loader (CPU pipelines here) deals out what the
torch loader does (same ids, same flips, same tensors within JPEG tolerance, same ragged end,
same resume), trains, resumes exactly, continues at 2 -> 1 ranks without repeating a sample,
names an undecodable record, and runs under a real 2-rank torchrun."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="DALI is the `dali` extra (pip install nvidia-dali-cuda130)")

from synth_helpers import tiny_training_set
from test_train_support import config_dict, make_data, make_trainer, rank_fit

from fr_trainer.data.dali_train import DaliTrainLoader
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.loader import build_loader
from fr_trainer.data.recordio import IRHeader, RecordIOError, RecordWriter, pack
from fr_trainer.data.samplers import DistributedSampler, PKBatchSampler
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train.config import ConfigError, config_from_dict
from fr_trainer.train.data_setup import BatchStream, build_train_data, open_dataset

CLASSES, PER_CLASS = 5, 4  # 20 images
# in 0..255 levels: both decoders are libjpeg-turbo here (measured max ~1e-5); the bound
# leaves room for another build's IDCT, far below a flip or a wrong image (tens of levels)
MAX_ABS, MEAN_ABS = 4.0, 0.5


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_training_set(tmp_path_factory.mktemp("synth"), CLASSES, PER_CLASS, seed=2)


def _loaders(rec: Path, rank: int, world: int, batch: int, drop_last: bool, seed: int = 7):
    """(torch loader, DALI loader) over the same kind of sampler."""
    torch_loader = build_loader(RecordDataset(rec, seed=seed), batch_size=batch, rank=rank, world_size=world,
                                seed=seed, num_workers=0, decode="pil", drop_last=drop_last)
    dataset = RecordDataset(rec, seed=seed)
    sampler = DistributedSampler(len(dataset), rank, world, seed=seed, drop_last=drop_last)
    dali = DaliTrainLoader(dataset, batch_size=batch, sampler=sampler, drop_last=drop_last, num_threads=1)
    return torch_loader, dali


def _assert_same_batches(expected: list, got: list) -> None:
    assert [b[0].shape for b in got] == [b[0].shape for b in expected]
    for (ref, ref_labels), (images, labels) in zip(expected, got):
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(labels, ref_labels)
        levels = (images - ref).abs() * 127.5
        assert float(levels.max()) <= MAX_ABS and float(levels.mean()) <= MEAN_ABS


def test_same_ids_give_the_same_tensors_as_the_torch_loader(synth):
    for rank in range(2):
        torch_loader, dali = _loaders(synth / "train.rec", rank, 2, 4, drop_last=True)
        for epoch in (0, 3):
            torch_loader.set_epoch(epoch)
            dali.set_epoch(epoch)
            expected = list(torch_loader)
            _assert_same_batches(expected, list(dali))
    # the flips are really applied: some image differs from its unflipped decode by far more
    plain = RecordDataset(synth / "train.rec", flip=False)
    plain.output = "uint8"
    dali.set_epoch(3)
    indices = [i for batch in dali.index_batches() for i in batch]
    flips = [bool(dali.dataset[i][2]) for i in indices]
    assert 0 < sum(flips) < len(flips)
    images = torch.cat([b[0] for b in dali])
    unflipped = torch.stack([plain[i][0] for i in indices]).float() / 127.5 - 1
    for image, reference, flip in zip(images, unflipped, flips):
        target = reference.flip(-1) if flip else reference
        assert float((image - target).abs().max()) * 127.5 <= MAX_ABS


def test_ragged_last_batch_is_the_torch_loaders_on_every_rank(synth):
    # 20 images on 3 ranks: 7 per rank (padded) -> batches 4 + 3, or 4 alone with drop_last
    for drop_last, sizes in ((False, [4, 3]), (True, [4])):
        for rank in range(3):
            torch_loader, dali = _loaders(synth / "train.rec", rank, 3, 4, drop_last=drop_last)
            torch_loader.set_epoch(1)
            dali.set_epoch(1)
            got = list(dali)
            assert [len(labels) for _, labels in got] == sizes and len(dali) == len(sizes)
            _assert_same_batches(list(torch_loader), got)


def test_resume_mid_epoch_continues_the_same_sequence(synth):
    _, dali = _loaders(synth / "train.rec", 0, 1, 3, drop_last=True)
    dali.set_epoch(2)
    whole = list(dali)
    dali.set_epoch(2, 0, 6)  # the job consumed 6 samples (two batches) of epoch 2
    rest = list(dali)
    assert len(rest) == len(whole) - 2
    for (a, la), (b, lb) in zip(whole[2:], rest):
        assert torch.equal(la, lb) and torch.equal(a, b)  # DALI's CPU decode is deterministic
    # an abandoned iteration (prefetched batches left in DALI) does not leak into the next one
    iterator = iter(dali)
    next(iterator)
    del iterator
    dali.set_epoch(2, 0, 6)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, dali))
    # a newer iterator ends an older live one, which then says so instead of mixing batches
    older = iter(dali)
    next(older)
    newer = iter(dali)
    assert torch.equal(next(newer)[1], rest[0][1])
    with pytest.raises(RuntimeError, match="ended by a newer iter"):
        next(older)
    assert torch.equal(next(newer)[1], rest[1][1])


def test_images_of_another_size_are_resized_to_the_training_size(tmp_path):
    rec = tmp_path / "sizes.rec"
    ramp = np.linspace(0, 255, 150 * 130 * 3).reshape(150, 130, 3).astype(np.uint8)  # smooth
    with RecordWriter(rec, tmp_path / "sizes.idx") as writer:
        for key in range(4):
            image = Image.fromarray(np.roll(ramp, 20 * key, axis=0)).resize((112, 112) if key % 2 else (130, 150))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            writer.write(key, pack(IRHeader(0, float(key), key, 0), buffer.getvalue()))
    dataset = RecordDataset(rec, flip=False)
    dali = DaliTrainLoader(dataset, batch_size=4, num_threads=1,
                           sampler=DistributedSampler(4, 0, 1, shuffle=False))
    dali.set_epoch(0)
    ((images, labels),) = list(dali)
    assert images.shape == (4, 3, 112, 112) and labels.tolist() == [0, 1, 2, 3]
    reference = RecordDataset(rec, flip=False)
    reference.output = "float"
    levels = torch.stack([(images[i] - reference[i][0]).abs() * 127.5 for i in range(4)])
    assert float(levels[1::2].max()) <= MAX_ABS  # already 112 x 112: not resampled
    assert float(levels[0::2].mean()) <= 1.0  # resized: DALI's and Pillow's resampling differ a little


def test_pk_batches_are_the_torch_loaders(synth):
    def sampler(dataset):
        return PKBatchSampler(dataset.class_groups(), 2, 2, 0, 1, seed=5)

    reference = RecordDataset(synth / "train.rec", seed=5)
    torch_loader = build_loader(reference, batch_size=4, num_workers=0, decode="pil",
                                batch_sampler=sampler(reference))
    dataset = RecordDataset(synth / "train.rec", seed=5)
    dali = DaliTrainLoader(dataset, batch_size=4, batch_sampler=sampler(dataset), num_threads=1)
    assert dali.batch_size == 4 and dali.sampler is dali._batch_sampler
    torch_loader.set_epoch(1, 1)
    dali.set_epoch(1, 1)
    _assert_same_batches(list(torch_loader), list(dali))


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (112, 112), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _file_with_a_bad_image(folder: Path, bad_key: int = 5) -> Path:
    rec = folder / "bad.rec"
    with RecordWriter(rec, folder / "bad.idx") as writer:
        for key in range(8):
            data = _jpeg((30 * key, 90, 200 - 20 * key))
            if key == bad_key:
                data = data[:20] + b"\x00" * 40  # a JPEG header, then garbage
            writer.write(key, pack(IRHeader(0, float(key % 2), key, 0), data))
    return rec


def test_an_undecodable_image_raises_naming_the_record_and_the_fix(tmp_path):
    rec = _file_with_a_bad_image(tmp_path)
    dataset = RecordDataset(rec, num_classes=2, flip=False)
    sampler = DistributedSampler(len(dataset), 0, 1, shuffle=False)
    dali = DaliTrainLoader(dataset, batch_size=2, sampler=sampler, num_threads=1)
    dali.set_epoch(0)
    with pytest.raises(RecordIOError) as caught:
        list(dali)
    message = str(caught.value)
    offset = dataset.reader.offset(5)
    # the bytes are checked as they are read (like the torch path), before DALI sees them
    assert f"bad.rec: key 5 at offset {offset}" in message and "does not decode" in message
    assert "data.on_bad=skip" in message and "fr-trainer check-data" in message
    assert "\n" not in message


def test_skip_policy_replaces_an_undecodable_image_like_the_torch_path(tmp_path):
    rec = _file_with_a_bad_image(tmp_path)
    dataset = RecordDataset(rec, num_classes=2, flip=False, on_bad="skip")
    sampler = DistributedSampler(len(dataset), 0, 1, shuffle=False)
    from fr_trainer.data.bad_records import BadRecordTally

    tally = BadRecordTally(len(dataset), 0.5, rec_path=rec)
    dali = DaliTrainLoader(dataset, batch_size=2, sampler=sampler, num_threads=1, bad_records=tally)
    dali.set_epoch(0)
    batches = list(dali)
    assert len(batches) == 4 and dataset.skipped == 1
    assert list(tally.reasons) == [5] and "does not decode" in tally.reasons[5]  # counted, capped
    images = torch.cat([b[0] for b in batches])
    assert torch.equal(images[5], images[6])  # index 5 replaced by the next good record, 6
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 0, 1, 0, 0, 0, 1]


def test_missing_dali_is_a_config_error_naming_the_extra(synth, monkeypatch, tmp_path):
    cfg = config_from_dict(config_dict(synth, tmp_path, data={"loader": "dali"}))
    dataset = open_dataset(cfg)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali fails
    with pytest.raises(ConfigError, match=r"pip install 'fr_trainer\[dali\]'.*data.loader=torch"):
        build_train_data(cfg, dataset, 0, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.loader='cuda' is not one of 'torch', 'dali'"):
        config_from_dict(config_dict(synth, tmp_path, data={"loader": "cuda"}))
    with pytest.raises(ConfigError, match="data.dali_threads must be >= 1, got 0"):
        config_from_dict(config_dict(synth, tmp_path, data={"dali_threads": 0}))


def test_batch_stream_over_the_dali_loader_counts_like_the_torch_one(synth, tmp_path):
    streams = {}
    for loader in ("torch", "dali"):
        cfg = config_from_dict(config_dict(synth, tmp_path, data={"loader": loader, "batch_size": 3}))
        streams[loader] = BatchStream(build_train_data(cfg, open_dataset(cfg), 1, 2, torch.device("cpu")), 2)
    assert streams["dali"].batches_per_epoch == streams["torch"].batches_per_epoch == 3
    for _ in range(7):  # across an epoch boundary
        expected, got = streams["torch"].next(), streams["dali"].next()
        _assert_same_batches([expected], [got])
        assert streams["dali"].position() == streams["torch"].position()


# ------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_data"))


DALI = {"data": {"loader": "dali", "dali_threads": 1}}


def test_trainer_with_dali_trains_and_kill_resume_is_bit_identical(data, tmp_path):
    sections = {**DALI, "train": {"max_steps": 8}, "checkpoint": {"every_steps": 0}}
    straight = run_ranks(rank_fit, 2, config_dict(data, tmp_path / "straight", **sections))
    cfg = config_dict(data, tmp_path / "resumed", **sections)
    stopped = run_ranks(rank_fit, 2, cfg, 3)  # "killed" after the checkpoint of step 3
    resumed = run_ranks(rank_fit, 2, cfg)
    assert stopped[0]["step"] == 3 and resumed[0]["step"] == 8  # an epoch (6 steps) boundary inside
    assert stopped[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]
    assert straight[0]["losses"][-1] < straight[0]["losses"][0]
    for rank in range(2):
        a, b = straight[rank]["snapshot"], resumed[rank]["snapshot"]
        assert torch.equal(a["head"], b["head"])
        assert all(torch.equal(v, b["backbone"][k]) for k, v in a["backbone"].items())


def rank_fit_reading(rank: int, world_size: int, cfg: dict, stop_after: int | None = None) -> list:
    """Fit; the (epoch, dataset index) of every sample this rank's DALI loader read."""
    trainer = make_trainer(rank, world_size, cfg)
    assert isinstance(trainer.loader, DaliTrainLoader)
    read: list[tuple[int, int]] = []
    dataset = trainer.dataset

    class Recording(type(dataset)):
        def __getitem__(self, index):
            read.append((self.epoch, int(index)))
            return super().__getitem__(index)

    dataset.__class__ = Recording
    trainer.fit(stop_after=stop_after)
    return read


def test_dali_resume_from_two_ranks_to_one_repeats_no_sample(data, tmp_path):
    cfg = config_dict(data, tmp_path, **DALI, train={"max_steps": None, "epochs": 1.0},
                      checkpoint={"every_steps": 0})
    stopped = run_ranks(rank_fit_reading, 2, cfg, 2)  # 2 steps x 16 = 32 of 96 samples
    resumed = run_ranks(rank_fit_reading, 1, cfg)
    # the DALI loader reads ahead (prefetch), so the stopped run may have read a little more
    # than it trained on; what it trained on is the first 32 entries of the permutation
    trained = [i for rank in stopped for e, i in rank[: 2 * 8] if e == 0]
    after = [i for e, i in resumed[0] if e == 0]
    assert len(trained) == 32 and len(after) == 96 - 32
    assert Counter(trained + after) == Counter(range(96))


# ------------------------------------------------------------------ torchrun
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_ranks_train_the_demo_with_dali(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FR_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    sets = [f"data.root={data}", "data.loader=dali", "data.dali_threads=1", "data.batch_size=8",
            "train.max_steps=4", "checkpoint.every_steps=0", "eval.at_end=false", "log.every_steps=1",
            f"run.output_dir={tmp_path}", "run.name=dali"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fr_trainer", "train", str(ROOT / "configs" / "demo.toml")]
    command += [arg for s in sets for arg in ("--set", s)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "dali" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert len(summary["losses"]) == 4 and all(np.isfinite(summary["losses"]))


def test_bench_train_compares_the_loaders_per_cpu_second(data, tmp_path, capsys):
    from fr_trainer.train.bench import main as bench_main

    out = tmp_path / "bench.json"
    argv = ["--data", str(data), "--loader", "torch,dali", "--backbone", "test_tinylinear", "--embedding-size", "16",
            "--batch-size", "8", "--steps", "2", "--warmup", "1", "--num-workers", "1", "--data-batches", "3",
            "--json", str(out)]
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    runs = {run["loader"]: run for run in result["runs"]}
    assert set(runs) == {"torch", "dali"}
    for run in runs.values():
        assert run["data_only"]["images"] == 4 * 8 and run["data_only"]["cpu_s"] > 0
        assert run["step_images_per_cpu_s"] > 0 and run["samples_per_s"] > 0
    ratio = result["dali_over_torch"]["data_only_images_per_cpu_s"]
    assert ratio == pytest.approx(runs["dali"]["data_only"]["images_per_cpu_s"]
                                  / runs["torch"]["data_only"]["images_per_cpu_s"])
    assert "dali / torch:" in capsys.readouterr().out


def _file_with_a_truncated_image(folder: Path, bad_key: int = 5) -> Path:
    """Complete headers everywhere (the dataset's check passes), but record `bad_key`'s
    entropy-coded data cut in half: only decoding finds it, so DALI's pipeline fails."""
    rec = folder / "truncated.rec"
    with RecordWriter(rec, folder / "truncated.idx") as writer:
        for key in range(8):
            noise = (np.random.default_rng(key).random((112, 112, 3)) * 255).astype("uint8")
            buffer = io.BytesIO()
            Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            if key == bad_key:
                data = data[: len(data) // 2] + b"\x00" * 64
            writer.write(key, pack(IRHeader(0, float(key % 2), key, 0), data))
    return rec


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_an_image_only_dali_fails_on_follows_the_policy(tmp_path, policy):
    from fr_trainer.data.bad_records import BadRecordError, BadRecordTally

    rec = _file_with_a_truncated_image(tmp_path)
    dataset = RecordDataset(rec, num_classes=2, flip=False, on_bad=policy)
    tally = BadRecordTally(len(dataset), 0.5, rec_path=rec)
    sampler = DistributedSampler(len(dataset), 0, 1, shuffle=False)
    dali = DaliTrainLoader(dataset, batch_size=2, sampler=sampler, num_threads=1, bad_records=tally)
    dali.set_epoch(0)
    if policy == "error":
        with pytest.raises(BadRecordError, match=r"truncated.rec: key 5 at offset \d+: .* does not decode in DALI"):
            list(dali)
        return
    batches = list(dali)  # the pipeline is rebuilt, the record replaced by the next good one
    assert len(batches) == 4 and list(tally.reasons) == [5]
    images = torch.cat([b[0] for b in batches])
    assert torch.equal(images[5], images[6])
