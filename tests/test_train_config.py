"""Configs (unknown keys, overrides, validation, shipped configs) and bad input that must fail
before training starts, with a message naming the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_support import NUM_CLASSES, config_dict, make_trainer

from fr_trainer.train.cli import main as train_main
from fr_trainer.train.config import ConfigError, config_from_dict, load_config
from fr_trainer.train.schedule import poly_lr

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_unknown_keys_are_rejected_with_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*accepted.*lr"):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
        config_from_dict({"optimizer": {}})


def test_dotted_overrides_and_types(tmp_path):
    config = load_config(
        CONFIGS / "demo.toml",
        ["optim.lr=0.2", "model.backbone=iresnet50", "head.margin_args.m=0.4", "train.max_steps=7"],
    )
    assert config.optim.lr == 0.2 and config.model.backbone == "iresnet50"
    assert config.head.margin_args["m"] == 0.4 and config.train.max_steps == 7
    with pytest.raises(ConfigError, match=r"optim.lr must be float, got 'fast'"):
        load_config(CONFIGS / "demo.toml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is not one of"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"KEY=VALUE"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize(
    "name",
    [
        "demo.toml",
        "ms1mv3_r50_arcface.toml",
        "glint360k_r100_cosface.toml",
        "wf42m_r100_pfc02_cosface.toml",
    ],
)
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.data.batch_size >= 1


def test_poly_schedule():
    assert poly_lr(0, 0.1, 100, 10) == pytest.approx(0.01)
    assert poly_lr(9, 0.1, 100, 10) == pytest.approx(0.1)
    assert poly_lr(55, 0.1, 100, 10) == pytest.approx(0.1 * 0.5**2)
    assert poly_lr(100, 0.1, 100, 10) == 0.0


def _cli(tmp_path, cfg: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    code = train_main([str(path)])
    return code, capsys.readouterr().err


def test_missing_data_root_fails_before_training(tmp_path, capsys):
    code, err = _cli(tmp_path, config_dict(tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert code == 2 and "does not exist" in err and "fr-trainer synth" in err
    (tmp_path / "empty").mkdir()
    code, err = _cli(tmp_path, config_dict(tmp_path / "empty", tmp_path / "out"), capsys)
    assert code == 2 and "has no train.rec / train.idx" in err
    assert not (tmp_path / "out" / "t" / "checkpoints").exists()


def test_num_classes_inconsistent_with_the_data(data, tmp_path, capsys):
    cfg = config_dict(data, tmp_path / "out", data={"num_classes": NUM_CLASSES + 5})
    code, err = _cli(tmp_path, cfg, capsys)
    assert code == 2 and f"num_classes={NUM_CLASSES + 5}" in err and f"says {NUM_CLASSES}" in err


def test_nonfinite_loss_stops_or_skips(data, tmp_path):
    from fr_trainer.train.trainer import NonFiniteLoss

    cfg = config_dict(data, tmp_path / "stop", train={"max_steps": 3})
    trainer = make_trainer(0, 1, cfg)
    trainer.backbone.linear.weight.data.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="train.nonfinite=skip"):
        trainer.fit()
    cfg = config_dict(
        data,
        tmp_path / "skip",
        train={"max_steps": 3, "nonfinite": "skip", "max_nonfinite_skips": 2},
    )
    trainer = make_trainer(0, 1, cfg)
    before = trainer.head.weight.detach().clone()
    trainer.backbone.linear.weight.data.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="3 non-finite steps in a row"):
        trainer.fit()
    assert (
        trainer.step == 2 and (trainer.head.weight == before).all()
    )  # skipped steps changed nothing
