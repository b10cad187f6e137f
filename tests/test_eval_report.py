"""`fr-trainer eval MODEL ROOT`: finds every kind of set and writes one report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fr_trainer.eval.report import discover


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from fr_trainer.data.synth_megaface import write_megaface_tree
    from fr_trainer.eval.binset import write_bin
    from fr_trainer.eval.synthetic import make_mini_ijb

    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    write_bin(root / "tiny.bin", rng.integers(0, 256, (40, 112, 112, 3), dtype=np.uint8), [True, False] * 10)
    make_mini_ijb(
        root / "IJBC",
        num_subjects=4,
        templates_per_subject=2,
        medias_per_template=1,
        images_per_media=2,
        impostors_per_genuine=2,
    )
    tree = write_megaface_tree(root, num_identities=3, images_per_identity=3, num_distractors=30)
    shutil.copytree(tree / "facescrub", root / "people")
    return root


def test_discover_finds_each_kind_once(root) -> None:
    found = discover(root)
    assert found.bins == [root / "tiny.bin"]
    assert found.ijb == [(root / "IJBC", "IJBC")]
    assert found.megaface == [root / "MegaFace"]
    assert found.folders == [root / "people"]  # facescrub/ belongs to the MegaFace tree


def test_eval_writes_one_report_with_plots(root, tmp_path, capsys) -> None:
    from torch import nn

    from fr_trainer.cli import main
    from fr_trainer.eval.synthetic import export_onnx_simple

    model = export_onnx_simple(nn.Sequential(nn.AvgPool2d(28), nn.Flatten()).eval(), tmp_path / "m.onnx")
    out = tmp_path / "report"
    assert (
        main(["eval", str(model), str(root), "--out", str(out), "--quiet", "--providers", "CPUExecutionProvider"]) == 0
    )
    text = (out / "report.md").read_text()
    for section in ("1:1 verification", "IJB 1:1", "MegaFace-style identification", "All-pairs verification", "n/r"):
        assert section in text
    report = json.loads((out / "report.json").read_text())
    assert [len(report[k]) for k in ("verify", "ijb", "megaface", "allpairs")] == [1, 1, 1, 1]
    assert report["verify"][0]["far_resolvable"] == {"0.001": False, "0.0001": False}  # 10 impostor pairs
    assert all(Path(plot).is_file() and Path(plot).stat().st_size > 0 for plot in report["plots"])
    assert any(p.endswith("_cmc.png") for p in report["plots"])


def test_empty_root_is_a_clear_error(tmp_path, capsys) -> None:
    from fr_trainer.cli import main

    (tmp_path / "m.onnx").write_bytes(b"")
    assert main(["eval", str(tmp_path / "m.onnx"), str(tmp_path), "--quiet"]) == 1
    assert "no evaluation set under" in capsys.readouterr().err
