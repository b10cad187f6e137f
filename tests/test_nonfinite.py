"""NaN/inf never reaches a checkpoint or an export: a non-finite state is not saved (both
gloo ranks refuse, even when only one holds the NaN); a resume skips a non-finite
checkpoint for the newest finite one and says so; keep_last never prunes the last finite
checkpoint; a skipped step (train.nonfinite=skip) leaves BatchNorm's statistics bit for
bit; `fr-trainer export` refuses NaN weights and a model whose embedding ignores its input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_support import config_dict, make_trainer

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.export.cli import main as export_main
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train import checkpoint_integrity as integrity
from fr_trainer.train.config import TrainConfig
from fr_trainer.train.finiteness import NonFiniteSteps
from fr_trainer.train.trainer import NonFiniteLoss


def _cfg(data, out: Path, **sections) -> dict:
    base = {"train": {"max_steps": 8}, "checkpoint": {"every_steps": 0, "keep_last": 1}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_dict(data, out, **base)


def rank_save_with_nan_on_rank_1(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    trainer.fit(stop_after=1)
    if rank == 1:
        with torch.no_grad():
            trainer.head.weight[0, 0] = float("nan")
    trainer.step += 1
    try:
        trainer.save()
    except NonFiniteLoss as error:
        return {"error": str(error), "checkpoints": [p.name for p in trainer.ckpt_root.iterdir()]}
    return {"error": None}


def test_a_nonfinite_state_is_not_saved_and_both_ranks_stop(data, tmp_path):
    results = run_ranks(rank_save_with_nan_on_rank_1, 2, _cfg(data, tmp_path))
    for result in results:
        assert result["error"] is not None
        assert "not saving checkpoint step_00000002" in result["error"]
        assert "rank 1: shard.head.weight (1 of " in result["error"]
        assert "step_00000001" in result["error"]  # the newest finite checkpoint is named
        assert sorted(result["checkpoints"]) == ["latest", "step_00000001"]


def _poison(folder: Path) -> None:
    """NaN into the saved backbone, the manifest updated to match (a readable checkpoint)."""
    common = ckpt.load_file(folder / ckpt.COMMON)
    common["backbone"]["linear.weight"][0, 0] = float("nan")
    torch.save(common, folder / ckpt.COMMON)
    manifest = json.loads((folder / ckpt.COMPLETE).read_text())
    manifest["files"][ckpt.COMMON] = integrity.file_digest(folder / ckpt.COMMON)
    (folder / ckpt.COMPLETE).write_text(json.dumps(manifest))


def test_resume_skips_a_nonfinite_checkpoint_for_the_newest_finite_one(data, tmp_path):
    cfg = _cfg(data, tmp_path, checkpoint={"every_steps": 1, "keep_last": 3})
    make_trainer(0, 1, cfg).fit(stop_after=2)  # step_1, step_2
    root = tmp_path / "t" / "checkpoints"
    _poison(root / "step_00000002")
    resumed = make_trainer(0, 1, cfg)
    assert resumed.resumed_from == root / "step_00000001" and resumed.step == 1
    assert torch.isfinite(resumed.backbone.linear.weight).all()
    log = (tmp_path / "t" / "train.log").read_text()
    assert f"not resuming from {root / 'step_00000002'}" in log and "NaN/inf" in log
    assert "common.backbone.linear.weight (1 of" in log
    assert f"resuming from {root / 'step_00000001'} instead" in log
    _poison(root / "step_00000001")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        make_trainer(0, 1, cfg)


def test_keep_last_never_prunes_the_last_finite_checkpoint(data, tmp_path):
    cfg = _cfg(data, tmp_path)  # keep_last = 1
    trainer = make_trainer(0, 1, cfg)
    trainer.fit(stop_after=1)
    root, good = trainer.ckpt_root, trainer.ckpt_root / "step_00000001"
    nan = {"w": torch.full((2,), float("nan"))}
    for step in (2, 3):  # written marked non-finite (the trainer itself would refuse)
        ckpt.save_checkpoint(root, step, {"x": nan}, {"y": nan}, 0, 1, keep_last=1, allow_nonfinite=True)
        assert integrity.marked_nonfinite(root / ckpt.step_name(step))
    assert [p.name for p in ckpt.complete_checkpoints(root)] == [good.name, "step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(root) == good
    assert (root / ckpt.LATEST).read_text().strip() == good.name
    resumed = make_trainer(0, 1, cfg)
    assert resumed.resumed_from == good
    log = (tmp_path / "t" / "train.log").read_text()
    assert "step_00000003 is marked non-finite" in log and "step_00000002 is marked non-finite" in log
    ckpt.save_checkpoint(root, 4, {"x": torch.ones(2)}, {"y": torch.ones(2)}, 0, 1, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000004"]


def _buffers(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.backbone.named_buffers()}


def test_a_skipped_step_leaves_batchnorm_statistics_bit_identical(data, tmp_path, monkeypatch):
    cfg = _cfg(
        data, tmp_path, model={"backbone": "demonet"}, train={"nonfinite": "skip"}, optim={"accumulate": 2}
    )
    trainer = make_trainer(0, 1, cfg)
    before = _buffers(trainer)
    params = {k: v.detach().clone() for k, v in trainer.backbone.named_parameters()}
    real_loss = trainer._regularized_loss
    monkeypatch.setattr(trainer, "_regularized_loss", lambda *a: real_loss(*a) * float("nan"))
    assert trainer.train_step().skipped
    after = _buffers(trainer)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for name, value in trainer.backbone.named_parameters():
        assert torch.equal(value, params[name]), name
    monkeypatch.undo()
    assert not trainer.train_step().skipped  # a real step does move them (the test can fail)
    moved = _buffers(trainer)
    assert not torch.equal(moved["stem.1.running_var"], before["stem.1.running_var"])
    assert int(moved["stem.1.num_batches_tracked"]) == int(before["stem.1.num_batches_tracked"]) + 2


def test_nonfinite_steps_stop_or_skip_until_too_many_in_a_row():
    """The train.nonfinite policy alone: "stop" stops at the first NaN/inf loss; "skip"
    skips until more than max_nonfinite_skips come in a row; a finite step ends the run."""
    stop, message = NonFiniteSteps(TrainConfig(nonfinite="stop")).nonfinite(4, float("nan"))
    assert stop and message.startswith("step 4: loss is nan; stopping (train.nonfinite=stop).")
    policy = NonFiniteSteps(TrainConfig(nonfinite="skip", max_nonfinite_skips=2))
    skipped = (False, "step 1: loss is inf; step skipped (train.nonfinite=skip, 1 in a row)")
    assert policy.nonfinite(1, float("inf")) == skipped
    policy.finite()
    assert [policy.nonfinite(step, float("nan"))[0] for step in (3, 4)] == [False, False]
    assert policy.nonfinite(5, float("nan")) == (
        True, "step 5: loss is nan; 3 non-finite steps in a row (train.max_nonfinite_skips=2); stopping"
    )


def _demonet_weights(tmp_path: Path, name: str, edit) -> Path:
    from fr_trainer.backbones import create_backbone

    torch.manual_seed(0)
    state = create_backbone("demonet", embedding_size=16).state_dict()
    edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_export_refuses_nan_weights_and_a_constant_model(data, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    nan = _demonet_weights(tmp_path, "nan.pt", lambda s: s["stem.1.running_var"].fill_(float("inf")))
    assert export_main(["--backbone", "demonet", str(nan), str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN/inf weights (stem.1.running_var)" in err and str(nan) in err and not out.exists()
    constant = _demonet_weights(tmp_path, "constant.pt", lambda s: s["linear.weight"].zero_())
    assert export_main(["--backbone", "demonet", str(constant), str(out)]) == 2
    err = capsys.readouterr().err
    assert "embedding is the same for every input" in err and not out.exists()
    # a training checkpoint with a NaN backbone (written before this check existed)
    cfg = _cfg(data, tmp_path / "run", model={"backbone": "demonet"})
    make_trainer(0, 1, cfg).fit(stop_after=1)
    _poison_bn(tmp_path / "run" / "t" / "checkpoints" / "step_00000001")
    assert export_main([str(tmp_path / "run" / "t"), str(out)]) == 2
    assert "NaN/inf weights (features.running_var)" in capsys.readouterr().err and not out.exists()


def _poison_bn(folder: Path) -> None:
    common = ckpt.load_file(folder / ckpt.COMMON)
    common["backbone"]["features.running_var"].fill_(float("inf"))
    torch.save(common, folder / ckpt.COMMON)
    (folder / ckpt.COMPLETE).write_text("ok\n")  # an older, manifest-less checkpoint
