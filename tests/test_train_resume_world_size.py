"""Resume at another world size or per-rank batch continues the same run (train.epochs, not
max_steps): the LR as a function of samples seen, the end after exactly the configured
epochs, and, within the epoch of the change, every sample exactly once. Also: the config's
optimizer hyper-parameters win on resume, and a finished run is not retrained."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_train_support import NUM_CLASSES, PER_CLASS, config_dict, make_trainer

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train.schedule import poly_lr_by_samples

NUM_SAMPLES = NUM_CLASSES * PER_CLASS  # 96: a multiple of the global batches 16, 8, 24
EPOCHS = 2


def _sections(batch_size: int) -> dict:
    return {
        "data": {"batch_size": batch_size},
        "train": {"max_steps": None, "epochs": float(EPOCHS)},
        # warmup of 1 epoch: the change of world size happens inside it
        "optim": {"lr": 0.2, "warmup_epochs": 1.0, "power": 1.0},
    }


def rank_fit_recording(rank: int, world_size: int, cfg: dict, stop_after: int | None = None) -> dict:
    """Fit, recording (samples seen before, lr) of every step and the (epoch, dataset index)
    of every sample this rank read."""
    trainer = make_trainer(rank, world_size, cfg)
    read: list[tuple[int, int]] = []
    dataset = trainer.dataset

    class Recording(type(dataset)):
        def __getitem__(self, index):
            read.append((trainer.stream.epoch, int(index)))
            return super().__getitem__(index)

    dataset.__class__ = Recording
    steps: list[tuple[int, float]] = []
    plain_step = trainer.train_step

    def recording_step():
        seen = trainer.schedule.samples_seen
        result = plain_step()
        steps.append((seen, result.lr))
        return result

    trainer.train_step = recording_step
    summary = trainer.fit(stop_after=stop_after)
    return {
        "steps": steps,
        "read": read,
        "step": trainer.step,
        "samples_seen": trainer.schedule.samples_seen,
        "plan": trainer.plan.state_dict(),
        "position": trainer.stream.position(),
        "summary_epochs": summary.get("epochs"),
        "notes": trainer.resume_notes,
    }


def _expected_lr(seen: int, step_samples: int, plan: dict) -> float:
    return poly_lr_by_samples(seen, step_samples, 0.2, plan["total_samples"], plan["warmup_samples"], 1.0)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run: 2 ranks x 8."""
    return run_ranks(rank_fit_recording, 2, config_dict(data, tmp_path_factory.mktemp("straight"), **_sections(8)))


@pytest.mark.parametrize(("new_world", "new_batch"), [(1, 8), (3, 8), (2, 4)])
def test_resume_at_another_world_size_or_batch_continues_the_same_run(data, straight, tmp_path, new_world, new_batch):
    cfg = config_dict(data, tmp_path / "resumed", **_sections(8))
    stopped = run_ranks(rank_fit_recording, 2, cfg, 3)  # 3 steps x 16 = 48 samples of epoch 0
    assert stopped[0]["samples_seen"] == 48
    moved = config_dict(data, tmp_path / "resumed", **_sections(new_batch))
    resumed = run_ranks(rank_fit_recording, new_world, moved)
    new_global = new_world * new_batch

    # the plan is the first start's: 2 epochs of 96 samples, 1 epoch of warmup
    plan = straight[0]["plan"]
    assert plan == resumed[0]["plan"] == {
        "basis": {"steps_per_epoch": 6, "step_samples": 16},
        "total_samples": EPOCHS * NUM_SAMPLES,
        "warmup_samples": NUM_SAMPLES,
    }
    # the LR is the same function of samples seen; where both runs step at the same sample
    # count after the warmup they set the same LR
    for seen, lr in resumed[0]["steps"]:
        assert lr == pytest.approx(_expected_lr(seen, new_global, plan), rel=1e-12, abs=1e-15)
    straight_lr = {seen: lr for seen, lr in straight[0]["steps"]}
    common = [(s, lr) for s, lr in resumed[0]["steps"] if s in straight_lr and s >= plan["warmup_samples"]]
    assert len(common) >= 2
    for seen, lr in common:
        assert lr == straight_lr[seen], seen
    assert [s for s, _ in resumed[0]["steps"]] == list(range(48, EPOCHS * NUM_SAMPLES, new_global))

    # the run ends after exactly the configured epochs
    assert resumed[0]["samples_seen"] == EPOCHS * NUM_SAMPLES == straight[0]["samples_seen"]
    assert resumed[0]["summary_epochs"] == pytest.approx(EPOCHS)
    assert resumed[0]["step"] == 3 + (EPOCHS * NUM_SAMPLES - 48) // new_global
    assert resumed[0]["position"]["epoch"] == EPOCHS - 1
    assert resumed[0]["position"]["consumed"] == NUM_SAMPLES

    # within the epoch of the change (epoch 0), each sample exactly once, across all ranks
    epoch0 = [i for rank in stopped for e, i in rank["read"] if e == 0]
    epoch0 += [i for rank in resumed for e, i in rank["read"] if e == 0]
    assert Counter(epoch0) == Counter(range(NUM_SAMPLES))
    epoch1 = [i for rank in resumed for e, i in rank["read"] if e == 1]
    assert Counter(epoch1) == Counter(range(NUM_SAMPLES))
    assert any("global batch changes 16 -> " in note for note in resumed[0]["notes"])


def test_resumed_optimizer_takes_the_configs_hyperparameters(data, tmp_path):
    sections = {"train": {"max_steps": None, "epochs": 1.0}, "optim": {"weight_decay": 5e-4, "momentum": 0.9}}
    cfg = config_dict(data, tmp_path, **sections)
    make_trainer(0, 1, cfg).fit(stop_after=2)
    changed = config_dict(data, tmp_path, train=sections["train"], optim={"weight_decay": 1e-3, "momentum": 0.5})
    trainer = make_trainer(0, 1, changed)
    assert trainer.step == 2
    for group in trainer.optimizer.param_groups:
        assert group["weight_decay"] == 1e-3 and group["momentum"] == 0.5
    notes = "\n".join(trainer.resume_notes)
    assert "weight_decay 0.0005 (checkpoint) -> 0.001 (config)" in notes
    assert "momentum 0.9 (checkpoint) -> 0.5 (config)" in notes


def test_rerunning_a_finished_run_keeps_its_summary_and_more_epochs_continue_it(data, tmp_path):
    sections = {"train": {"max_steps": None, "epochs": 1.0}}
    cfg = config_dict(data, tmp_path, **sections)
    first = make_trainer(0, 1, cfg).fit()
    summary_path = tmp_path / "t" / "summary.json"
    written = summary_path.read_bytes()
    assert first["samples_seen"] == NUM_SAMPLES and first["final_loss"] is not None

    again = make_trainer(0, 1, cfg).fit()
    assert again["already_complete"] is True
    assert summary_path.read_bytes() == written  # kept, not overwritten with final_loss null
    assert "the run is complete" in (tmp_path / "t" / "train.log").read_text()

    longer = config_dict(data, tmp_path, train={"max_steps": None, "epochs": 2.0})
    trainer = make_trainer(0, 1, longer)
    assert any("96 -> 192 samples" in note for note in trainer.resume_notes)
    extended = trainer.fit()
    assert extended["samples_seen"] == 2 * NUM_SAMPLES and extended["steps"] == 2 * NUM_SAMPLES // 8
    assert json.loads(summary_path.read_text())["steps"] == 2 * NUM_SAMPLES // 8
