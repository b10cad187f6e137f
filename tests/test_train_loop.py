"""Training on real gloo ranks (CPU): loss decreases, same seed same losses, kill-and-resume,
resharding 2 -> 3 -> 1 ranks, merge/split, gradient accumulation, 2 ranks == 1 rank."""

from __future__ import annotations

import pytest
import torch
from test_train_support import config_dict, make_trainer, rank_fit, rank_load_and_save

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train import checkpoint as ckpt


def _cat_heads(results: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    heads = sorted((r["head"] for r in results), key=lambda h: h["start"])
    return torch.cat([h["weight"] for h in heads]), torch.cat([h["momentum"] for h in heads])


def test_two_ranks_reduce_the_loss_and_repeat_exactly(data, tmp_path):
    cfg = config_dict(
        data,
        tmp_path / "a",
        model={"backbone": "demonet", "embedding_size": 16},
        train={"max_steps": 12},
    )
    cfg["checkpoint"]["resume"] = "never"
    first = run_ranks(rank_fit, 2, cfg)
    second = run_ranks(
        rank_fit, 2, config_dict(data, tmp_path / "b", model=cfg["model"], train=cfg["train"])
    )
    losses = first[0]["losses"]
    assert len(losses) == 12 and losses == first[1]["losses"]  # identical on every rank
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert losses == second[0]["losses"]  # same seed, same losses (bitwise)
    for name, value in first[0]["snapshot"]["backbone"].items():
        assert torch.equal(value, second[0]["snapshot"]["backbone"][name]), name


def test_kill_and_resume_reaches_the_same_weights(data, tmp_path):
    # sampled head (sparse grads, sampling RNG) and an epoch boundary (6 batches / epoch) inside
    sections = {
        "head": {"sample_rate": 0.5}, "train": {"max_steps": 9}, "checkpoint": {"every_steps": 0}
    }
    straight = run_ranks(rank_fit, 2, config_dict(data, tmp_path / "straight", **sections))
    cfg = config_dict(data, tmp_path / "resumed", **sections)
    stopped = run_ranks(rank_fit, 2, cfg, 4)  # "killed" after the checkpoint of step 4
    assert stopped[0]["step"] == 4
    resumed = run_ranks(rank_fit, 2, cfg)
    assert resumed[0]["step"] == 9
    assert stopped[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]
    for rank in range(2):
        a, b = straight[rank]["snapshot"], resumed[rank]["snapshot"]
        assert torch.equal(a["head"], b["head"])
        for name, value in a["backbone"].items():
            assert torch.equal(value, b["backbone"][name]), name


def test_reshard_two_three_one_keeps_centres_and_momentum(data, tmp_path):
    two = run_ranks(rank_fit, 2, config_dict(data, tmp_path / "two", train={"max_steps": 3}))
    weight2, momentum2 = _cat_heads(two)
    source = tmp_path / "two" / "t" / "checkpoints"
    three = run_ranks(
        rank_load_and_save,
        3,
        config_dict(data, tmp_path / "three", checkpoint={"resume": str(source)}),
    )
    weight3, momentum3 = _cat_heads(three)
    assert [r["head"]["weight"].shape[0] for r in three] == [4, 4, 4]
    assert torch.equal(weight2, weight3) and torch.equal(momentum2, momentum3)
    assert three[0]["step"] == 3
    assert three[0]["position"]["consumed"] == 48  # 3 steps x 2 ranks x 8: job-wide, any world size
    one = run_ranks(
        rank_load_and_save,
        1,
        config_dict(data, tmp_path / "one", checkpoint={"resume": str(tmp_path / "three" / "t")}),
    )
    weight1, momentum1 = _cat_heads(one)
    assert torch.equal(weight2, weight1) and torch.equal(momentum2, momentum1)
    for name, value in two[0]["snapshot"]["backbone"].items():
        assert torch.equal(value, one[0]["snapshot"]["backbone"][name]), name


def test_merge_and_split_round_trip(data, tmp_path):
    two = run_ranks(rank_fit, 2, config_dict(data, tmp_path / "run", train={"max_steps": 2}))
    weight, momentum = _cat_heads(two)
    merged = ckpt.merge_shards(tmp_path / "run" / "t", tmp_path / "merged.pt")
    whole = torch.load(merged, weights_only=False)
    assert torch.equal(whole["head"]["weight"], weight)
    assert torch.equal(whole["optim_head"]["weight"]["momentum_buffer"], momentum)
    for world in (3, 2):
        folder = ckpt.split_shards(merged, tmp_path / f"split{world}", world)
        rows = ckpt.load_shard_rows(folder, 0, 12)
        assert torch.equal(rows["head"]["weight"], weight)
        assert torch.equal(rows["optim_head"]["weight"]["momentum_buffer"], momentum)
    # split back to the saved world size keeps each rank's own file content (exact resume)
    original = torch.load(
        tmp_path / "run" / "t" / "checkpoints" / "step_00000002" / ckpt.shard_name(1, 2),
        weights_only=False,
    )
    again = torch.load(
        tmp_path / "split2" / "step_00000002" / ckpt.shard_name(1, 2), weights_only=False
    )
    assert torch.equal(original["head"]["weight"], again["head"]["weight"])
    assert torch.equal(original["rng"]["torch"], again["rng"]["torch"])
    model = ckpt.load_backbone(merged)
    assert torch.equal(model.linear.weight, two[0]["snapshot"]["backbone"]["linear.weight"])


def _one_step(cfg: dict) -> dict:
    trainer = make_trainer(0, 1, cfg)
    trainer.fit()
    return trainer.state_snapshot()


def test_accumulating_two_batches_equals_one_double_batch(data, tmp_path):
    common = {
        "train": {"max_steps": 2, "precision": "fp64"},
        "optim": {"lr": 0.3, "momentum": 0.9},
        "head": {"sample_rate": 1.0},
    }
    big = _one_step(config_dict(data, tmp_path / "big", data={"batch_size": 16}, **common))
    accumulated = _one_step(
        config_dict(
            data,
            tmp_path / "acc",
            data={"batch_size": 8},
            optim={**common["optim"], "accumulate": 2},
            **{k: v for k, v in common.items() if k != "optim"},
        )
    )
    assert big["head"].dtype == torch.float64
    torch.testing.assert_close(accumulated["head"], big["head"], rtol=0, atol=1e-12)
    for name, value in big["backbone"].items():
        torch.testing.assert_close(accumulated["backbone"][name], value, rtol=0, atol=1e-12)


def test_two_ranks_equal_one_rank_with_the_same_global_batch(data, tmp_path):
    sections = {"train": {"max_steps": 2, "precision": "fp64"}, "optim": {"clip_grad_norm": 1.0}}
    one = run_ranks(
        rank_fit, 1, config_dict(data, tmp_path / "one", data={"batch_size": 16}, **sections)
    )
    two = run_ranks(
        rank_fit, 2, config_dict(data, tmp_path / "two", data={"batch_size": 8}, **sections)
    )
    torch.testing.assert_close(
        torch.tensor(two[0]["losses"]), torch.tensor(one[0]["losses"]), rtol=0, atol=1e-12
    )
    weight, _ = _cat_heads(two)
    torch.testing.assert_close(weight, one[0]["head"]["weight"], rtol=0, atol=1e-12)
    for name, value in one[0]["snapshot"]["backbone"].items():
        torch.testing.assert_close(two[0]["snapshot"]["backbone"][name], value, rtol=0, atol=1e-12)


def test_interrupted_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    cfg = config_dict(data, tmp_path, train={"max_steps": 2})
    trainer = make_trainer(0, 1, cfg)
    trainer.fit(stop_after=1)
    good = ckpt.latest_checkpoint(trainer.ckpt_root)
    trainer.train_step()
    trainer.step += 1

    def killed(obj, path):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ckpt, "_atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(trainer.ckpt_root) == good
    resumed = make_trainer(0, 1, cfg)
    assert resumed.step == 1 and resumed.resumed_from == good
