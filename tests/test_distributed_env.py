"""torchrun environment parsing and ClassShard arithmetic."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.distributed import ClassShard, init_distributed, read_torchrun_env

FULL = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_no_torchrun_variables_is_single_process() -> None:
    assert read_torchrun_env({}) is None
    env = init_distributed(device_type="cpu", environ={})
    assert (env.rank, env.world_size, env.backend, env.is_distributed) == (0, 1, None, False)


def test_half_set_environment_names_the_missing_variables() -> None:
    partial = {k: FULL[k] for k in ("RANK", "WORLD_SIZE")}
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        read_torchrun_env(partial)
    assert read_torchrun_env(FULL) == FULL


@pytest.mark.parametrize("num_classes,world_size", [(1003, 1), (1003, 2), (1003, 3), (10, 4), (7, 7), (100, 8)])
def test_shards_cover_all_classes_once(num_classes: int, world_size: int) -> None:
    shards = [ClassShard(num_classes, world_size, r) for r in range(world_size)]
    assert shards[0].start == 0 and shards[-1].end == num_classes
    for a, b in zip(shards, shards[1:]):
        assert a.end == b.start
        assert a.num_local - b.num_local in (0, 1)  # the remainder goes to the first ranks
    labels = torch.arange(num_classes)
    for shard in shards:
        owner = shard.owner_of(labels)
        assert torch.equal(owner == shard.rank, shard.owns(labels))


def test_shard_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="smaller than world_size"):
        ClassShard(3, 4, 0)
    with pytest.raises(ValueError, match="outside"):
        ClassShard(10, 2, 2)
