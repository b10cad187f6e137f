"""`fr-trainer check-data`: a clean set passes; every kind of bad record and index problem is
listed with its index/key/offset; parallel equals serial; exit status 0 / 1 / 2."""

from __future__ import annotations

import json

import pytest
from rec_helpers import corrupt, image_offset, jpeg, labels_of, shrink_payload, write_rec
from synth_helpers import tiny_training_set

from fr_trainer.data.check import check_dataset
from fr_trainer.data.check_cli import main as check_main
from fr_trainer.data.recordio import RecordReader


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_training_set(tmp_path_factory.mktemp("synth"), 5, 4, seed=2)


def test_clean_synthetic_set_passes_with_exit_0(synth, tmp_path, capsys) -> None:
    report_path = tmp_path / "report.json"
    code = check_main([str(synth), "--workers", "2", "--report", str(report_path), "--no-progress"])
    assert code == 0 and "clean" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["ok"] is True and report["bad"] == [] and report["problems"] == []
    assert report["images"] == report["checked"] == 20 and report["classes"] == 5
    assert report["insightface"] is True
    assert report["records_in_index"] == report["records_in_rec"] == 1 + 20 + 5


def _damaged_set(root):
    """Images 0..11 of 3 classes; 2: not a JPEG, 4: label out of range, 6: 96x96, 8: label of
    another class than its identity record, 10: bad magic, 11: payload shorter than a header."""
    classes = [int(x) for x in labels_of(3, 4)]
    labels = [float(c) for c in classes]
    labels[4], labels[8] = 7.0, 0.0
    rec = write_rec(root, labels, {2: b"\xff\xd8 not a jpeg", 6: jpeg(96)}, classes=classes)
    corrupt(rec, image_offset(rec, 10), b"XXXX")
    shrink_payload(rec, 11, 8)
    return rec


EXPECTED_REASONS = {
    2: "image of 13 bytes does not decode",
    4: "label 7 is outside [0, 3) of the header record",
    6: "image is 96x96, expected 112x112",
    8: "label 0 but its identity record says class 2",
    10: "bad magic 0x58585858",
    11: "payload of 8 bytes is shorter than the 24-byte IRHeader",
}


@pytest.mark.parametrize("workers", [0, 3])
def test_every_bad_record_is_listed_with_index_key_offset(tmp_path, workers) -> None:
    rec = _damaged_set(tmp_path)
    report = check_dataset(tmp_path, workers=workers, chunk_size=2)
    assert not report.ok and report.checked == 12
    assert [bad.index for bad in report.bad] == sorted(EXPECTED_REASONS)
    for bad in report.bad:
        assert bad.key == bad.index + 1 and bad.offset == image_offset(rec, bad.index)
        assert EXPECTED_REASONS[bad.index] in bad.reason, bad
    # magic 10 broken: the walk of the .rec stops there; that is reported too
    assert any("the .rec is damaged after 11 records" in text for text in report.problems)


def test_cli_exit_1_and_report_on_problems(tmp_path, capsys) -> None:
    _damaged_set(tmp_path / "d")
    report_path = tmp_path / "out" / "r.json"
    code = check_main([str(tmp_path / "d"), "--workers", "0", "--report", str(report_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "PROBLEMS: 6 bad record(s)" in out and "index 4 (key 5 at offset" in out
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["bad_count"] == 6
    assert {bad["index"]: bad["reason"] for bad in report["bad"]}[6] == "image is 96x96, expected 112x112"
    assert check_main([str(tmp_path / "d"), "--workers", "0", "--image-size", "0", "--no-progress"]) == 1
    assert "5 bad record(s)" in capsys.readouterr().out  # any image size allowed: 6 is fine


def test_index_problems_are_found(tmp_path) -> None:
    rec = write_rec(tmp_path, labels_of(2, 3))
    idx = rec.with_suffix(".idx")
    with RecordReader(rec, idx) as reader:
        offsets = {key: reader.offset(key) for key in reader.keys}
    lines = [f"{key}\t{offsets[key]}" for key in sorted(offsets)]
    lines[2] = f"2\t{offsets[2] + 4}"  # not at a record start
    lines[3] = f"3\t{offsets[1]}"  # the same offset as key 1
    del lines[-1]  # one record less than the .rec holds
    idx.write_text("\n".join(lines) + "\n")
    report = check_dataset(tmp_path, workers=0)
    text = "\n".join(report.problems)
    assert f"key 2 points at offset {offsets[2] + 4}, which is not the start of a record" in text
    assert f"keys 1 and 3 both point at offset {offsets[1]}" in text
    assert "lists 8 records but" in text and "holds 9" in text
    assert not report.ok


def test_identity_records_that_do_not_tile_the_images(tmp_path) -> None:
    write_rec(tmp_path, labels_of(2, 2), classes=[0, 0, 1, 1])
    # class 1's identity record (key 6) claims [4, 5): image key 3 belongs to no class
    from fr_trainer.data.recordio import IRHeader, RecordWriter, pack

    labels = labels_of(2, 2)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack(IRHeader(0, [5, 7], 0, 0)))
        for key, label in enumerate(labels, 1):
            writer.write(key, pack(IRHeader(0, label, key, 0), jpeg()))
        writer.write(5, pack(IRHeader(0, [1, 3], 0, 0)))
        writer.write(6, pack(IRHeader(0, [4, 5], 0, 0)))
    report = check_dataset(tmp_path, workers=0)
    assert any("class 1 starts at image key 4, expected 3" in text for text in report.problems)


def test_file_without_header_uses_every_key(tmp_path) -> None:
    from fr_trainer.data.recordio import IRHeader, RecordWriter, pack

    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key, label in enumerate([0.0, 1.0, -1.0, 2.5, 3.0]):
            writer.write(key, pack(IRHeader(0, label, key, 0), jpeg()))
    report = check_dataset(tmp_path, workers=0)
    assert not report.insightface and report.images == 5 and report.classes == 4
    assert [(bad.index, bad.key) for bad in report.bad] == [(2, 2), (3, 3)]
    assert all("is not a class index" in bad.reason for bad in report.bad)


def test_broken_header_is_one_problem_and_the_images_are_still_checked(tmp_path) -> None:
    rec = write_rec(tmp_path, labels_of(2, 3), {4: b"junk"})
    corrupt(rec, 0, b"XXXX")  # the magic of the header record 0
    report = check_dataset(tmp_path, workers=0)
    assert len(report.problems) == 2  # the header, and the .rec walk that stops at it
    assert any("record 0 (the header) does not read" in text for text in report.problems)
    assert [(bad.index, bad.key) for bad in report.bad] == [(4, 5)]  # identity records not flagged
    assert "does not decode" in report.bad[0].reason


def test_bad_arguments_exit_2(tmp_path, capsys) -> None:
    assert check_main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    rec = write_rec(tmp_path, labels_of(2, 2))
    rec.with_suffix(".idx").unlink()
    assert check_main([str(tmp_path)]) == 2
    assert f"fr-trainer pack --reindex {rec}" in capsys.readouterr().err
    assert check_main([str(tmp_path), "--rec", "other.rec"]) == 2
    with pytest.raises(SystemExit) as exited:
        check_main([str(tmp_path), "--workers", "-1"])
    assert exited.value.code == 2


def test_registered_as_a_command() -> None:
    from fr_trainer.cli import COMMANDS, USAGE

    assert COMMANDS["check-data"] == "fr_trainer.data.check_cli:main" and "check-data ROOT" in USAGE
