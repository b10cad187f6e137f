"""The seams around the trainer: load_backbone for export/verify, the shards tool,
`fr-trainer bench train`."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from test_train_support import config_dict, make_data, make_trainer

from fr_trainer.train.bench import main as bench_main
from fr_trainer.train.checkpoint import load_backbone

TOOL = Path(__file__).resolve().parents[1] / "tools" / "checkpoint_shards.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    data = make_data(root / "data")
    cfg = config_dict(
        data,
        root / "out",
        model={"backbone": "demonet", "embedding_size": 16},
        train={"max_steps": 2},
    )
    trainer = make_trainer(0, 1, cfg)
    trainer.fit()
    return root / "out" / "t", trainer.state_snapshot()


def test_load_backbone_from_a_run_dir(run):
    run_dir, snapshot = run
    model = load_backbone(run_dir)
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot["backbone"][name]), name


def test_export_cli_reads_a_training_checkpoint(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from fr_trainer.export.cli import main as export_main

    run_dir, _ = run
    # the export CLI takes a file: a checkpoint's common.pt (or a merged file) holds the backbone
    common = run_dir / "checkpoints" / "step_00000002" / "common.pt"
    assert export_main([str(common), str(tmp_path / "m.onnx"), "--latency-runs", "0"]) == 0
    assert (tmp_path / "m.onnx").is_file()


def test_shards_tool_merge_split(run, tmp_path, monkeypatch, capsys):
    run_dir, _ = run
    for argv in (
        ["merge", str(run_dir), str(tmp_path / "m.pt")],
        ["split", str(tmp_path / "m.pt"), str(tmp_path / "s"), "--world-size", "3"],
    ):
        monkeypatch.setattr("sys.argv", [str(TOOL), *argv])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(TOOL), run_name="__main__")
        assert exit_info.value.code == 0
    assert len(list((tmp_path / "s").glob("step_*/shard_*_of_00003.pt"))) == 3


def test_bench_train_reports_throughput_and_shares(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench_main(
            [
                "--backbone",
                "demonet",
                "--embedding-size",
                "16",
                "--batch-size",
                "4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--num-classes",
                "50",
                "--world-size",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["samples_per_s"] > 0
    assert set(result["share"]) == {"data", "backbone", "head", "optimizer"}
    assert sum(result["share"].values()) == pytest.approx(1.0)
    assert "samples/s" in capsys.readouterr().out
    assert (result["channels_last"], result["compiled"]) == (False, False)  # off by default on CPU


def test_bench_train_runs_the_gpu_step_settings_bf16_head_and_channels_last(tmp_path, capsys):
    """The settings gpu_check.sh times on a GPU (bf16 autocast, bf16 head, NHWC) run here."""
    out = tmp_path / "bench.json"
    argv = ["--backbone", "iresnet18", "--embedding-size", "16", "--batch-size", "2", "--steps", "1",
            "--warmup", "1", "--num-classes", "50", "--precision", "bf16", "--head-dtype", "bf16",
            "--channels-last", "on", "--json", str(out)]
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["head_dtype"], result["channels_last"], result["precision"]) == ("bfloat16", True, "bf16")
    assert "head bfloat16, channels_last" in capsys.readouterr().out


def test_verification_sharded_over_ranks_equals_one_process(tmp_path):
    from test_train_support import make_data_with_pairs, rank_verify

    from fr_trainer.distributed.spawn import run_ranks
    from fr_trainer.eval.embedder import TorchEmbedder
    from fr_trainer.eval.verification import verify_bin

    data = make_data_with_pairs(tmp_path / "data")
    cfg = config_dict(
        data,
        tmp_path / "out",
        model={"backbone": "demonet", "embedding_size": 16},
        train={"max_steps": 4},
        eval={"every_steps": 2, "at_end": True, "at_start": True, "batch_size": 7,
              "bins": ["synth_val", "synth_hard"]},
    )
    results = run_ranks(rank_verify, 2, cfg)
    assert results[0] == results[1]
    assert set(results[0]["verification"]) == {"synth_val", "synth_hard"}
    embedder = TorchEmbedder(load_backbone(tmp_path / "out" / "t"), "cpu")
    for name, value in results[0]["verification"].items():
        alone = verify_bin(embedder, data / f"{name}.bin")
        assert value["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)
