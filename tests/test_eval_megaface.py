"""MegaFace-style identification/verification: brute-force checks, the cache, the CLI on the synth tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fr_trainer.eval.allpairs import allowed_false_accepts
from fr_trainer.eval.megaface import distractor_counts, identification, verification
from fr_trainer.eval.metrics import tar_at_far


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def small_set(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(6), 4)
    centres = rng.standard_normal((6, 16))
    probes = unit(centres[labels] + 0.9 * rng.standard_normal((24, 16)))
    distractors = unit(rng.standard_normal((400, 16)))
    return probes, labels, distractors


def test_counts_are_powers_of_ten_then_all() -> None:
    assert distractor_counts(1_000_000) == [10, 100, 1000, 10_000, 100_000, 1_000_000]
    assert distractor_counts(499) == [10, 100, 499]


def test_cmc_equals_brute_force_ranks() -> None:
    probes, labels, distractors = small_set()
    cmc = identification(probes, labels, distractors, [10, 100, 400])
    scores_pp = torch.mm(torch.from_numpy(probes), torch.from_numpy(probes).T).numpy()
    scores_pd = torch.mm(torch.from_numpy(probes), torch.from_numpy(distractors).T).numpy()
    for n in (10, 100, 400):
        ranks = []
        for p in range(len(probes)):
            for g in np.flatnonzero(labels == labels[p]):
                if g != p:
                    ranks.append(1 + int((scores_pd[p, :n] >= scores_pp[p, g]).sum()))
        ranks = np.array(ranks)
        assert cmc[n] == {r: float((ranks <= r).mean()) for r in range(1, 11)}
    assert cmc[10][1] >= cmc[400][1]  # more distractors never help


def test_verification_equals_brute_force_tar() -> None:
    probes, labels, distractors = small_set(1)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    result = verification(probes, labels, distractors, fars)
    pp = torch.mm(torch.from_numpy(probes), torch.from_numpy(probes).T).numpy()
    pd = torch.mm(torch.from_numpy(probes), torch.from_numpy(distractors).T).numpy()
    i, j = np.triu_indices(len(probes), k=1)
    same = labels[i] == labels[j]
    scores = np.concatenate([pp[i[same], j[same]], pd.reshape(-1)]).astype(np.float64)
    genuine = np.concatenate([np.ones(same.sum(), bool), np.zeros(pd.size, bool)])
    assert result["tar_at_far"] == tar_at_far(scores, genuine, fars, mode="max")
    impostors = np.sort(pd.reshape(-1))[::-1]
    for far in fars:
        assert result["threshold"][far] == impostors[allowed_false_accepts(far, impostors.size)]
    assert result["num_impostors"] == 24 * 400
    assert result["far_resolvable"] == {1e-4: False, 1e-3: True, 1e-2: True, 1e-1: True}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from fr_trainer.data.synth_megaface import write_megaface_tree

    return write_megaface_tree(
        tmp_path_factory.mktemp("mf"), num_identities=4, images_per_identity=3, num_distractors=60, seed=0
    )


def pooled_model(path, kernel: int):
    from torch import nn

    from fr_trainer.eval.synthetic import export_onnx_simple

    return export_onnx_simple(nn.Sequential(nn.AvgPool2d(kernel), nn.Flatten()).eval(), path)


def test_cli_runs_on_the_synth_tree_and_reuses_the_cache_only_for_the_same_model(tree, tmp_path, capsys) -> None:
    from fr_trainer.cli import main

    model_a = pooled_model(tmp_path / "a.onnx", 28)
    model_b = pooled_model(tmp_path / "b.onnx", 16)
    cache = tmp_path / "cache"
    common = [
        "--probes",
        str(tree / "facescrub"),
        "--distractors",
        str(tree / "megaface"),
        "--noise",
        str(tree / "noise.txt"),
        "--cache",
        str(cache),
        "--quiet",
        "--providers",
        "CPUExecutionProvider",
    ]
    assert main(["megaface", str(model_a), *common, "--json", str(tmp_path / "a1.json")]) == 0
    first = json.loads((tmp_path / "a1.json").read_text())
    assert first["distractors"] == 59  # one listed in noise.txt
    assert set(first["cmc"]) == {"10", "59"} and not first["distractor_cache_reused"]
    assert main(["megaface", str(model_a), *common, "--json", str(tmp_path / "a2.json")]) == 0
    second = json.loads((tmp_path / "a2.json").read_text())
    assert second["distractor_cache_reused"] and second["cmc"] == first["cmc"]
    assert main(["megaface", str(model_b), *common, "--json", str(tmp_path / "b.json")]) == 0
    assert not json.loads((tmp_path / "b.json").read_text())["distractor_cache_reused"]
    assert len(list(cache.glob("distractors_*.npy"))) == 2
    out = capsys.readouterr().out
    assert "rank-1" in out and "n/r" in out  # 12 x 59 impostor pairs cannot resolve 1e-6


def test_allpairs_cli_on_the_probe_tree(tree, tmp_path, capsys) -> None:
    from fr_trainer.cli import main

    model = pooled_model(tmp_path / "m.onnx", 28)
    assert (
        main(
            [
                "allpairs",
                str(model),
                "--root",
                str(tree / "facescrub"),
                "--quiet",
                "--fars",
                "1e-9",
                "0.1",
                "--providers",
                "CPUExecutionProvider",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_genuine"] == 4 * 3 and result["num_impostors"] == 12 * 11 // 2 - 12
    assert result["resolvable"] == {"1e-09": False, "0.1": True}


def test_missing_directories_are_named(tmp_path, capsys) -> None:
    from fr_trainer.cli import main

    model = pooled_model(tmp_path / "m.onnx", 56)
    assert (
        main(
            [
                "megaface",
                str(model),
                "--probes",
                str(tmp_path / "nope"),
                "--distractors",
                str(tmp_path),
                "--quiet",
                "--no-cache",
            ]
        )
        == 1
    )
    assert "nope" in capsys.readouterr().err
