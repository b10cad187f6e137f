"""`model.ema_decay`: the trainer's moving average of the backbone equals one computed by
hand from the weights after each step, ignores skipped steps (a non-finite loss, a
GradScaler skip), survives a checkpoint and a resume at another world size (2 gloo ranks
-> 1), is verified beside the weights, and `fr-trainer export --ema` exports it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_support import config_dict, make_trainer

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.eval.cli import verify_main
from fr_trainer.export.cli import main as export_main
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.config import ConfigError, config_from_dict
from fr_trainer.train.ema import warmed_decay


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_ema_equals_a_hand_computed_average_of_the_weights(data, tmp_path):
    decay = 0.8
    cfg = config_dict(data, tmp_path, model={"backbone": "demonet", "ema_decay": decay})
    trainer = make_trainer(0, 1, cfg)
    expected = _params(trainer.backbone)  # the average starts at the initial weights
    assert all(torch.equal(expected[k], v) for k, v in _params(trainer.ema.module).items())
    for _ in range(4):
        assert not trainer.train_step().skipped
        trainer.step += 1
        weights = _params(trainer.backbone)
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    average = _params(trainer.ema.module)
    for name, value in expected.items():
        torch.testing.assert_close(average[name], value, rtol=0, atol=1e-6)
        assert not torch.allclose(average[name], weights[name]), name  # not just the weights
    for name, buffer in trainer.backbone.named_buffers():  # BN statistics: copied
        assert torch.equal(dict(trainer.ema.module.named_buffers())[name], buffer), name
    assert trainer.ema.updates == 4


def test_the_warmup_decay_is_min_of_decay_and_1_plus_n_over_10_plus_n():
    assert [warmed_decay(0.5, n, True) for n in range(4)] == [1 / 10, 2 / 11, 3 / 12, 4 / 13]
    assert warmed_decay(0.5, 100, True) == 0.5 and warmed_decay(0.5, 0, False) == 0.5


def test_skipped_steps_do_not_update_the_ema(data, tmp_path, monkeypatch):
    cfg = config_dict(data, tmp_path, model={"ema_decay": 0.5}, train={"nonfinite": "skip"})
    trainer = make_trainer(0, 1, cfg)
    trainer.train_step()
    before = _state(trainer.ema.module)
    # 1. a non-finite loss (train.nonfinite = skip)
    real_loss = trainer._regularized_loss
    monkeypatch.setattr(trainer, "_regularized_loss", lambda *a: real_loss(*a) * float("nan"))
    assert trainer.train_step().skipped
    monkeypatch.undo()
    # 2. a step the GradScaler skips: a finite loss, an inf gradient
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weight = trainer.backbone.linear.weight
    hook = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    weights = weight.detach().clone()
    assert not trainer.train_step().skipped
    assert trainer.scaler.get_scale() == 512.0 and torch.equal(weight, weights)  # the scaler skipped it
    for name, value in _state(trainer.ema.module).items():
        assert torch.equal(value, before[name]), name
    assert trainer.ema.updates == 1
    hook.remove()
    trainer.train_step()  # a step taken moves it (the test can fail)
    assert not torch.equal(trainer.ema.module.linear.weight, before["linear.weight"])
    assert trainer.ema.updates == 2


# --------------------------------------------------------------- resume at another world size
def _resume_cfg(data, out, batch_size: int) -> dict:
    return config_dict(
        data, out, data={"batch_size": batch_size, "flip": False},
        model={"ema_decay": 0.7}, train={"max_steps": 6},
    )


def _fit_ema(rank: int, world_size: int, cfg: dict, stop_after: int | None = None) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    resumed_updates = trainer.ema.updates
    trainer.fit(stop_after=stop_after)
    return {
        "ema": _state(trainer.ema.module),
        "weights": _state(trainer.backbone),
        "updates": trainer.ema.updates,
        "resumed_updates": resumed_updates,
        "step": trainer.step,
    }


def rank_straight_and_stopped(rank: int, world_size: int, data, out) -> tuple[dict, dict]:
    """On 2 gloo ranks: the uninterrupted run, then a run stopped (checkpointed) at step 3."""
    straight = _fit_ema(rank, world_size, _resume_cfg(data, out / "straight", 8))
    return straight, _fit_ema(rank, world_size, _resume_cfg(data, out / "resumed", 8), 3)


def test_checkpoint_and_resume_from_2_ranks_to_1_gives_the_ema_of_the_uninterrupted_run(data, tmp_path):
    # the same global batch of 16 (2 x 8, then 1 x 16): the same samples each step
    (straight, stopped), (straight_1, _) = run_ranks(rank_straight_and_stopped, 2, data, tmp_path)
    common = ckpt.load_common(tmp_path / "resumed" / "t" / "checkpoints" / "step_00000003")
    assert common["ema"]["updates"] == 3 and set(common["ema"]["backbone"]) == set(stopped["ema"])
    resumed = _fit_ema(0, 1, _resume_cfg(data, tmp_path / "resumed", 16))
    assert resumed["resumed_updates"] == 3 and resumed["updates"] == straight["updates"] == 6
    assert resumed["step"] == 6
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=0, atol=1e-5)
        assert torch.equal(straight_1["ema"][name], value)  # replicated: both ranks agree
        assert not torch.allclose(value, straight["weights"][name], atol=1e-4)  # an average
        assert not torch.allclose(value, stopped["ema"][name], atol=1e-4)  # it kept moving


# --------------------------------------------------------------- verification, export
def test_export_ema_exports_the_average_and_verification_reports_both(pairs_data, tmp_path, capsys):
    from fr_trainer.export.model_io import load_onnx_session

    cfg = config_dict(
        pairs_data, tmp_path, model={"backbone": "demonet", "ema_decay": 0.6},
        train={"max_steps": 4}, eval={"at_end": True, "bins": ["synth_val"], "batch_size": 16},
    )
    summary = make_trainer(0, 1, cfg).fit()
    assert set(summary["verification_ema"]) == set(summary["verification"]) == {"synth_val"}
    assert "verification of the EMA at step 4: synth_val" in (tmp_path / "t" / "train.log").read_text()
    run = tmp_path / "t"
    out = tmp_path / "ema.onnx"
    assert export_main([str(run), str(out), "--ema", "--latency-runs", "0", "--batch-sizes", "2"]) == 0
    x = torch.randn(2, 3, 112, 112)
    session, info = load_onnx_session(out)
    exported = session.run(None, {info.input_name: x.numpy()})[0]
    with torch.no_grad():
        ema = ckpt.load_backbone(run, ema=True)(x).numpy()
        raw = ckpt.load_backbone(run)(x).numpy()
    np.testing.assert_allclose(exported, ema, rtol=1e-4, atol=1e-4)
    assert np.abs(exported - raw).max() > 1e-2  # not the weights
    capsys.readouterr()
    assert verify_main([str(run), "--ema", "--bin", str(pairs_data / "synth_val.bin"), "--quiet"]) == 0
    assert "synth_val: accuracy" in capsys.readouterr().out


def test_export_ema_of_a_run_without_ema_is_a_one_line_error(data, tmp_path, capsys):
    make_trainer(0, 1, config_dict(data, tmp_path, train={"max_steps": 1})).fit()
    out = tmp_path / "m.onnx"
    assert export_main([str(tmp_path / "t"), str(out), "--ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no EMA of the backbone" in err and "drop --ema" in err and "\n" not in err
    assert not out.exists()
    assert verify_main([str(tmp_path / "t"), "--ema", "--bin", str(out)]) == 2
    assert "has no EMA of the backbone" in capsys.readouterr().err


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_ema_decay_outside_0_1_is_a_config_error(data, tmp_path, decay):
    with pytest.raises(ConfigError, match=rf"model.ema_decay must be in \[0, 1\).*got {decay}"):
        config_from_dict(config_dict(data, tmp_path, model={"ema_decay": decay}))
