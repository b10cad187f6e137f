"""Process groups, the torchrun environment, class shards and autograd collectives."""

from fr_trainer.distributed.collectives import (
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_,
    rank_and_world_size,
    reduce_scatter_sum,
)
from fr_trainer.distributed.env import DistributedEnv, init_distributed, read_torchrun_env
from fr_trainer.distributed.shard import ClassShard

__all__ = [
    "ClassShard",
    "DistributedEnv",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_",
    "init_distributed",
    "rank_and_world_size",
    "read_torchrun_env",
    "reduce_scatter_sum",
]
