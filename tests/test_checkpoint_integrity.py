"""Checkpoint integrity: a corrupt or truncated newest checkpoint (a shard or common.pt,
with or without a manifest) makes both gloo ranks resume from the older intact one with a
warning naming the bad file; stale temporary folders never block a rerun; a save that
would not fit on the disk is refused before anything is written; pruning waits for the
new checkpoint to be verified; a crafted pickle runs nothing."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from test_train_support import config_dict, make_trainer, rank_fit

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train import checkpoint_integrity as integrity


def _cfg(data, out: Path, **sections) -> dict:
    sections = {"train": {"max_steps": 8}, "checkpoint": {"every_steps": 2, "keep_last": 3}, **sections}
    return config_dict(data, out, **sections)


def rank_resumes(rank: int, world_size: int, cfgs: list[dict]) -> list[dict]:
    """Build a trainer (it resumes) for each config in turn; where each resumed from."""
    out = []
    for cfg in cfgs:
        trainer = make_trainer(rank, world_size, cfg)
        out.append({"from": trainer.resumed_from, "step": trainer.step})
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _legacy_truncated_shard(folder: Path) -> None:  # checkpoints from before manifests
    for step in (folder, folder.parent / "step_00000002"):
        (step / ckpt.COMPLETE).write_text("ok\n")
    _truncate(folder / ckpt.shard_name(1, 2))


CORRUPTIONS = {
    "truncated shard of rank 1": (lambda f: _truncate(f / ckpt.shard_name(1, 2)), "shard_00001_of_00002.pt"),
    "corrupt common.pt, same size": (lambda f: _flip_a_byte(f / ckpt.COMMON), "common.pt"),
    "truncated common.pt": (lambda f: _truncate(f / ckpt.COMMON), "common.pt"),
    "no manifest, truncated shard": (_legacy_truncated_shard, "shard_00001_of_00002.pt"),
}


def test_a_bad_newest_checkpoint_makes_both_ranks_resume_from_the_older_one(data, tmp_path):
    base = _cfg(data, tmp_path / "base")
    run_ranks(rank_fit, 2, base, 4)  # step_2 and step_4
    source = tmp_path / "base" / "t"
    cfgs = []
    for index, (corrupt, _) in enumerate(CORRUPTIONS.values()):
        out = tmp_path / f"case{index}"
        shutil.copytree(source, out / "t")
        corrupt(out / "t" / "checkpoints" / "step_00000004")
        cfgs.append(_cfg(data, out))
    per_rank = run_ranks(rank_resumes, 2, cfgs)
    for index, (name, (_, bad_file)) in enumerate(CORRUPTIONS.items()):
        older = tmp_path / f"case{index}" / "t" / "checkpoints" / "step_00000002"
        for rank in range(2):
            assert per_rank[rank][index] == {"from": older, "step": 2}, (name, rank)
        log = (tmp_path / f"case{index}" / "t" / "train.log").read_text()
        assert f"step_00000004/{bad_file}" in log and "not resuming from" in log, (name, log)
        assert f"resuming from {older} instead" in log, name


def test_manifest_records_each_file_and_stale_temporaries_never_block_a_rerun(data, tmp_path):
    cfg = _cfg(data, tmp_path, checkpoint={"every_steps": 0, "keep_last": 3})
    trainer = make_trainer(0, 1, cfg)
    trainer.fit(stop_after=1)
    folder = ckpt.latest_checkpoint(trainer.ckpt_root)
    manifest = json.loads((folder / ckpt.COMPLETE).read_text())
    assert manifest["finite"] is True and manifest["step"] == 1
    assert sorted(manifest["files"]) == [ckpt.COMMON, ckpt.shard_name(0, 1)]
    for name, digest in manifest["files"].items():
        assert integrity.file_digest(folder / name) == digest
    assert not list(folder.glob("*.sum"))
    # what interrupted saves leave: a tmp folder of the next step (and one that is a file)
    root = trainer.ckpt_root
    (root / ".tmp_step_00000002").mkdir()
    (root / ".tmp_step_00000002" / ckpt.shard_name(0, 1)).write_bytes(b"half a file")
    (root / ".tmp_step_00000003").write_text("not even a folder")
    (root / "latest.partial").write_text("step_0000")
    again = make_trainer(0, 1, cfg)
    assert again.resumed_from == folder
    again.fit(stop_after=2)
    assert again.step == 3 and ckpt.latest_checkpoint(root).name == "step_00000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000003"]


def _one_step_past_a_checkpoint(data, tmp_path):
    """A trainer one step past its only checkpoint (keep_last 1), and that checkpoint."""
    trainer = make_trainer(0, 1, _cfg(data, tmp_path, checkpoint={"every_steps": 0, "keep_last": 1}))
    trainer.fit(stop_after=1)
    good = ckpt.latest_checkpoint(trainer.ckpt_root)
    trainer.train_step()
    trainer.step += 1
    return trainer, good


def test_a_save_that_would_not_fit_is_refused_before_writing(data, tmp_path, monkeypatch):
    trainer, good = _one_step_past_a_checkpoint(data, tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(ckpt.CheckpointError) as error:
        trainer.save()
    message = str(error.value)
    assert "not enough free space" in message and "1.0 MiB is free" in message
    assert "needs about" in message and str(trainer.ckpt_root) in message
    monkeypatch.undo()
    assert sorted(p.name for p in trainer.ckpt_root.iterdir()) == ["latest", good.name]
    assert ckpt.latest_checkpoint(trainer.ckpt_root) == good


def test_older_checkpoints_are_pruned_only_after_the_new_one_is_verified(data, tmp_path, monkeypatch):
    trainer, good = _one_step_past_a_checkpoint(data, tmp_path)

    def unreadable(path):
        raise ckpt.CheckpointError(f"{path} is unreadable (simulated)")

    monkeypatch.setattr(integrity, "record_digest", unreadable)
    with pytest.raises(ckpt.CheckpointError, match="simulated"):
        trainer.save()
    monkeypatch.undo()
    assert [p.name for p in ckpt.complete_checkpoints(trainer.ckpt_root)] == [good.name]
    assert ckpt.latest_checkpoint(trainer.ckpt_root) == good
    trainer.save()  # the next save works and then prunes down to keep_last=1
    assert [p.name for p in ckpt.complete_checkpoints(trainer.ckpt_root)] == ["step_00000002"]


class _Payload:
    """Unpickling this would create a file (builtins.open(path, "w"))."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_crafted_pickle_runs_nothing(data, tmp_path):
    target = tmp_path / "created_by_the_payload"
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    torch.save({"backbone": {}, "backbone_name": "demonet", "x": _Payload(target)}, folder / ckpt.COMMON)
    torch.save({"head": {}, "x": _Payload(target)}, folder / ckpt.shard_name(0, 1))
    (folder / ckpt.COMPLETE).write_text("ok\n")
    for load in (ckpt.load_file, ckpt.load_backbone):
        path = folder / ckpt.COMMON
        with pytest.raises(ckpt.CheckpointError, match="not a trusted fr_trainer checkpoint") as error:
            load(path)
        assert str(path) in str(error.value)
    with pytest.raises(ckpt.CheckpointError, match="not a trusted fr_trainer checkpoint"):
        ckpt.load_backbone(tmp_path / "run")
    cfg = _cfg(data, tmp_path / "train", checkpoint={"resume": str(tmp_path / "run")})
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*not a trusted"):
        make_trainer(0, 1, cfg)
    assert not target.exists()
    torch.save({"x": _Payload(target)}, tmp_path / "plain.pt")  # the payload does work unguarded
    torch.load(tmp_path / "plain.pt", weights_only=False)
    assert target.exists()


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load_file(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    # an older checkpoint's numpy tuple (ndarray keys) still loads, weights-only
    torch.save({**state, "numpy": np.random.get_state()}, tmp_path / "old.pt")
    assert ckpt.load_file(tmp_path / "old.pt", mmap=True)["numpy"][0] == "MT19937"



class _FakeCudaRng:
    """torch.cuda's RNG calls on a node of three GPUs, this rank's being GPU 1 (current)."""

    def __init__(self) -> None:
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
        self.current = 1

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        for name, fn in {"is_available": lambda: True, "is_initialized": lambda: True,
                         "current_device": lambda: self.current, "get_rng_state": self.get,
                         "set_rng_state": self.set, "get_rng_state_all": self.refuse,
                         "set_rng_state_all": self.refuse}.items():
            monkeypatch.setattr(cuda, name, fn)

    def get(self, device="cuda") -> torch.Tensor:
        assert device == "cuda", device  # the current device
        return self.states[self.current].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        assert device == "cuda", device
        self.states[self.current] = state.clone()

    def refuse(self, *args):
        raise AssertionError("a rank must not read or write the other GPUs' generators")


def test_the_checkpoint_saves_and_restores_only_the_ranks_own_gpu_generator(monkeypatch):
    fake = _FakeCudaRng()
    fake.install(monkeypatch)
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"], torch.full((16,), 1, dtype=torch.uint8))
    fake.states = [torch.zeros(16, dtype=torch.uint8)] * 3
    ckpt.set_rng_state(state)
    assert [int(s[0]) for s in fake.states] == [0, 1, 0]  # GPUs 0 and 2 (other ranks') untouched
    # an older checkpoint's list of every visible GPU's state: the current GPU's entry
    ckpt.set_rng_state({**state, "cuda": [torch.full((16,), 7 + i, dtype=torch.uint8) for i in range(3)]})
    assert [int(s[0]) for s in fake.states] == [0, 8, 0]
    fake.current = 2  # a GPU the old list does not cover keeps its state
    ckpt.set_rng_state({**state, "cuda": [torch.full((16,), 9, dtype=torch.uint8)]})
    assert [int(s[0]) for s in fake.states] == [0, 8, 0]

def rank_save_with_a_full_disk_on_rank_0(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    trainer.fit(stop_after=1)
    trainer.step += 1
    real = shutil.disk_usage
    if rank == 0:  # only rank 0 checks the (shared) disk; rank 1 must not wait forever
        shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(1 << 30, 1 << 30, 0)
    try:
        trainer.save()
    except ckpt.CheckpointError as error:
        return {"error": str(error), "checkpoints": sorted(p.name for p in trainer.ckpt_root.iterdir())}
    finally:
        shutil.disk_usage = real
    return {"error": None}


def test_a_full_disk_stops_both_ranks_with_the_same_error(data, tmp_path):
    results = run_ranks(rank_save_with_a_full_disk_on_rank_0, 2, _cfg(data, tmp_path))
    for result in results:
        assert result["error"] is not None and "not enough free space" in result["error"]
        assert "0.0 MiB is free" in result["error"]
        assert result["checkpoints"] == ["latest", "step_00000001"]
