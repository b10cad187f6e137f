"""Every loss config trains (configs/losses/*_demo.toml, shrunk), and the regularizers in
the trainer: 2 ranks == 1 rank of the same global batch in fp64 (center paper/sgd, triplet
batch-hard/semi-hard on P x K batches, circle_pair), centres resharded 2 -> 3 -> 1 on resume,
kill-and-resume of the P x K stream under 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import config_dict, head_state, make_trainer
from torch import nn

from fr_trainer.backbones.registry import BACKBONES
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "losses"
DEMO_LOSSES = [
    "arcface", "cosface", "coco", "sv_arcface", "mv_softmax", "circle", "curricularface",
    "sphereface", "center", "center_cosface", "triplet", "circle_pair", "adaface", "magface",
    "subcenter_arcface",
]


class TinyTwoHeadNet(nn.Module):
    """BN-free, with the two-head protocol: [B,3,112,112] -> pool 4x4 feature map -> Linear."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.num_features = embedding_size
        self.feature_channels, self.feature_size = 3, (4, 4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.linear = nn.Linear(48, embedding_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(feature_map, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


if "test_tiny_two_head" not in BACKBONES:
    BACKBONES.register("test_tiny_two_head")(lambda embedding_size=16: TinyTwoHeadNet(embedding_size))


# ------------------------------------------------------------------ each demo config trains
# Held-out verification must rise by at least this much (accuracy points on 300 pairs of 20
# unseen identities; the 10-fold accuracy's binomial spread there is about 3 points). Measured
# with 48 steps of 16 on 40 identities: untrained 47.0%, trained 58.7% (triplet, the weakest)
# to 73.3% (circle_pair).
HELDOUT_GAIN = 0.08
HELDOUT_STEPS = 48


@pytest.fixture(scope="module")
def heldout_data(tmp_path_factory) -> Path:
    """40 training identities x 8 images, and one `.bin` of 300 pairs of 20 unseen ones."""
    from fr_trainer.data.synthetic import generate

    root = tmp_path_factory.mktemp("heldout_data")
    generate(root, num_identities=40, images_per_identity=8, num_holdout_identities=20,
             num_pairs=300, val_sets=(("synth_val", 1.0),), num_ijbc_subjects=0, workers=0)
    return root


def _demo_config(name: str, data: Path, out: Path, steps: int):
    overrides = [
        f'data.root="{data}"', f'run.output_dir="{out}"', "data.batch_size=16",
        "data.num_workers=0", f"train.max_steps={steps}", "train.device=\"cpu\"",
        "train.precision=\"fp32\"", "optim.warmup_epochs=0", "optim.lr=0.1",
        "model.embedding_size=32", "checkpoint.every_steps=0", "checkpoint.resume=\"never\"",
        "log.tensorboard=false", "log.progress=\"off\"", 'eval.bins=["synth_val"]',
        "eval.at_start=true", "eval.at_end=true", "eval.every_steps=0",
    ]
    return load_config(CONFIGS / f"{name}_demo.toml", overrides)


@pytest.mark.parametrize("name", DEMO_LOSSES)
def test_each_demo_loss_trains_demonet(name, heldout_data, tmp_path):
    """Each demo config, shrunk, raises held-out verification by HELDOUT_GAIN."""
    from fr_trainer.distributed.env import DistributedEnv
    from fr_trainer.train.trainer import Trainer

    config = _demo_config(name, heldout_data, tmp_path, steps=HELDOUT_STEPS)
    assert config.model.backbone == "demonet"
    summary = Trainer(config, DistributedEnv(0, 1, 0, None, torch.device("cpu"))).fit()
    losses = summary["losses"]
    assert len(losses) == HELDOUT_STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    before = summary["verification_initial"]["synth_val"]["accuracy"]
    after = summary["verification"]["synth_val"]["accuracy"]
    assert after >= before + HELDOUT_GAIN, (name, before, after)


def test_every_loss_has_a_demo_config():
    found = {p.name.removesuffix("_demo.toml") for p in CONFIGS.glob("*_demo.toml")}
    assert set(DEMO_LOSSES) <= found
    for path in CONFIGS.glob("ms1mv3_*.toml"):  # real-data configs parse
        load_config(path)


# ------------------------------------------------------------------ 2 ranks == 1 rank (fp64)
def rank_fit_regularized(rank: int, world_size: int, cfg: dict, stop_after=None) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    result = trainer.fit(stop_after=stop_after)
    reg = trainer.regularizer
    return {
        "losses": result["losses"],
        "snapshot": trainer.state_snapshot(),
        "head": head_state(trainer),
        "reg_start": reg.shard.start if hasattr(reg, "shard") else 0,
        "step": trainer.step,
        "position": trainer.stream.position(),
    }


def rank_resume(rank: int, world_size: int, cfg: dict) -> dict:
    trainer = make_trainer(rank, world_size, cfg)
    reg = trainer.regularizer
    centres = reg.centres.detach().clone()
    momentum = trainer.optimizer.state[reg.centres].get("momentum_buffer")
    return {"start": reg.shard.start, "centres": centres, "momentum": momentum, "step": trainer.step}


def _cat_centres(results: list[dict]) -> torch.Tensor:
    ordered = sorted(results, key=lambda r: r["reg_start"])
    return torch.cat([r["snapshot"]["regularizer"]["centres"] for r in ordered])


def _cat_head(results: list[dict]) -> torch.Tensor:
    return torch.cat([h["weight"] for h in sorted((r["head"] for r in results), key=lambda h: h["start"])])


REGULARIZED = {
    "center_paper": ({"name": "center", "weight": 0.05, "args": {"alpha": 0.5}}, {}),
    "center_sgd": ({"name": "center", "weight": 0.05, "args": {"update": "sgd"}}, {}),
    "triplet_batch_hard": (
        {"name": "triplet", "weight": 1.0, "second_dim": 8, "args": {"mining": "batch_hard"}},
        {"sampler": "pk", "pk_k": 4},
    ),
    "triplet_semi_hard": (
        {"name": "triplet", "weight": 1.0, "second_dim": 8, "args": {"mining": "semi_hard"}},
        {"sampler": "pk", "pk_k": 4},
    ),
    "circle_pair": ({"name": "circle_pair", "weight": 0.5, "args": {"gamma": 16.0}}, {}),
}


def _fit_in_process(cfg: dict) -> list[dict]:
    """One rank in this process (no spawn): the same record as `rank_fit_regularized`."""
    return [rank_fit_regularized(0, 1, cfg)]


@pytest.mark.parametrize("case", list(REGULARIZED))
def test_two_ranks_equal_one_rank_with_a_regularizer(case, data, tmp_path):
    regularizer, data_extra = REGULARIZED[case]
    sections = {
        "train": {"max_steps": 2, "precision": "fp64"},
        "optim": {"clip_grad_norm": 1.0, "lr": 0.3},
        "model": {"backbone": "test_tiny_two_head", "embedding_size": 16},
        "regularizer": regularizer,
    }
    one = _fit_in_process(
        config_dict(data, tmp_path / "one", data={"batch_size": 16, **data_extra}, **sections)
    )
    two_cfg = config_dict(data, tmp_path / "two", data={"batch_size": 8, **data_extra}, **sections)
    two = run_ranks(rank_fit_regularized, 2, two_cfg)
    exact = {"rtol": 0, "atol": 1e-12}
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one[0]["losses"]), **exact)
    assert two[0]["losses"] == two[1]["losses"]
    torch.testing.assert_close(_cat_head(two), one[0]["head"]["weight"], **exact)
    for part in ("backbone", "second_head"):
        for name, value in one[0]["snapshot"][part].items():
            assert value.dtype == torch.float64
            torch.testing.assert_close(two[0]["snapshot"][part][name], value, **exact)
            torch.testing.assert_close(two[1]["snapshot"][part][name], value, **exact)
    if regularizer["name"] == "center":
        centres = _cat_centres(two)
        assert centres.abs().sum() > 0  # the centres moved
        torch.testing.assert_close(centres, one[0]["snapshot"]["regularizer"]["centres"], **exact)
    if case == "center_sgd":
        _check_centres_resharded(two, two_cfg, tmp_path)
    if case == "triplet_semi_hard":
        _check_pk_kill_and_resume(two, two_cfg, tmp_path)


def _check_centres_resharded(two: list[dict], cfg: dict, tmp_path: Path) -> None:
    """The 2-rank checkpoint resumed on 3 ranks and on 1: the same centres and momentum."""
    source = str(tmp_path / "two" / "t" / "checkpoints")
    for world in (3, 1):
        resumed = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / f"w{world}")},
                   "checkpoint": {**cfg["checkpoint"], "resume": source}}
        parts = (run_ranks(rank_resume, world, resumed) if world > 1
                 else [rank_resume(0, 1, resumed)])
        parts.sort(key=lambda r: r["start"])
        assert [p["step"] for p in parts] == [2] * world
        if world == 3:
            assert [p["centres"].shape[0] for p in parts] == [4, 4, 4]
        assert torch.equal(torch.cat([p["centres"] for p in parts]), _cat_centres(two))
        assert all(p["momentum"] is not None for p in parts)
    # merge / split carry the centres and their momentum like the head
    from fr_trainer.train import checkpoint as ckpt

    merged = ckpt.merge_shards(source, tmp_path / "merged.pt")
    folder = ckpt.split_shards(merged, tmp_path / "split3", 3)
    rows = ckpt.load_shard_rows(folder, 0, 12, *ckpt.SHARDED_EXTRA)
    assert torch.equal(rows["regularizer"]["centres"], _cat_centres(two))
    momentum = rows["optim_regularizer"]["centres"]["momentum_buffer"]
    assert torch.equal(momentum, torch.cat([p["momentum"] for p in parts]))


def _check_pk_kill_and_resume(straight: list[dict], cfg: dict, tmp_path: Path) -> None:
    """P x K stream under 2 ranks: stop after step 1 (checkpoint), resume, same weights."""
    cfg = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "resumed")}}
    stopped = run_ranks(rank_fit_regularized, 2, cfg, 1)
    assert stopped[0]["position"] == {  # 1 batch of P=2 classes on each of 2 ranks
        "epoch": 0, "consumed": 4, "unit": "classes", "batch_size": 8, "sampler": "pk"
    }
    resumed = run_ranks(rank_fit_regularized, 2, cfg)
    assert resumed[0]["step"] == 2
    assert stopped[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]
    for rank in range(2):
        a, b = straight[rank]["snapshot"], resumed[rank]["snapshot"]
        for part in ("backbone", "second_head"):
            for name, value in a[part].items():
                assert torch.equal(value, b[part][name]), (part, name)


def test_regularizer_config_errors_name_the_key(data, tmp_path):
    with pytest.raises(ConfigError, match="regularizer.name"):
        make_trainer(0, 1, config_dict(data, tmp_path, regularizer={"name": "centre"}))
    with pytest.raises(ConfigError, match="data.pk_k"):
        make_trainer(0, 1, config_dict(data, tmp_path, data={"sampler": "pk", "pk_k": 3}))
    with pytest.raises(ConfigError, match="two-head"):  # TinyLinear has no feature map
        make_trainer(0, 1, config_dict(data, tmp_path, regularizer={"name": "triplet"}))
    with pytest.raises(ConfigError, match="regularizer.args"):
        make_trainer(0, 1, config_dict(data, tmp_path, regularizer={"name": "circle_pair", "args": {"m": 2.0}}))
    # resuming a plain run with the center loss: the centres are missing
    _fit_in_process(config_dict(data, tmp_path / "plain", train={"max_steps": 1}))
    cfg = config_dict(data, tmp_path / "plain", regularizer={"name": "center"})
    from fr_trainer.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="centres"):
        make_trainer(0, 1, cfg)
