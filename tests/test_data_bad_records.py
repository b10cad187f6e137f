"""Bad training records: one clear error (also out of DataLoader workers and the train CLI),
or data.on_bad=skip (deterministic replacement, logged once, capped); start-up data errors;
`fr-trainer pack --reindex`."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from rec_helpers import corrupt, image_offset, labels_of, shrink_payload, write_rec
from test_train_support import config_dict, make_trainer

from fr_trainer.data.bad_records import BadRecordError, BadRecordTally, TooManyBadRecords
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.loader import build_loader
from fr_trainer.data.pack_cli import main as pack_main
from fr_trainer.eval.binset import encode_image
from fr_trainer.train.cli import main as train_main
from fr_trainer.train.config import ConfigError, config_from_dict
from fr_trainer.train.data_setup import open_dataset

CLASSES, PER_CLASS = 6, 4  # 24 images
BAD_JPEG = 5


def _set_with_bad_jpeg(root, bad=(BAD_JPEG,)):
    return write_rec(root, labels_of(CLASSES, PER_CLASS), {i: b"\xff\xd8 not a jpeg" for i in bad})


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("jpeg", r"image of 13 bytes does not decode"),
        ("label", r"label 9 is outside \[0, 6\) \(from the header record\)"),
        ("magic", r"bad magic 0x58585858"),
        ("header", r"payload of 8 bytes is shorter than the 24-byte IRHeader"),
    ],
)
def test_error_policy_names_file_index_key_offset_and_fix(tmp_path, damage, reason) -> None:
    labels = labels_of(CLASSES, PER_CLASS)
    images = {BAD_JPEG: b"\xff\xd8 not a jpeg"} if damage == "jpeg" else {}
    if damage == "label":
        labels[BAD_JPEG] = 9.0
    rec = write_rec(tmp_path, labels, images, classes=[int(x) for x in labels_of(CLASSES, PER_CLASS)])
    offset = image_offset(rec, BAD_JPEG)
    if damage == "magic":
        corrupt(rec, offset, b"XXXX")
    if damage == "header":
        shrink_payload(rec, BAD_JPEG, 8)
    dataset = RecordDataset(rec)
    dataset[BAD_JPEG - 1]  # the neighbours are fine
    with pytest.raises(BadRecordError) as caught:
        dataset[BAD_JPEG]
    message = str(caught.value)
    assert "\n" not in message
    assert f"index {BAD_JPEG}: {rec}: key {BAD_JPEG + 1} at offset {offset}" in message
    assert f"fr-trainer check-data {tmp_path}" in message and "data.on_bad=skip" in message
    assert re.search(reason, message)


def test_error_survives_a_dataloader_worker_as_one_line(tmp_path) -> None:
    rec = _set_with_bad_jpeg(tmp_path)
    direct = RecordDataset(rec)
    with pytest.raises(BadRecordError) as alone:
        direct[BAD_JPEG]
    loader = build_loader(RecordDataset(rec), batch_size=4, num_workers=1, seed=0)
    with pytest.raises(BadRecordError) as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    del caught  # its traceback holds the DataLoader iterator: let it shut its worker down now
    assert "Traceback" not in message and "\n" not in message
    assert message == str(alone.value)


def test_skip_replaces_by_the_next_record_and_logs_each_once(tmp_path, caplog) -> None:
    rec = _set_with_bad_jpeg(tmp_path)
    dataset = RecordDataset(rec, on_bad="skip", flip=False)
    image, label = dataset[BAD_JPEG]
    torch.testing.assert_close(image, dataset[BAD_JPEG + 1][0])
    assert int(label) == int(dataset[BAD_JPEG + 1][1])
    notes = dataset.take_skipped()
    assert [index for index, _ in notes] == [BAD_JPEG] and "does not decode" in notes[0][1]
    assert dataset.take_skipped() == []  # taken once

    log = tmp_path / "run" / "bad_records.rank0.jsonl"
    tally = BadRecordTally(len(dataset), 0.5, 0, rec, log)
    loader = build_loader(dataset, batch_size=4, num_workers=2, seed=1, bad_records=tally)
    with caplog.at_level(logging.WARNING, logger="fr_trainer.train"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            shapes = {tuple(images.shape) for images, _ in loader}
            assert shapes == {(4, 3, 112, 112)}
    assert tally.count == 1 and tally.events == 2  # met in both epochs, counted once
    logged = [r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage()]
    assert len(logged) == 1 and f"index {BAD_JPEG}:" in logged[0]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["index"] for line in lines] == [BAD_JPEG] and "does not decode" in lines[0]["reason"]


def test_tally_stops_past_the_fraction() -> None:
    tally = BadRecordTally(100, 0.02, rank=1, rec_path="/data/set/train.rec")
    tally.add([(3, "bad"), (3, "bad"), (7, "bad")])
    assert tally.count == 2
    with pytest.raises(TooManyBadRecords, match=r"rank 1: 3 bad records skipped out of 100 \(3\.00%\), more "
                       r"than data.max_bad_fraction=0.02.*fr-trainer check-data /data/set"):
        tally.add([(9, "bad")])


def _train_cfg(root, out, **data):
    return config_dict(root, out, data={"batch_size": 8, "num_workers": 1, **data}, train={"max_steps": 3})


def test_skip_policy_in_a_short_training_counts_and_finishes(tmp_path) -> None:
    rec = _set_with_bad_jpeg(tmp_path / "data", bad=(2, 17))
    cfg = _train_cfg(rec.parent, tmp_path / "out", on_bad="skip", max_bad_fraction=0.1)
    trainer = make_trainer(0, 1, cfg)
    summary = trainer.fit()  # 3 steps of 8 = the whole epoch of 24: both bad records met
    assert summary["steps"] == 3
    tally = trainer.loader.bad_records
    assert sorted(tally.reasons) == [2, 17] and tally.events == 2
    lines = (tmp_path / "out" / "t" / "bad_records.rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [2, 17]


def test_skip_policy_stops_past_max_bad_fraction(tmp_path, capsys) -> None:
    rec = _set_with_bad_jpeg(tmp_path / "data", bad=(2, 17))
    cfg = _train_cfg(rec.parent, tmp_path / "out", on_bad="skip", max_bad_fraction=0.01)
    with pytest.raises(TooManyBadRecords, match="more than data.max_bad_fraction=0.01"):
        make_trainer(0, 1, cfg).fit()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_train_cfg(rec.parent, tmp_path / "cli", on_bad="skip", max_bad_fraction=0.01)))
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fr-trainer train: error: rank 0: 1 bad record skipped") and "\n" not in err


def test_error_policy_in_training_is_one_line_with_exit_status_2(tmp_path, capsys) -> None:
    rec = _set_with_bad_jpeg(tmp_path / "data", bad=(2, 17))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_train_cfg(rec.parent, tmp_path / "out")))
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fr-trainer train: error: bad training record at index ")
    assert f"fr-trainer check-data {rec.parent}" in err and "data.on_bad=skip" in err


def test_on_bad_and_max_bad_fraction_are_validated(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data.on_bad='drop' is not one of 'error', 'skip'"):
        config_from_dict({"data": {"on_bad": "drop"}})
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction must be in \[0, 1\), got 1.5"):
        config_from_dict({"data": {"max_bad_fraction": 1.5}})
    assert config_from_dict({}).data.on_bad == "error"


def test_start_up_errors_say_what_is_wrong(tmp_path) -> None:
    rec = write_rec(tmp_path / "d", labels_of(2, 2))
    cfg = config_from_dict({"data": {"root": str(rec.parent)}})
    rec.with_suffix(".idx").unlink()
    with pytest.raises(ConfigError, match=rf"has train.rec but no train.idx.*fr-trainer pack --reindex {rec}"):
        open_dataset(cfg)
    assert pack_main(["--reindex", str(rec)]) == 0
    assert len(open_dataset(cfg)) == 4
    corrupt(rec, 0, b"XXXX")  # the header record's magic
    with pytest.raises(ConfigError) as caught:
        open_dataset(cfg)
    assert "num_classes" not in str(caught.value) and "bad magic" in str(caught.value)
    assert f"fr-trainer check-data {rec.parent}" in str(caught.value)
    cfg = config_from_dict({"data": {"root": str(rec.parent), "num_classes": 3}})
    write_rec(tmp_path / "d", labels_of(2, 2))
    with pytest.raises(ConfigError, match="data.num_classes does not fit the data: num_classes=3 but"):
        open_dataset(cfg)


def test_reindex_rebuilds_the_index_and_keeps_it_on_a_damaged_rec(tmp_path, capsys) -> None:
    rec = write_rec(tmp_path, labels_of(2, 3))
    idx = rec.with_suffix(".idx")
    original = idx.read_text()
    idx.write_text("0\t0\n")
    assert pack_main(["--reindex", str(rec)]) == 0
    assert idx.read_text() == original and "indexed 9 records" in capsys.readouterr().out
    corrupt(rec, image_offset(rec, 2), b"XXXX")
    assert pack_main(["--reindex", str(rec)]) == 1
    assert idx.read_text() == original and "bad magic" in capsys.readouterr().out
    assert pack_main(["--reindex", str(tmp_path / "none.rec")]) == 2


def _fake_nvjpeg(datas, device, size):
    """Stands in for nvJPEG on a CPU machine: refuses the whole batch when one image is bad."""
    from fr_trainer.data.decode import decode_rgb

    try:
        pixels = [decode_rgb(data.numpy().tobytes(), size) for data in datas]
    except Exception as error:
        raise RuntimeError(f"nvjpeg: decode failed ({error})") from None
    return torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pixels]).to(device)


def _gpu_path_loader(dataset, tally, monkeypatch):
    """The decode="gpu" PrefetchLoader on the CPU, its nvJPEG faked."""
    from torch.utils.data import DataLoader

    from fr_trainer.data import loader as loader_module
    from fr_trainer.data.bad_records import with_skips

    monkeypatch.setattr(loader_module, "decode_jpeg_batch_gpu", _fake_nvjpeg)
    dataset.output = "bytes"
    data_loader = DataLoader(dataset, batch_size=4, collate_fn=with_skips(loader_module._collate_bytes, dataset))
    return loader_module.PrefetchLoader(data_loader, torch.device("cpu"), "gpu", 112, tally)


def test_gpu_decode_path_finds_the_bad_image_of_a_refused_batch(tmp_path, monkeypatch) -> None:
    from fr_trainer.data.decode import jpeg_problem

    noise = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    truncated = encode_image(noise, "JPEG")[:3000]  # cut in the entropy-coded data
    assert jpeg_problem(truncated) is None  # its header is fine: only a full decode finds it
    labels = labels_of(CLASSES, PER_CLASS)
    rec = write_rec(tmp_path / "a", labels, {6: truncated})
    offset = image_offset(rec, 6)
    with pytest.raises(BadRecordError, match=rf"index 6: .*key 7 at offset {offset}: image of 3000 bytes does not"):
        list(_gpu_path_loader(RecordDataset(rec, flip=False), None, monkeypatch))  # found by the fallback
    rec = write_rec(tmp_path / "b", labels, {1: b"\xff\xd8 not a jpeg", 6: truncated})
    with pytest.raises(BadRecordError, match=r"index 1: .*key 2 at offset \d+: image of 13 bytes"):
        list(_gpu_path_loader(RecordDataset(rec, flip=False), None, monkeypatch))  # by the header check
    tally = BadRecordTally(len(labels), 0.5, 0, rec)
    batches = list(_gpu_path_loader(RecordDataset(rec, flip=False, on_bad="skip"), tally, monkeypatch))
    assert sorted(tally.reasons) == [1, 6] and {tuple(images.shape) for images, _ in batches} == {(4, 3, 112, 112)}
    got = torch.cat([batch_labels for _, batch_labels in batches]).tolist()
    expected = [int(x) for x in labels]
    expected[1], expected[6] = expected[2], expected[7]  # each replaced by the next good image
    assert got == expected


def _rank_skips(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    trainer.fit()
    shard = sorted(int(i) for i in trainer.loader.sampler.indices())
    return {"skipped": sorted(trainer.loader.bad_records.reasons), "shard": shard}


def test_every_rank_counts_the_bad_records_of_its_shard(tmp_path) -> None:
    from fr_trainer.distributed.spawn import run_ranks

    rec = _set_with_bad_jpeg(tmp_path / "data", bad=(2, 17))
    cfg = config_dict(rec.parent, tmp_path / "out", data={"batch_size": 4, "num_workers": 0, "on_bad": "skip",
                                                          "max_bad_fraction": 0.1}, train={"max_steps": 3})
    results = run_ranks(_rank_skips, 2, cfg)  # 3 steps x 4 x 2 ranks = the epoch of 24
    for rank, result in enumerate(results):
        assert result["skipped"] == [i for i in (2, 17) if i in result["shard"]], rank
        log = tmp_path / "out" / "t" / f"bad_records.rank{rank}.jsonl"
        logged = [json.loads(line)["index"] for line in log.read_text().splitlines()] if log.exists() else []
        assert sorted(logged) == result["skipped"]
    assert [result["skipped"] for result in results] == [[2], [17]]  # seed 3: one in each shard


def _rank_errors(rank: int, world_size: int, cfg: dict) -> str:
    from fr_trainer.data.bad_records import BadRecordError
    from fr_trainer.train.peer_failure import PeerFailed

    trainer = make_trainer(rank, world_size, cfg)
    try:
        trainer.fit()
    except (BadRecordError, PeerFailed) as error:
        return f"{type(error).__name__}: {error}"
    return "finished"


def test_a_bad_record_on_one_rank_is_named_on_every_rank(tmp_path) -> None:
    """The rank that reads the record raises its one line; its peer, whose collective then
    fails, raises that rank's message (not gloo's "connection closed")."""
    from fr_trainer.distributed.spawn import run_ranks

    rec = _set_with_bad_jpeg(tmp_path / "data", bad=(17,))  # in rank 1's shard (seed 3)
    cfg = config_dict(rec.parent, tmp_path / "out", data={"batch_size": 4, "num_workers": 0},
                      train={"max_steps": 3})
    first, second = run_ranks(_rank_errors, 2, cfg)
    assert second.startswith("BadRecordError: ") and "index 17" in second, second
    assert first.startswith("PeerFailed: rank 1 stopped: ") and "index 17" in first, first
