"""A training step reads the host twice, in every precision the trainer runs on a CPU, with
gradient clipping on or off: once for the head's input report and once for the trainer's
[loss, non-finite, stop] read (the flags all-reduced with MAX over the ranks). A stop asked
on one rank is agreed by both in that same read."""

from __future__ import annotations

import pytest
import test_train_triplet_ddp  # noqa: F401  (registers the two-head test backbone, in the ranks too)
from test_train_support import config_dict, make_data, make_trainer

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.heads.step_count import counting


def _count_step_reads(rank: int, world_size: int, cfg: dict) -> tuple[dict, bool]:
    trainer = make_trainer(rank, world_size, cfg)
    trainer.stream.next = _prefetched(trainer.stream.next)  # the data path's reads are not the step's
    trainer.train_step()  # warm-up (lazy state)
    if rank == 1:
        trainer.stop_request.request("test")
    with counting() as counter:
        trainer.train_step()
    return {k: v for k, v in counter.syncs.items() if v}, trainer.stop_request.agreed


def _prefetched(next_batch):
    batches = [next_batch() for _ in range(2)]
    return lambda: batches.pop(0)


@pytest.mark.parametrize(("precision", "clip_scope"), [("fp32", None), ("bf16", None), ("fp32", "all"),
                                                     ("bf16", "backbone")])
def test_a_step_reads_the_host_twice_and_agrees_on_a_stop_asked_by_one_rank(tmp_path, precision, clip_scope) -> None:
    clip = {} if clip_scope is None else {"clip_grad_norm": 1e-3, "clip_scope": clip_scope}  # (clips every step)
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", train={"precision": precision}, optim=clip)
    for syncs, agreed in run_ranks(_count_step_reads, 2, cfg):
        assert syncs == {"tolist": 2}, syncs
        assert agreed  # rank 1 asked; rank 0 learns it in the same read


def test_the_center_loss_adds_only_its_own_input_report(tmp_path) -> None:
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs", regularizer={"name": "center", "weight": 0.01})
    for syncs, _ in run_ranks(_count_step_reads, 2, cfg):
        assert syncs == {"tolist": 3}, syncs  # the head's report, the center loss's, the trainer's read


@pytest.mark.parametrize(("name", "args"), [("triplet", {"mining": "batch_hard"}), ("triplet", {"mining": "semi_hard"}),
                                            ("circle_pair", {})])
def test_the_pair_regularizers_read_only_their_input_report(tmp_path, name, args) -> None:
    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs",
                      data={"batch_size": 8, "sampler": "pk", "pk_k": 4},
                      model={"backbone": "test_tiny_trunk_two_head", "embedding_size": 16},
                      regularizer={"name": name, "weight": 1.0, "second_dim": 8, "with_head": False, "args": args})
    # one rank: with the regularizer alone, DDP's find_unused_parameters reads its map of used
    # parameters on the host (the embedding head gets no gradient); that read is DDP's, not the loss's
    for syncs, _ in run_ranks(_count_step_reads, 1, cfg):
        assert syncs == {"tolist": 2}, syncs  # the regularizer's report and the trainer's read (no head)

