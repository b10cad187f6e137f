"""IJB: meta loading and its errors, template pooling against hand-computed features,
1:N identification by hand, and the whole pipeline (ONNX + `fr-trainer ijb`) on a tiny
tree written here."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fr_trainer.eval.align import TEMPLATE_112, apply_transform
from fr_trainer.eval.cli import ijb_main
from fr_trainer.eval.embedder import OnnxEmbedder, TorchEmbedder
from fr_trainer.eval.ijb import (
    evaluate_ijb,
    find_ijb_dir,
    identification,
    load_ijb_meta,
    pair_scores,
    read_1n_csv,
    template_features,
)
from fr_trainer.eval.synthetic import (
    IJBImage,
    export_onnx_simple,
    gray_code_net,
    gray_level,
    make_mini_ijb,
    write_ijb_tree,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- pooling


def test_template_features_hand_computed():
    rows = [  # (feature, template, media, det)
        ([1.0, 0.0, 0.0], 10, 1, 1.0),
        ([3.0, 4.0, 0.0], 7, 3, 1.0),
        ([0.0, 0.0, 2.0], 10, 2, 0.5),
        ([0.0, 1.0, 0.0], 10, 1, 0.5),
    ]
    feats = np.array([r[0] for r in rows])
    tids = np.array([r[1] for r in rows])
    mids = np.array([r[2] for r in rows])
    dets = np.array([r[3] for r in rows])
    templates, pooled = template_features(feats, tids, mids, dets)
    np.testing.assert_array_equal(templates, [7, 10])
    # template 10: media 1 = mean(1.0*[1,0,0], 0.5*[0,1,0]) = [.5,.25,0]; media 2 = [0,0,1]
    np.testing.assert_allclose(pooled[1], unit([0.5, 0.25, 1.0]), atol=1e-6)
    np.testing.assert_allclose(pooled[0], unit([3, 4, 0]), atol=1e-6)
    _, plain = template_features(feats, tids, mids, None)
    np.testing.assert_allclose(plain[1], unit([0.5, 0.5, 2.0]), atol=1e-6)


def test_template_features_match_a_plain_loop():
    rng = np.random.default_rng(0)
    m, d = 300, 8
    feats = rng.normal(size=(m, d))
    tids = rng.integers(0, 40, m)
    mids = tids * 100 + rng.integers(0, 4, m)
    dets = rng.uniform(0.3, 1.0, m)
    templates, pooled = template_features(feats, tids, mids, dets)
    for row, t in enumerate(templates):
        total = np.zeros(d)
        for media in np.unique(mids[tids == t]):
            sel = (tids == t) & (mids == media)
            total += (feats[sel] * dets[sel, None]).mean(axis=0)
        np.testing.assert_allclose(pooled[row], unit(total), atol=1e-5)


def test_pair_scores_and_unknown_templates():
    templates = np.array([3, 5, 9])
    feats = np.array([unit([1, 0]), unit([1, 1]), unit([0, 1])], dtype=np.float32)
    scores = pair_scores(templates, feats, np.array([3, 5, 3]), np.array([9, 9, 3]))
    np.testing.assert_allclose(scores, [0.0, np.sqrt(0.5), 1.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\[4\]"):
        pair_scores(templates, feats, np.array([3]), np.array([4]))


# ----------------------------------------------------------------------------- 1:N


def angle(deg):
    return [np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))]


def test_identification_hand_computed():
    gallery = np.array([angle(0), angle(90), angle(180), angle(45)])
    gallery_subjects = np.array([100, 200, 300, 300])  # subject 300 has two templates
    probes = np.array([angle(10), angle(60), angle(200), angle(30), angle(270)])
    probe_subjects = np.array([100, 200, 300, 999, 998])
    result = identification(
        probes, probe_subjects, gallery, gallery_subjects, fpirs=(1e-4, 0.5, 1.0)
    )
    # mates: p0 -> 100 best (cos 10°) rank 1; p1 -> 300 via 45° (cos 15°) beats 200 (cos 30°): rank 2;
    # p2 -> 300 (cos 20°) rank 1. Non-mated best scores: cos 15° and cos 90° = 0.
    assert result["num_mated"] == 3 and result["num_nonmated"] == 2
    assert result["rank"] == pytest.approx({1: 2 / 3, 5: 1.0, 10: 1.0})
    # FPIR 1e-4: threshold cos 15° = .966: only p0 (cos 10°) passes; 0.5: threshold 0: p0, p2
    assert result["tpir_at_fpir"] == pytest.approx({1e-4: 1 / 3, 0.5: 2 / 3, 1.0: 2 / 3})


def test_identification_ties_count_in_the_probes_favour():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = identification(np.array([[1.0, 1.0]]), np.array([2]), gallery, np.array([1, 2]))
    assert result["rank"][1] == 1.0
    assert np.isnan(result["tpir_at_fpir"][1e-4]) and result["tpir_at_fpir"][1.0] == 1.0


# ----------------------------------------------------------------------------- trees

SUBJECTS = 6


def gray_tree(root, contaminate: bool = True):
    """Uniform gray loose crops (subject s = gray level s), two templates per subject,
    each with two medias. Template 1 (subject 0) has a media holding a subject-1 image
    with det score 0.1 beside a subject-0 image with det score 0.9."""
    rng = np.random.default_rng(0)
    images, index = [], 0
    media = 0

    def add(subject, tid, mid, det):
        nonlocal index
        index += 1
        a = np.deg2rad(rng.uniform(-20, 20))
        s = rng.uniform(1.0, 1.3)
        matrix = np.array([[s * np.cos(a), -s * np.sin(a), 0], [s * np.sin(a), s * np.cos(a), 0]])
        matrix[:, 2] = 120 - matrix[:, :2] @ [56, 56]  # the crop stays inside the image
        image = np.full((240, 240, 3), gray_level(subject), dtype=np.uint8)
        points = apply_transform(matrix, TEMPLATE_112)
        images.append(IJBImage(f"{index}.png", tid, mid, image, points, det))

    subject_of = {}
    for s in range(SUBJECTS):
        for t in (1, 2):
            tid = 10 * s + t
            subject_of[tid] = s
            for _ in range(2):
                media += 1
                add(s, tid, media, float(rng.uniform(0.5, 1.0)))
    if contaminate:  # template 1 = subject 0, template 2 = subject 0 (clean), 11 = subject 1
        media += 1
        add(0, 1, media, 0.9)
        add(1, 1, media, 0.1)
    tids = sorted(subject_of)
    pairs = [
        (a, b, int(subject_of[a] == subject_of[b]))
        for i, a in enumerate(tids)
        for b in tids[i + 1 :]
    ]
    galleries = {
        "G1": {10 * s + 1: s for s in range(0, SUBJECTS, 2)},
        "G2": {10 * s + 1: s for s in range(1, SUBJECTS, 2)},
    }
    probes = {10 * s + 2: s for s in range(SUBJECTS)}
    write_ijb_tree(root, images, pairs, galleries, probes)
    return images, pairs


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return export_onnx_simple(gray_code_net(), tmp_path_factory.mktemp("m") / "gray.onnx")


def test_full_pipeline_scores_and_files(tmp_path, onnx_model):
    root = tmp_path / "ijb" / "IJBC"
    images, _ = gray_tree(root)
    out = tmp_path / "out"
    result = evaluate_ijb(
        OnnxEmbedder(onnx_model), tmp_path / "ijb", "IJBC", out_dir=out, batch_size=5
    )
    assert result["num_images"] == len(images) and result["num_templates"] == 2 * SUBJECTS
    data = np.load(out / "ijbc_scores.npz")
    score = {(int(a), int(b)): float(s) for a, b, s in zip(data["t1"], data["t2"], data["scores"])}
    # template 1 = media [s0 x det d1], media [s0 x det d2], media mean(0.9 * s0, 0.1 * s1);
    # medias summed, then normalised. By hand from the saved image features:
    meta = load_ijb_meta(root)
    f = data["image_features"]
    row_of = {name: i for i, name in enumerate(meta.image_names)}
    det = meta.det_scores
    a, b, c, d = (
        row_of[n] for n in ("1.png", "2.png", f"{len(images) - 1}.png", f"{len(images)}.png")
    )
    t1 = unit(det[a] * f[a] + det[b] * f[b] + (0.9 * f[c] + 0.1 * f[d]) / 2)
    k = [row_of[im.name] for im in images if im.template_id == 11]
    t11 = unit(sum((det[i] * f[i] for i in k[:1]), np.zeros_like(t1)) + det[k[1]] * f[k[1]])
    row = int(np.searchsorted(data["templates"], 1))
    np.testing.assert_allclose(data["template_features"][row], t1, atol=1e-6)
    assert score[(1, 11)] == pytest.approx(float(t1 @ t11), abs=1e-6)
    # and analytically: an image feature is ~2 * onehot(subject) (flip added)
    np.testing.assert_allclose(f[a], 2 * np.eye(f.shape[1])[0], atol=1e-3)
    t1_analytic = unit([2 * det[a] + 2 * det[b] + 0.9, 0.1])
    assert score[(1, 2)] == pytest.approx(t1_analytic[0], rel=1e-5)
    assert score[(1, 11)] == pytest.approx(t1_analytic[1], rel=1e-3)
    assert score[(11, 21)] == pytest.approx(0.0, abs=1e-6)
    assert score[(21, 22)] == pytest.approx(1.0, abs=1e-6)
    assert result["tar_at_far"] == pytest.approx(
        {f: 1.0 for f in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
    )
    ident = result["identification"]
    assert set(ident) == {"G1", "G2"}
    for gallery in ident.values():
        assert gallery["num_mated"] == 3 and gallery["num_nonmated"] == 3
        assert gallery["rank"][1] == 1.0
        assert gallery["tpir_at_fpir"][1.0] == 1.0
    with Image.open(out / "ijbc_roc.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    saved = json.loads((out / "ijbc_result.json").read_text())
    assert saved["tar_at_far"]["1e-06"] == 1.0


def test_ijb_cli_runs_and_reports(tmp_path, onnx_model, capsys):
    gray_tree(tmp_path / "tree", contaminate=False)
    code = ijb_main(
        [
            str(onnx_model),
            "--root",
            str(tmp_path / "tree"),
            "--target",
            "ijbc",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
            "--far-mode",
            "nearest",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "IJBC 1:1" in printed
        and "[nearest]" in printed
        and "IJBC 1:N G1: rank-1: 100.00" in printed
    )
    code = ijb_main([str(onnx_model), "--root", str(tmp_path / "nowhere"), "--quiet"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_meta_errors_name_the_file_and_the_expectation(tmp_path):
    root = tmp_path / "t"
    gray_tree(root, contaminate=False)
    meta = load_ijb_meta(root, "IJBC")
    assert len(meta.image_names) == meta.landmarks.shape[0] == meta.det_scores.size
    assert meta.landmarks.shape[1:] == (5, 2)
    assert find_ijb_dir(root, "IJBC") == root
    with pytest.raises(FileNotFoundError, match=r"no IJB meta directory.*IJBC/meta"):
        find_ijb_dir(tmp_path, "IJBC")  # neither tmp/meta nor tmp/IJBC/meta
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        load_ijb_meta(root, "IJBB")

    lmk = root / "meta" / "ijbc_name_5pts_score.txt"
    backup = lmk.read_text()
    lmk.write_text("".join(backup.splitlines(keepends=True)[:-1]))
    with pytest.raises(
        ValueError, match=r"ijbc_name_5pts_score\.txt has 23 landmark rows.*24 images"
    ):
        load_ijb_meta(root)
    lines = backup.splitlines(keepends=True)
    lmk.write_text("".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(ValueError, match=r"row 1: image '2.png'.*same image order"):
        load_ijb_meta(root)
    lmk.write_text(backup + "x.png 1 2 3\n")
    with pytest.raises(ValueError, match=r"line 25: 4 fields; expected 12"):
        load_ijb_meta(root)
    lmk.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing IJB meta file .*ijbc_name_5pts_score\.txt"
    ):
        load_ijb_meta(root)
    lmk.write_text(backup)

    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "1 12345 0\n")
    with pytest.raises(ValueError, match=r"template ids \[12345\] have no image"):
        load_ijb_meta(root)


def test_1n_csv_errors(tmp_path):
    bad = tmp_path / "g.csv"
    bad.write_text("TEMPLATE,SUBJECT\n1,2\n")
    with pytest.raises(ValueError, match="TEMPLATE_ID and SUBJECT_ID"):
        read_1n_csv(bad)
    bad.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,2,a\n1,3,b\n")
    with pytest.raises(ValueError, match="several subjects"):
        read_1n_csv(bad)
    with pytest.raises(FileNotFoundError, match="none.csv"):
        read_1n_csv(tmp_path / "none.csv")


def test_missing_image_and_missing_probe_file(tmp_path, onnx_model):
    root = tmp_path / "t"
    gray_tree(root, contaminate=False)
    embedder = TorchEmbedder(gray_code_net())
    (root / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    with pytest.raises(FileNotFoundError, match="ijbc_1N_probe_mixed.csv"):
        evaluate_ijb(embedder, root)
    assert evaluate_ijb(embedder, root, one_to_n=False)["identification"] is None
    (root / "loose_crop" / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"loose_crop/3\.png"):
        evaluate_ijb(embedder, root, one_to_n=False)


def test_mini_ijb_generator_round_trip(tmp_path):
    info = make_mini_ijb(
        tmp_path / "mini",
        num_subjects=4,
        templates_per_subject=2,
        medias_per_template=1,
        images_per_media=2,
        impostors_per_genuine=2,
    )
    meta = load_ijb_meta(tmp_path / "mini")
    assert len(meta.image_names) == info["num_images"] == 16
    assert meta.pair_labels.sum() == 4 and meta.pair_labels.size == info["num_pairs"] == 12
    result = evaluate_ijb(TorchEmbedder(gray_code_net()), tmp_path / "mini", batch_size=7)
    assert set(result["identification"]) == {"G1", "G2"}
    shutil.rmtree(tmp_path / "mini")
