"""Margin state through a checkpoint saved at world 2 and loaded at world 3 (the path
`Trainer.load` takes: `checkpoint.load_shard_rows` + `load_state_dict`): AdaFace's running
norm statistics (replicated buffers: every new rank gets them), and a resumed head
continues exactly as the uninterrupted one. The heads of several ranks are built in one
process (the rank and world size a head sees are patched; their collectives are not used)."""

from __future__ import annotations

from pathlib import Path

import torch
from test_train_support import write_head_checkpoint

from fr_trainer.heads import partial_fc
from fr_trainer.train import checkpoint as ckpt

NUM_CLASSES, DIM, SEED, STEP = 41, 6, 3, 4


def _head(monkeypatch, rank: int, world_size: int, margin: str, **kw) -> partial_fc.PartialFC:
    monkeypatch.setattr(partial_fc, "rank_and_world_size", lambda group: (rank, world_size))
    return partial_fc.PartialFC(NUM_CLASSES, DIM, margin=margin, seed=SEED, **kw).double()


def _save(folder: Path, heads: list[partial_fc.PartialFC]) -> None:
    write_head_checkpoint(folder, heads, NUM_CLASSES, STEP)


def _load(monkeypatch, folder: Path, world_size: int, margin: str, **kw) -> list[partial_fc.PartialFC]:
    heads = []
    for rank in range(world_size):
        head = _head(monkeypatch, rank, world_size, margin, **kw)
        head.load_state_dict(ckpt.load_shard_rows(folder, head.shard.start, head.shard.end)["head"])
        heads.append(head)
    return heads


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randn(8, DIM, generator=g, dtype=torch.float64) * torch.linspace(2, 90, 8, dtype=torch.float64)[:, None]
    return x, torch.randint(0, NUM_CLASSES, (8,), generator=g)


def test_adaface_statistics_survive_a_two_to_three_reshard(monkeypatch, tmp_path) -> None:
    trained = _head(monkeypatch, 0, 1, "adaface")
    for step in range(3):  # a few single-process steps move the running statistics
        trained(*_batch(step)).backward()
    state = {k: trained.margin.state_dict()[k].clone() for k in ("batch_mean", "batch_std")}
    assert float(state["batch_mean"]) != 20.0 and float(state["batch_std"]) != 100.0
    old = [_head(monkeypatch, rank, 2, "adaface") for rank in range(2)]
    for head in old:  # replicated state: the same on every rank
        head.margin.load_state_dict(state)
    _save(tmp_path / "step", old)
    new = _load(monkeypatch, tmp_path / "step", 3, "adaface")
    for head in new:
        for key, value in state.items():
            assert torch.equal(head.margin.state_dict()[key], value), key
    # a resumed single-process head continues exactly like the uninterrupted one
    resumed = _load(monkeypatch, tmp_path / "step", 1, "adaface")[0]
    resumed.weight.data.copy_(trained.weight.data)
    x, y = _batch(3)
    torch.testing.assert_close(resumed(x, y), trained(x, y), rtol=0, atol=0)
    assert torch.equal(resumed.margin.batch_mean, trained.margin.batch_mean)


def test_subcentres_stay_with_their_class_through_a_two_to_three_reshard(monkeypatch, tmp_path) -> None:
    old = [_head(monkeypatch, rank, 2, "subcenter_arcface", k=3) for rank in range(2)]
    full = _head(monkeypatch, 0, 1, "subcenter_arcface", k=3).weight.detach()
    assert full.shape == (NUM_CLASSES, 3, DIM)
    assert torch.equal(torch.cat([h.weight.detach() for h in old]), full)  # init independent of the world size
    with torch.no_grad():  # as if trained: make every sub-centre distinct and recognisable
        for head in old:
            head.weight.add_(torch.arange(head.shard.start, head.shard.end, dtype=torch.float64)[:, None, None])
    trained = torch.cat([h.weight.detach() for h in old])
    _save(tmp_path / "step", old)
    new = _load(monkeypatch, tmp_path / "step", 3, "subcenter_arcface", k=3)
    for head in new:
        assert head.weight.shape == (head.shard.num_local, 3, DIM)
        assert torch.equal(head.weight.detach(), trained[head.shard.start:head.shard.end])
    # an arcface run cannot take sub-centre weights by mistake (the shapes differ)
    plain = _head(monkeypatch, 0, 1, "arcface")
    assert plain.weight.shape != new[0].weight.shape
