"""`fr-trainer pack`: class-per-folder tree -> insightface-layout .rec; bad images reported."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fr_trainer.data.bench import main as bench_main
from fr_trainer.data.dataset import RecordDataset
from fr_trainer.data.layout import read_layout
from fr_trainer.data.pack import pack_image_folder
from fr_trainer.data.pack_cli import main as pack_main
from fr_trainer.data.recordio import RecordReader, unpack


def _save(path, colour, fmt="JPEG", size=(112, 112)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "images"
    stored = {}
    stored["alice/1.jpg"] = _save(root / "alice" / "1.jpg", (200, 10, 10))
    stored["alice/2.jpg"] = _save(root / "alice" / "2.jpg", (190, 20, 10))
    (root / "alice" / "3.jpg").write_bytes(b"\xff\xd8\xff garbage")  # does not decode
    _save(root / "bob" / "1.bmp", (10, 200, 10), fmt="BMP")  # re-encoded as JPEG
    stored["bob/2.png"] = _save(root / "bob" / "2.png", (10, 190, 20), fmt="PNG")
    (root / "carol").mkdir()
    (root / "carol" / "1.jpg").write_bytes(_save(root / "x.jpg", (1, 2, 3))[:40])  # truncated
    stored["dave/1.jpg"] = _save(root / "dave" / "1.jpg", (10, 10, 200))
    (root / "dave" / "notes.txt").write_text("ignored: not an image suffix")
    return root, stored


@pytest.mark.parametrize("workers", [0, 2])
def test_pack_writes_insightface_layout_and_reports_bad_images(
    tree, tmp_path, capsys, workers
) -> None:
    root, stored = tree
    out = tmp_path / f"out{workers}"
    summary = pack_image_folder(root, out, workers=workers, progress=False)
    assert summary.num_images == 5 and summary.num_classes == 3
    assert sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p, _ in summary.bad) == [
        "alice/3.jpg",
        "carol/1.jpg",
    ]
    assert summary.dropped_classes == ["carol"]
    stderr = capsys.readouterr().err
    assert "skipped" in stderr and "alice/3.jpg" in stderr and "carol/1.jpg" in stderr
    report = (out / "bad_images.txt").read_text()
    assert "alice/3.jpg" in report and "carol\tclass dropped" in report
    assert (out / "classes.txt").read_text() == "0\talice\n1\tbob\n2\tdave\n"
    reader = RecordReader(out / "train.rec", out / "train.idx")
    layout = read_layout(reader)
    assert layout.insightface and layout.num_images == 5 and layout.num_classes == 3
    np.testing.assert_array_equal(layout.identity_ranges, [[1, 3], [3, 5], [5, 6]])
    payloads = [unpack(reader.read(key)) for key in range(1, 6)]
    assert [int(h.label) for h, _ in payloads] == [0, 0, 1, 1, 2]
    assert payloads[0][1] == stored["alice/1.jpg"] and payloads[3][1] == stored["bob/2.png"]
    assert Image.open(io.BytesIO(payloads[2][1])).format == "JPEG"  # the BMP, re-encoded
    dataset = RecordDataset(out / "train.rec", flip=False)
    image, label = dataset[4]
    assert int(label) == 2 and image[2].mean() > 0.5  # dave's blue image


def test_pack_resizes_when_asked(tree, tmp_path) -> None:
    root, _ = tree
    _save(root / "erin" / "big.jpg", (50, 60, 70), size=(250, 250))
    summary = pack_image_folder(root, tmp_path / "out", workers=0, image_size=112, progress=False)
    reader = RecordReader(tmp_path / "out" / "train.rec", tmp_path / "out" / "train.idx")
    _, data = unpack(reader.read(summary.num_images))
    assert Image.open(io.BytesIO(data)).size == (112, 112)
    assert (tmp_path / "out" / "property").read_text() == "4,112,112\n"


def test_cli_strict_and_missing_folder(tree, tmp_path, capsys) -> None:
    root, _ = tree
    assert pack_main([str(root), str(tmp_path / "o"), "--workers", "0", "--no-progress"]) == 0
    assert "5 images of 3 classes" in capsys.readouterr().out
    assert (
        pack_main([str(root), str(tmp_path / "o2"), "--workers", "0", "--no-progress", "--strict"])
        == 1
    )
    assert pack_main([str(tmp_path / "nowhere"), str(tmp_path / "o3")]) == 2
    assert "fr-trainer pack: error: " in (err := capsys.readouterr().err) and "does not exist" in err


def test_bench_data_runs_on_a_given_root(tmp_path, capsys) -> None:
    from fr_trainer.data.synthetic import generate

    generate(
        tmp_path / "s",
        num_identities=4,
        images_per_identity=8,
        num_pairs=0,
        num_ijbc_subjects=0,
        workers=0,
    )
    assert (
        bench_main(
            [
                "--root",
                str(tmp_path / "s"),
                "--workers",
                "1",
                "--batch-size",
                "4",
                "--max-images",
                "16",
                "--pipelines",
                "torch,pack",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| torch | 1 |" in text and "| pack | 1 |" in text
    assert (tmp_path / "b.json").is_file()
