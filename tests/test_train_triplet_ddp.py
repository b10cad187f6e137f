"""The triplet regularizer alone (`regularizer.with_head = false`) under DDP: the embedding
head of the backbone takes no part in the loss, so its parameters get no gradient; DDP
must not wait for them (it raised at the second step). On 2 gloo ranks it trains like one
process with the same global batch, and both ranks keep the same weights."""

from __future__ import annotations

import torch
from test_train_support import config_dict, make_trainer
from torch import nn

from fr_trainer.backbones.registry import BACKBONES
from fr_trainer.distributed.spawn import run_ranks

STEPS = 3


class TinyTrunkTwoHeadNet(nn.Module):
    """A trunk with weights (1x1 conv, pool to 4x4) and an embedding head (Linear): the
    two-head protocol of `TwoHeadBackbone`."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.num_features = embedding_size
        self.feature_channels, self.feature_size = 3, (4, 4)
        self.conv = nn.Conv2d(3, 3, 1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.linear = nn.Linear(48, embedding_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(feature_map, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


if "test_tiny_trunk_two_head" not in BACKBONES:
    BACKBONES.register("test_tiny_trunk_two_head")(lambda embedding_size=16: TinyTrunkTwoHeadNet(embedding_size))


def rank_fit(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    losses = trainer.fit()["losses"]
    return {"losses": losses, "snapshot": trainer.state_snapshot(), "step": trainer.step}


def _config(data, out, batch_size: int) -> dict:
    return config_dict(
        data, out,
        data={"batch_size": batch_size, "sampler": "pk", "pk_k": 4},
        model={"backbone": "test_tiny_trunk_two_head", "embedding_size": 16},
        regularizer={"name": "triplet", "weight": 1.0, "second_dim": 8, "with_head": False,
                     "args": {"mining": "batch_hard"}},
        optim={"lr": 0.3, "clip_grad_norm": 1.0},
        train={"max_steps": STEPS, "precision": "fp64"},
    )


def test_triplet_without_the_head_trains_on_two_ranks_like_one(data, tmp_path):
    one = rank_fit(0, 1, _config(data, tmp_path / "one", 16))
    two = run_ranks(rank_fit, 2, _config(data, tmp_path / "two", 8))
    assert [r["step"] for r in two] == [STEPS, STEPS]
    assert two[0]["losses"] == two[1]["losses"]
    exact = {"rtol": 0, "atol": 1e-12}
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one["losses"]), **exact)
    moved = False
    for part in ("backbone", "second_head"):
        for name, value in one["snapshot"][part].items():
            for rank in (0, 1):
                torch.testing.assert_close(two[rank]["snapshot"][part][name], value, **exact)
            moved |= part == "backbone" and name.startswith("conv")
    assert moved
