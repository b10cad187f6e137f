"""Bad input to the real `fr-trainer` entry point gives one line naming the key (or file),
the value and the fix, exit status 2, and no traceback.

Config mistakes are caught before any data is opened: those tests point data.root at a
folder that does not exist, so a config error is the only way to get their message.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from test_train_support import config_dict

from fr_trainer.backbones.registry import BACKBONES
from fr_trainer.cli import main


class FlatOutput(torch.nn.Module):
    """A "backbone" whose output is 1-dimensional [B] (one number per image)."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))[:, 0]


if "test_flat_output" not in BACKBONES:
    BACKBONES.register("test_flat_output")(lambda embedding_size=16: FlatOutput(embedding_size))


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"fr-trainer {command}: error: "), err
    return lines[0]


def _train(tmp_path, capsys, cfg: dict, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    args = ["train", str(path)]
    for assignment in overrides:
        args += ["--set", assignment]
    return _run(capsys, args)


def _no_data_config(tmp_path) -> dict:
    return config_dict(tmp_path / "no_data_here", tmp_path / "out")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("head.margin=arcfce", ["head.margin='arcfce' is not a margin", "'cosface'", "did you mean 'arcface'"]),
        ("model.backbone=iresnet5", ["model.backbone='iresnet5' is not a backbone", "did you mean 'iresnet50'"]),
        ("regularizer.name=centre", ["regularizer.name='centre' is not one of", "did you mean 'center'"]),
        ("train.precision=fp-16", ["train.precision='fp-16' is not one of", "did you mean 'fp16'"]),
    ],
)
def test_misspelt_names_name_the_key_and_the_nearest_choice(tmp_path, capsys, override, expected):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), override)
    line = _one_error_line(err, "train")
    assert code == 2
    for text in expected:
        assert text in line, line


def test_margin_arg_of_the_wrong_type_names_the_arg_its_type_and_the_defaults(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), 'head.margin_args={s="big", m=0.5}')
    line = _one_error_line(err, "train")
    assert code == 2
    assert "head.margin_args.s='big' must be a number, got str" in line
    assert "margin 'arcface' accepts s=64.0, m=0.5, easy_margin=False, gradient='exact'" in line


def test_unknown_margin_arg_names_it_and_the_accepted_ones(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), "head.margin_args={s=30.0, mm=0.5}")
    line = _one_error_line(err, "train")
    assert code == 2
    assert "head.margin_args.mm=0.5" in line and "did you mean 'm'" in line and "s=64.0, m=0.5" in line


def test_margin_arg_value_the_margin_rejects(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), "head.margin_args={s=-1.0}")
    line = _one_error_line(err, "train")
    assert code == 2 and "head.margin_args={'s': -1.0} for margin 'arcface'" in line and "positive" in line


@pytest.mark.parametrize(
    "override",
    ["train.epochs=inf", "optim.lr=nan", "optim.weight_decay=inf", "head.sample_rate=nan", "optim.betas=[0.9, inf]",
     "head.margin_args={s=inf}"],
)
def test_nan_and_inf_are_rejected_with_the_key(tmp_path, capsys, override):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), override)
    line = _one_error_line(err, "train")
    key, value = override.split("=", 1)
    if "{" in value:  # head.margin_args={s=inf}
        key, value = "head.margin_args.s", "inf"
    elif "[" in value:
        key, value = "optim.betas[1]", "inf"
    assert code == 2 and f"{key}={value} is not a finite number" in line, line
    if key == "train.epochs":
        assert "the default is 20.0" in line


def test_resume_from_a_file_names_checkpoint_resume(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02not a checkpoint at all")
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), f"checkpoint.resume={junk}")
    line = _one_error_line(err, "train")
    assert code == 2 and f"checkpoint.resume='{junk}' is a file" in line and "run directory" in line
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), f"checkpoint.resume={tmp_path / 'nothing'}")
    assert code == 2 and "does not exist" in _one_error_line(err, "train")


@pytest.fixture(scope="module")
def data(pairs_data):
    """These tests need the held-out `.bin` sets too."""
    return pairs_data


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run of one step (tiny linear backbone, D=16) with its checkpoint."""
    out = tmp_path_factory.mktemp("cli_errors_run")
    cfg = config_dict(data, out, train={"max_steps": 1})
    path = out / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path)]) == 0
    return cfg, out / "t"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.embedding_size=32", "this run has model.backbone='test_tinylinear', model.embedding_size=32"),
        ("model.backbone=test_flat_output", "this run has model.backbone='test_flat_output', model.embedding_size=16"),
    ],
)
def test_resuming_another_model_names_both_models(trained, tmp_path, capsys, override, expected):
    cfg, run_dir = trained
    code, err = _train(tmp_path, capsys, cfg, override)
    line = _one_error_line(err, "train")
    assert code == 2
    assert "was trained with model.backbone='test_tinylinear', model.embedding_size=16" in line
    assert expected in line and "checkpoint.resume=never" in line


def test_resuming_with_a_margin_of_another_shape_names_both_margins(trained, tmp_path, capsys):
    cfg, _ = trained
    code, err = _train(tmp_path, capsys, cfg, "head.margin=softmax", "head.margin_args={}")
    line = _one_error_line(err, "train")
    assert code == 2 and "head.margin='arcface'" in line and "head.margin='softmax'" in line and "bias" in line


def test_margin_value_that_needs_the_data_is_a_config_error(data, tmp_path, capsys):
    cfg = config_dict(data, tmp_path / "out", head={"margin": "coco", "margin_args": {"alpha": -1.0}})
    code, err = _train(tmp_path, capsys, cfg)
    line = _one_error_line(err, "train")
    assert code == 2 and "head.margin='coco'" in line and "'alpha': -1.0" in line


def _junk_files(tmp_path) -> list:
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    return [random_bytes, empty, tensor]


@pytest.mark.parametrize("command", ["verify", "export"])
def test_junk_checkpoint_file_names_the_file(tmp_path, capsys, command):
    for junk in _junk_files(tmp_path):
        tail = ["--bin", str(tmp_path / "a.bin")] if command == "verify" else [str(tmp_path / "o.onnx")]
        code, err = _run(capsys, [command, str(junk), *tail])
        line = _one_error_line(err, command)
        assert code == 2 and str(junk) in line, line
        assert "checkpoint" in line


def test_resume_from_a_truncated_checkpoint_names_the_file(trained, tmp_path, capsys):
    import shutil

    cfg, run_dir = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (common,) = copy.glob("checkpoints/step_*/common.pt")
    common.write_bytes(common.read_bytes()[:500])
    code, err = _train(tmp_path, capsys, cfg, f"checkpoint.resume={copy}")
    line = _one_error_line(err, "train")
    assert code == 2 and "no usable checkpoint" in line and str(common) in line, line
    code, err = _run(capsys, ["verify", str(copy), "--bin", str(tmp_path / "a.bin")])
    line = _one_error_line(err, "verify")
    assert code == 2 and str(common) in line and ("unreadable" in line or "not a readable" in line), line


def _checkpoint_of(tmp_path, module: torch.nn.Module, name: str):
    path = tmp_path / f"{name}.pt"
    torch.save({"backbone": module.state_dict(), "backbone_name": name, "backbone_kwargs": {}}, path)
    return path


def test_verify_rejects_a_one_dimensional_output(tmp_path, capsys, data):
    model = _checkpoint_of(tmp_path, FlatOutput(), "test_flat_output")
    code, err = _run(capsys, ["verify", str(model), "--bin", str(data / "synth_val.bin"), "--quiet"])
    line = _one_error_line(err, "verify")
    assert code == 2 and f"{model}: " in line and "output of shape [2]" in line and "expected embeddings [2, D]" in line


def test_verify_warns_about_a_small_embedding_and_goes_on(trained, capsys, data):
    _, run_dir = trained  # embedding_size 16
    code = main(["verify", str(run_dir), "--bin", str(data / "synth_val.bin"), "--quiet", "--nfolds", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "gives 16-dimensional embeddings" in warnings[0], captured.err
    assert "synth_val: accuracy" in captured.out


def test_errors_come_without_a_traceback_in_a_subprocess(tmp_path):
    import subprocess

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config_dict(tmp_path / "no_data_here", tmp_path / "out", model={"backbone": "demonet"})))
    out = subprocess.run(
        [sys.executable, "-m", "fr_trainer", "train", str(cfg), "--set", "head.margin=arcfce"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "head.margin='arcfce'" in out.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('regularizer.args={alpha="x"}', "regularizer.args.alpha='x' must be a number, got str; regularizer 'center' "
                                         "accepts alpha=0.5, update='paper'"),
        ("regularizer.args={alpah=0.5}", "regularizer.args.alpah=0.5: regularizer 'center' has no argument 'alpah' "
                                         "(did you mean 'alpha'?)"),
    ],
)
def test_regularizer_args_are_checked_like_margin_args(tmp_path, capsys, override, expected):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), "regularizer.name=center", override)
    assert code == 2 and expected in _one_error_line(err, "train")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.embedding_size=99999999999999999999", "model.embedding_size must be in [1, 65536]"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
        ("data.decode=gpu", "data.decode='gpu' needs train.device='cuda'"),
    ],
)
def test_model_and_data_values_before_any_tensor(tmp_path, capsys, override, expected):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), override)
    assert code == 2 and expected in _one_error_line(err, "train")


def test_output_dir_under_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), f"run.output_dir={afile / 'runs'}")
    line = _one_error_line(err, "train")
    assert code == 2 and f"run.output_dir='{afile / 'runs'}': {afile} is a file" in line


@pytest.mark.parametrize(
    ("argv", "command", "expected"),
    [
        (["plan", "--classes", "1000", "--world-size", "0"], "plan", "world_size=0"),
        (["plan", "--classes", "1000", "--tflops", "nan"], "plan", "argument --tflops: 'nan' must be a finite"),
        (["export", "--backbone", "iresnt18", "o.onnx"], "export", "did you mean 'iresnet18'"),
        (["export", "--backbone", "iresnet18", "o.onnx", "--batch-sizes", "0"], "export",
         "argument --batch-sizes: 0 must be >= 1"),
        (["export", "--backbone", "iresnet18", "o.onnx", "--tolerance", "nan"], "export",
         "argument --tolerance: 'nan' must be a finite number >= 0"),
        (["verify", "m.onnx", "--bin", "a.bin", "--fars", "2"], "verify",
         "argument --fars: '2' is not a false-accept rate in (0, 1]"),
    ],
)
def test_command_options(capsys, argv, command, expected):
    try:
        code = main(argv)
        err = capsys.readouterr().err
    except SystemExit as exit:  # argparse's own errors: its usage lines, then the one error line
        code = exit.code
        err = capsys.readouterr().err
        assert err.startswith("usage: ") and "Traceback" not in err
        err = err.strip().splitlines()[-1]
    line = _one_error_line(err, command)
    assert code == 2 and expected in line, line


def test_export_to_a_directory_and_synth_into_a_file(tmp_path, capsys):
    code, err = _run(capsys, ["export", "--backbone", "iresnet18", str(tmp_path)])
    assert code == 2 and f"OUT.onnx {tmp_path} is a directory" in _one_error_line(err, "export")
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = _run(capsys, ["synth", str(afile)])
    assert code == 2 and f"OUT_DIR {afile} is a file" in _one_error_line(err, "synth")


def test_verify_device_that_does_not_exist(trained, capsys, data):
    _, run_dir = trained
    code, err = _run(capsys, ["verify", str(run_dir), "--bin", str(data / "synth_val.bin"), "--device", "cudax"])
    assert code == 2 and "device 'cudax' is not a torch device" in _one_error_line(err, "verify")


def test_misspelt_config_key_names_the_nearest_key(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, _no_data_config(tmp_path), "optim.weight_decy=0.1")
    line = _one_error_line(err, "train")
    assert code == 2 and "unknown config key 'optim.weight_decy'" in line and "did you mean 'weight_decay'" in line


def test_resuming_a_triplet_run_with_another_second_head_width(data, tmp_path, capsys):
    sections = {"model": {"backbone": "demonet", "embedding_size": 16}, "data": {"sampler": "pk"},
                "regularizer": {"name": "triplet", "second_dim": 8}, "train": {"max_steps": 1}}
    cfg = config_dict(data, tmp_path / "out", **sections)
    assert _train(tmp_path, capsys, cfg)[0] == 0
    code, err = _train(tmp_path, capsys, cfg, "regularizer.second_dim=16", "train.max_steps=2")
    line = _one_error_line(err, "train")
    assert code == 2 and "was trained with" in line and "regularizer.second_dim=8" in line
    assert "this run has" in line and "regularizer.second_dim=16" in line
