"""tools/subcenter_clean.py on a real (tiny) subcenter_arcface run: the dominant sub-centre
per class, the samples beyond the angle threshold (checked against a brute-force loop),
the k = 1 merged checkpoint (centres and per-row optimizer state cut to the dominant
sub-centre, config switched to arcface) that an arcface run resumes from, and bad input."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch
from test_train_support import config_dict, make_data, make_trainer

from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.checkpoint_io import load_trusted
from fr_trainer.train.subcenter_clean import main

TOOL = Path(__file__).resolve().parents[1] / "tools" / "subcenter_clean.py"
K_SUB = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("subcenter")
    data = make_data(root / "data")
    cfg = config_dict(data, root / "out", head={"margin": "subcenter_arcface",
                                                "margin_args": {"s": 16.0, "m": 0.3, "k": K_SUB}},
                      train={"max_steps": 2})
    trainer = make_trainer(0, 1, cfg)
    trainer.fit()
    assert trainer.head.weight.shape[1:] == (K_SUB, 16)
    return data, root / "out" / "t", trainer.head.weight.detach().double().clone()


def _embeddings(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: three samples near sub-centre 1, one near sub-centre 2, one opposite to
    sub-centre 1 (and for class 0 a tie, one near 0 and one near 2: the lower index wins)."""
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(weight, dim=2)
    xs, ys = [], []
    for j in range(1, weight.shape[0]):
        for target in (unit[j, 1], unit[j, 1], unit[j, 1], unit[j, 2], -unit[j, 1]):
            xs.append(5.0 * target + 0.05 * torch.randn(weight.shape[2], generator=g, dtype=torch.float64))
            ys.append(j)
    for target in (unit[0, 0], unit[0, 2]):
        xs.append(3.0 * target)
        ys.append(0)
    return torch.stack(xs), torch.tensor(ys)


def _brute_force(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, max_angle: float):
    dominant = []
    for j in range(weight.shape[0]):
        votes = [0] * weight.shape[1]
        for i in range(len(y)):
            if int(y[i]) == j:
                cos = [float(torch.nn.functional.cosine_similarity(x[i], weight[j, c], dim=0))
                       for c in range(weight.shape[1])]
                votes[cos.index(max(cos))] += 1
        dominant.append(votes.index(max(votes)))
    noisy = []
    for i in range(len(y)):
        cos = float(torch.nn.functional.cosine_similarity(x[i], weight[int(y[i]), dominant[int(y[i])]], dim=0))
        if math.degrees(math.acos(max(-1.0, min(1.0, cos)))) > max_angle:
            noisy.append(i)
    return dominant, noisy


def test_clean_lists_the_far_samples_and_writes_the_dominant_centres(run, tmp_path, capsys) -> None:
    data, run_dir, weight = run
    x, y = _embeddings(weight)
    torch.save({"embeddings": x.float(), "labels": y}, tmp_path / "emb.pt")
    argv = [str(run_dir), str(tmp_path / "emb.pt"), "--noisy", str(tmp_path / "noisy.tsv"),
            "--out", str(tmp_path / "k1.pt")]
    assert main(argv) == 0
    dominant, noisy = _brute_force(x.float().double(), y, weight, 75.0)
    assert dominant[0] == 0 and all(d == 1 for d in dominant[1:])
    lines = (tmp_path / "noisy.tsv").read_text().splitlines()
    assert lines[0] == "index\tlabel\tangle_deg"
    assert [int(line.split("\t")[0]) for line in lines[1:]] == noisy
    classes = range(weight.shape[0] - 1)
    assert {5 * c + 4 for c in classes} <= set(noisy)  # every sample opposite to its dominant sub-centre
    assert not {5 * c + i for c in classes for i in range(3)} & set(noisy)  # none of those on it
    assert f"{len(noisy)} of {len(y)} samples" in capsys.readouterr().out

    merged = load_trusted(tmp_path / "k1.pt")
    rows = torch.arange(weight.shape[0])
    torch.testing.assert_close(merged["head"]["weight"].double(), weight[rows, torch.tensor(dominant)],
                               rtol=0, atol=0)
    (name, state), = merged["optim_head"].items()
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            assert value.shape == merged["head"]["weight"].shape
    assert merged["common"]["config"]["head"]["margin"] == "arcface"
    assert "k" not in merged["common"]["config"]["head"]["margin_args"]

    # an arcface run resumes from it at another world size's split (here 1 rank, from a 2-rank split)
    folder = ckpt.split_shards(tmp_path / "k1.pt", tmp_path / "k1_run" / "checkpoints", 2)
    cfg = config_dict(data, tmp_path / "resumed", head={"margin": "arcface", "margin_args": {"s": 16.0, "m": 0.3}},
                      train={"max_steps": 3}, checkpoint={"resume": str(folder)})
    trainer = make_trainer(0, 1, cfg)
    trainer.load(folder)
    torch.testing.assert_close(trainer.head.weight.detach().double(), merged["head"]["weight"].double(),
                               rtol=0, atol=0)


def test_clean_rejects_bad_input_in_one_line(run, tmp_path, capsys) -> None:
    _, run_dir, weight = run
    x, y = _embeddings(weight)
    torch.save({"embeddings": x, "labels": y + 1000}, tmp_path / "bad.pt")
    argv = [str(run_dir), str(tmp_path / "bad.pt"), "--noisy", str(tmp_path / "n.tsv"), "--out", str(tmp_path / "o.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "labels outside" in err and len(err.splitlines()) == 1
    assert main([*argv[:2], "--noisy", "n", "--out", "o", "--max-angle", "200"]) == 2
    assert "--max-angle 200" in capsys.readouterr().err


def test_the_tool_script_runs(run, tmp_path, monkeypatch) -> None:
    _, run_dir, weight = run
    x, y = _embeddings(weight)
    import numpy as np
    np.savez(tmp_path / "emb.npz", embeddings=x.numpy(), labels=y.numpy())
    monkeypatch.setattr("sys.argv", [str(TOOL), str(run_dir), str(tmp_path / "emb.npz"), "--noisy",
                                     str(tmp_path / "n.tsv"), "--out", str(tmp_path / "o.pt")])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert done.value.code == 0 and (tmp_path / "o.pt").is_file()


def test_a_sampled_subcenter_config_is_a_one_line_config_error(run, tmp_path) -> None:
    from fr_trainer.train.config import ConfigError

    data = run[0]
    cfg = config_dict(data, tmp_path / "o", head={"margin": "subcenter_arcface", "margin_args": {"k": 2},
                                                  "sample_rate": 0.5})
    with pytest.raises(ConfigError, match=r"^\[head\]: sample_rate=0.5 is not supported with 2 sub-centres"):
        make_trainer(0, 1, cfg)
