"""Synthetic set: the files hold what they claim, the same seed gives the same bytes, and
aligning an IJB-C loose crop with its landmarks recovers the face."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from fr_trainer.data import faces
from fr_trainer.data.layout import read_labels, read_layout
from fr_trainer.data.recordio import RecordReader
from fr_trainer.data.synth_cli import main as synth_main
from fr_trainer.data.synthetic import generate, plan_pairs

SMALL = {
    "num_identities": 5,
    "images_per_identity": 3,
    "num_holdout_identities": 4,
    "num_pairs": 12,
    "num_ijbc_subjects": 4,
    "seed": 3,
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, workers=0, **SMALL)
    return out, summary


def test_train_rec_is_insightface_layout_with_the_claimed_counts(synth) -> None:
    out, summary = synth
    reader = RecordReader(out / "train.rec", out / "train.idx")
    layout = read_layout(reader)
    assert layout.insightface and layout.num_images == 15 == summary.num_images
    assert layout.num_classes == 5 == summary.num_classes
    assert len(reader) == 1 + 15 + 5
    np.testing.assert_array_equal(
        layout.identity_ranges, [[1 + 3 * c, 4 + 3 * c] for c in range(5)]
    )
    np.testing.assert_array_equal(
        read_labels(reader, layout.image_keys), np.repeat(np.arange(5), 3)
    )
    assert (out / "property").read_text() == "5,112,112\n"
    recorded = json.loads((out / "summary.json").read_text())
    assert recorded["num_images"] == 15 and recorded["bins"] == {"synth_val": 12, "synth_hard": 12}


def test_bin_files_hold_pairs_of_jpegs_half_genuine(synth) -> None:
    out, _ = synth
    for name in ("synth_val", "synth_hard"):
        with open(out / f"{name}.bin", "rb") as handle:
            bins, issame = pickle.load(handle, encoding="bytes")
        assert len(bins) == 24 and len(issame) == 12 and sum(issame) == 6
        assert all(isinstance(flag, bool) for flag in issame)
        for data in bins[:4]:
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "JPEG" and image.size == (112, 112)


def test_pairs_come_from_the_held_out_identities() -> None:
    holdout = np.arange(100, 110)
    pairs = plan_pairs(0, 0, holdout, 40)
    assert sum(same for _, _, same in pairs) == 20
    assert all(100 <= a < 110 and 100 <= b < 110 and (a == b) == same for a, b, same in pairs)


def _read_rows(path):
    return [line.split() for line in path.read_text().splitlines()]


def test_ijbc_tree_is_consistent(synth) -> None:
    out, summary = synth
    meta = out / "IJBC" / "meta"
    tid_mid = _read_rows(meta / "ijbc_face_tid_mid.txt")
    points = _read_rows(meta / "ijbc_name_5pts_score.txt")
    assert len(tid_mid) == len(points) == summary.ijbc_images > 0
    assert [row[0] for row in tid_mid] == [row[0] for row in points]
    for name, *_ in tid_mid:
        assert (out / "IJBC" / "loose_crop" / name).is_file()
    scores = np.array([float(row[11]) for row in points])
    assert len(points[0]) == 12 and ((0 < scores) & (scores < 1)).all()
    template_subject = {}
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"):
        with open(meta / name) as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0])[:3] == ["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"]
        for row in rows:
            template_subject[int(row["TEMPLATE_ID"])] = int(row["SUBJECT_ID"])
    assert set(template_subject) == {int(row[1]) for row in tid_mid}
    pairs = _read_rows(meta / "ijbc_template_pair_label.txt")
    assert {row[2] for row in pairs} == {"0", "1"}
    for a, b, label in pairs:
        assert (template_subject[int(a)] == template_subject[int(b)]) == (label == "1")


def test_same_seed_same_bytes_whatever_the_workers(synth, tmp_path) -> None:
    out, _ = synth
    again = tmp_path / "again"
    generate(again, workers=2, **SMALL)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "other"
    generate(other, workers=0, **{**SMALL, "seed": 4, "num_ijbc_subjects": 0, "num_pairs": 0})
    assert (other / "train.rec").read_bytes() != (out / "train.rec").read_bytes()


def _similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (least squares) mapping src [N,2] onto dst [N,2]."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append(([x, -y, 1, 0], u))
        rows.append(([y, x, 0, 1], v))
    a, b, tx, ty = np.linalg.lstsq(
        np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), rcond=None
    )[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_ijbc_landmarks_align_to_the_template(synth) -> None:
    out, _ = synth
    for row in _read_rows(out / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"):
        points = np.array(row[1:11], dtype=float).reshape(5, 2)
        with Image.open(out / "IJBC" / "loose_crop" / row[0]) as image:
            width, height = image.size
        assert (
            width != 112
            and (points >= 0).all()
            and (points[:, 0] < width).all()
            and (points[:, 1] < height).all()
        )
        transform = _similarity_lstsq(points, faces.TEMPLATE)
        aligned = points @ transform[:, :2].T + transform[:, 2]
        assert np.sqrt(((aligned - faces.TEMPLATE) ** 2).sum(1).mean()) < 8.0


def test_aligning_a_loose_render_with_its_landmarks_recovers_the_face() -> None:
    rng = np.random.default_rng(0)
    person = faces.sample_identity(rng)
    nuisance = dataclasses.replace(faces.sample_nuisance(rng), light_strength=0.0, occluder=None)
    reference, ref_points = faces.render(
        person, nuisance, faces.similarity(1.0, 0.0, (0, 0), (56, 56))
    )
    loose_transform = faces.similarity(1.6, 0.35, (12.0, -9.0), (100, 100))
    loose, loose_points = faces.render(person, nuisance, loose_transform, (200, 200))
    # Map aligned pixels into the loose crop (PIL samples at pixel centres: +0.5).
    m = _similarity_lstsq(ref_points, loose_points)
    a, b, c = m[0, 0], m[0, 1], m[0, 2] + 0.5 - 0.5 * (m[0, 0] + m[0, 1])
    d, e, f = m[1, 0], m[1, 1], m[1, 2] + 0.5 - 0.5 * (m[1, 0] + m[1, 1])
    warped = Image.fromarray(loose).transform(
        (112, 112), Image.AFFINE, (a, b, c, d, e, f), Image.BILINEAR
    )
    inner = (slice(35, 100), slice(25, 87))
    error = np.abs(np.asarray(warped, float)[inner] - reference.astype(float)[inner]).mean()
    other = faces.render(
        faces.sample_identity(np.random.default_rng(1)),
        nuisance,
        faces.similarity(1.0, 0.0, (0, 0), (56, 56)),
    )[0]
    baseline = np.abs(other.astype(float)[inner] - reference.astype(float)[inner]).mean()
    assert error < 8.0 and error < baseline / 3


def test_cli_writes_the_set_and_rejects_bad_arguments(tmp_path, capsys) -> None:
    assert (
        synth_main(
            [
                str(tmp_path / "s"),
                "--identities",
                "2",
                "--images-per-identity",
                "2",
                "--holdout-identities",
                "2",
                "--pairs",
                "2",
                "--ijbc-subjects",
                "0",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "train.rec 4 images of 2 classes" in capsys.readouterr().out
    assert synth_main([str(tmp_path / "t"), "--holdout-identities", "1"]) == 2
    assert "num_holdout_identities must be >= 2" in capsys.readouterr().err
